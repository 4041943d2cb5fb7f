"""The OpenAI Completions API's request and answer shapes, for a character model: parsed, checked, shaped.

Pure Python (no TensorFlow): ``CompletionRequest.parse`` turns a request body into checked
fields (every refusal an ``ApiError`` naming the parameter, with that API's error shape and
HTTP status), and ``choice_record`` shapes one choice, or one streamed piece of it. A token
is a character: ``max_tokens``, ``usage`` and ``logprobs`` count characters, and
``logit_bias`` is keyed by character id (``GET /v1/models/{model}/vocabulary`` lists them).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keras_charrnn.generation import BIAS_BAN, MAX_STOP_CHARS, MAX_STOPS
from keras_charrnn.serving.limits import ServingLimits

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_LOGPROBS",
    "ApiError",
    "CompletionRequest",
    "choice_record",
    "parse_model_id",
]

DEFAULT_MAX_TOKENS = 16  # that API's default
DEFAULT_TEMPERATURE = 1.0  # that API's default (the package's own is 0.8)
MAX_LOGPROBS = 5  # that API's cap on alternatives
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
KNOWN_FIELDS = frozenset(
    {
        "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo",
        "logit_bias", "stream", "stream_options", "user", "best_of", "suffix", "presence_penalty",
        "frequency_penalty", "top_k", "min_p", "continuation",
    }
)  # fmt: skip
STATUS_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    429: "RESOURCE_EXHAUSTED",
}


class ApiError(Exception):
    """A refusal in that API's shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

    Args:
        status: the HTTP status (400 bad request, 404 unknown model, 429 busy, 5xx server side).
        message: what is wrong and what to do.
        param: the request parameter at fault (None: none in particular).
        code: a short machine-readable code (None: none).
        grpc_code: the status code name the metrics count it under (None: from ``status``).
    """

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, grpc_code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.grpc_code = grpc_code or STATUS_CODE.get(status, "INTERNAL")

    def document(self) -> dict[str, Any]:
        """The error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    """A 400 naming ``param``."""
    return ApiError(400, message, param, code)


def parse_model_id(model: str) -> tuple[str, int | None, str | None]:
    """A model id as ``(name, version, label)``: ``NAME``, ``NAME/VERSION`` or ``NAME@LABEL``.

    Args:
        model: the id.

    Returns:
        The name, and the version or label it pins (None: the newest version).

    Example:

    >>> parse_model_id("shakespeare/3"), parse_model_id("shakespeare@stable")
    (('shakespeare', 3, None), ('shakespeare', None, 'stable'))
    """
    name, slash, version = model.partition("/")
    if slash:
        if not (version.isascii() and version.isdigit() and 0 < len(version) <= 18):
            raise ApiError(
                404, f"model {model!r}: a version must be a number (NAME/VERSION)", "model", "model_not_found"
            )
        return name, int(version), None
    name, at, label = model.partition("@")
    return (name, None, label) if at and label else (model, None, None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(document: Mapping, name: str, default: int, low: int, high: int, why: str = "") -> int:
    value = document.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise bad(name, f"{name} must be an integer in {low}..{high}{why}, got {value!r}")
    return value


def _number(document: Mapping, name: str, default: float, ok, rule: str) -> float:
    value = document.get(name)
    if value is None:
        return default
    if not _is_number(value) or not ok(value):
        raise bad(name, f"{name} must be {rule}, got {value!r}")
    return float(value)


def _bool(document: Mapping, name: str) -> bool:
    value = document.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r}")
    return value


@dataclass
class CompletionRequest:
    """A checked ``POST /v1/completions`` body (see ``parse``)."""

    model: str
    prompts: list[str]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0
    seeded: bool = False  # the caller gave the seed (else drawn at random)
    logprobs: int | None = None
    echo: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    top_k: int = 0
    min_p: float = 0.0
    continuation: str | None = None

    @property
    def rows(self) -> int:
        """Rows of the generation: ``n`` per prompt."""
        return self.n * len(self.prompts)

    @classmethod
    def parse(cls, document: Mapping[str, Any], limits: ServingLimits) -> CompletionRequest:
        """Checks a request body against that API's rules, what a character model can honour, and the limits.

        Args:
            document: the parsed JSON body.
            limits: this server's request limits (``max_rows_per_call`` bounds ``n`` times the prompts,
                ``max_chars_per_call`` bounds ``max_tokens``, ``max_prime_chars`` each prompt).

        Returns:
            The request (a random seed drawn when none is given).

        Raises:
            ApiError: 400 naming the parameter.
        """
        unknown = sorted(set(document) - KNOWN_FIELDS)
        if unknown:
            raise bad(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}", "unknown_parameter")
        _refuse_unsupported(document)
        model = document.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model", "model must be a model id: NAME, NAME/VERSION or NAME@LABEL (see GET /v1/models)")
        request = cls(model=model, prompts=_prompts(document.get("prompt"), limits))
        request.n = _int(document, "n", 1, 1, limits.max_rows_per_call, " (max_rows_per_call)")
        if request.rows > limits.max_rows_per_call:
            raise bad(
                "n",
                f"n={request.n} choices for each of {len(request.prompts)} prompts make {request.rows} rows, over "
                f"this server's limit max_rows_per_call={limits.max_rows_per_call}; ask for fewer",
                "limit_exceeded",
            )
        request.max_tokens = _int(
            document, "max_tokens", DEFAULT_MAX_TOKENS, 0, limits.max_chars_per_call, " characters (max_chars_per_call)"
        )
        request.temperature = _number(
            document, "temperature", DEFAULT_TEMPERATURE, lambda v: v >= 0, "a finite number, 0 (greedy) or more"
        )
        request.top_p = _number(document, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
        request.min_p = _number(document, "min_p", 0.0, lambda v: 0 <= v <= 1, "in [0, 1]")
        request.top_k = _int(document, "top_k", 0, 0, 1 << 20)
        request.stop = _stops(document.get("stop"))
        seed = document.get("seed")
        if seed is not None and not (_is_int(seed) and INT64_MIN <= seed <= INT64_MAX):
            raise bad("seed", f"seed must be an integer in the int64 range, got {seed!r}")
        request.seeded = seed is not None
        request.seed = seed if seed is not None else secrets.randbits(63)
        logprobs = document.get("logprobs")
        if logprobs is not None and not (_is_int(logprobs) and 0 <= logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"logprobs must be an integer in 0..{MAX_LOGPROBS} or null, got {logprobs!r}")
        request.logprobs = logprobs
        request.echo, request.stream = _bool(document, "echo"), _bool(document, "stream")
        request.logit_bias = _logit_bias(document.get("logit_bias"))
        request.include_usage = _stream_options(document.get("stream_options"), request.stream)
        user, continuation = document.get("user"), document.get("continuation")
        if user is not None and not isinstance(user, str):
            raise bad("user", f"user must be a string, got {type(user).__name__}")
        if continuation is not None and (not isinstance(continuation, str) or not continuation):
            raise bad("continuation", "continuation must be a token a previous choice returned")
        request.user, request.continuation = user, continuation
        return request


def _refuse_unsupported(document: Mapping[str, Any]) -> None:
    """Parameters a character model cannot honour: refused, naming them."""
    best_of = document.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad("best_of", "best_of > 1 is not supported: ask for n choices and rank them yourself", "unsupported")
    if document.get("suffix"):
        raise bad(
            "suffix", "suffix is not supported: a character RNN only continues text (no insertion)", "unsupported"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = document.get(name)
        if value is not None and value != 0:
            raise bad(name, f"{name} is not supported (only 0): use logit_bias to steer characters", "unsupported")


def _prompts(prompt: Any, limits: ServingLimits) -> list[str]:
    """The prompt or prompts, each bounded by ``max_prime_chars`` (the list's length first)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt[: limits.max_rows_per_call]):
        if len(prompt) > limits.max_rows_per_call:
            raise bad(
                "prompt",
                f"{len(prompt)} prompts, over this server's limit max_rows_per_call={limits.max_rows_per_call}",
                "limit_exceeded",
            )
        prompts = list(prompt)
    else:
        raise bad("prompt", "prompt must be a string or a non-empty list of strings (token arrays are not supported)")
    for i, text in enumerate(prompts):
        if len(text) > limits.max_prime_chars:
            raise bad(
                "prompt",
                f"prompt {i} holds {len(text)} characters, over this server's limit max_prime_chars="
                f"{limits.max_prime_chars}",
                "limit_exceeded",
            )
    return prompts


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "stop must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"stop holds {len(stops)} strings, at most {MAX_STOPS} are allowed")
    long = [s for s in stops if len(s) > MAX_STOP_CHARS]
    if long:
        raise bad("stop", f"a stop string holds {len(long[0])} characters, at most {MAX_STOP_CHARS} are allowed")
    return tuple(dict.fromkeys(stops))


def _logit_bias(bias: Any) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise bad("logit_bias", "logit_bias must map character ids (as strings) to numbers in [-100, 100]")
    result = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise bad(
                "logit_bias", f"logit_bias keys are character ids (see /v1/models/{{model}}/vocabulary), got {key!r}"
            )
        if not _is_number(value) or not BIAS_BAN <= value <= -BIAS_BAN:
            raise bad("logit_bias", f"logit_bias values must be numbers in [-100, 100], got {value!r} for {key!r}")
        result[int(key)] = float(value)
    return result


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", 'stream_options must be {"include_usage": true|false}')
    return bool(options.get("include_usage"))


def choice_record(
    index: int,
    text: str,
    scores: tuple[Sequence[float | None], Sequence[dict[str, float] | None] | None] | None,
    offset: int,
    finish_reason: str | None,
) -> dict[str, Any]:
    """One choice (or one streamed piece of it) in that API's shape.

    Args:
        index: the choice's index.
        text: its characters (the piece's, when streamed).
        scores: each character's log-probability and alternatives (None where none: the prompt's first
            character), or None when no ``logprobs`` were asked; alternatives None for ``logprobs: 0``.
        offset: where ``text`` starts in the prompt followed by the completion (``text_offset``).
        finish_reason: ``"stop"``, ``"length"``, or None for a streamed piece that is not the last.

    Returns:
        ``{"text", "index", "logprobs", "finish_reason"}``.
    """
    logprobs = None
    if scores is not None:
        values, tops = scores
        logprobs = {
            "tokens": list(text),
            "token_logprobs": list(values),
            "top_logprobs": None if tops is None else list(tops),
            "text_offset": list(range(offset, offset + len(text))),
        }
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}
