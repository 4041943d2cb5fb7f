"""The OpenAI-compatible routes of the REST port: ``GET /v1/models`` and ``POST /v1/completions``.

For tools that speak the OpenAI API (its client libraries, LangChain, curl scripts): a
token is a character. ``GET /v1/models`` lists every model as ``NAME`` (its newest
version), ``NAME/VERSION`` and ``NAME@LABEL``; ``GET /v1/models/{id}/vocabulary`` lists its
characters in id order (the keys of ``logit_bias``). ``POST /v1/completions`` takes that
API's body (see ``openai_schema``) and answers ``text_completion`` objects, or with
``stream: true`` Server-Sent Events (``data: {...}`` chunks, then ``data: [DONE]``).
``/v1/chat/completions`` is refused: a character model has no chat template.

The API is stateless: each call primes every row from a zero state, so a prompt and a
seed give the same text every time, the text of the package's own session
(``keras_charrnn.load(path).session(prompt, seed=..., temperature=..., top_p=...,
stop=...).generate(max_tokens)``); choice ``i`` of ``n`` takes the seed
``generation.sample_seed(seed, i)`` (``Session.samples``). The ``n`` choices of every
prompt are rows of the same ``generate_text_v2`` calls, made through
``PredictionServicer.predict_arrays``: the gRPC path's limits, checks and batching.
The generation runs in segments of ``SEGMENT_CHARS`` characters, carried from one to the
next by ``generation.continue_rows``; a stream sends each segment's characters as it
comes (holding back, while a row runs, the characters that could be the start of a stop
string). ``echo`` with ``logprobs`` scores the prompt with the ``step`` signature.
Metrics count these calls under the entrypoint ``OPENAI``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import numpy as np
from tensorflow_serving.apis import predict_pb2

from keras_charrnn.errors import ServingError
from keras_charrnn.generation import (
    DEFAULT_PRIME,
    LOGPROBS_OFF,
    Completion,
    RuleError,
    check_rows,
    completions,
    context,
    continue_rows,
    inputs_of,
    sample_seed,
)
from keras_charrnn.serving import monitoring
from keras_charrnn.serving.json_codec import parse_json
from keras_charrnn.serving.openai_schema import ApiError, CompletionRequest, choice_record, parse_model_id
from keras_charrnn.serving.rest import HTTP_STATUS, Reply
from keras_charrnn.serving.servicers import SEGMENT_CHARS, PredictionServicer, SettingNamer, error_text
from keras_charrnn.serving.signature_runner import SignatureCall
from keras_charrnn.serving.version_loader import LoadedVersion

__all__ = ["ENTRYPOINT", "ModelFacts", "OpenAIApi", "Start", "model_facts"]

log = logging.getLogger("charrnn.serve")

ENTRYPOINT = "OPENAI"  # the metrics' entrypoint label of these routes
SIGNATURE = "generate_text_v2"
OWNER = "charrnn"
VOCABULARY_PATH = re.compile(r"/v1/models/(.+)/vocabulary")
PARAM_OF_SETTING = {
    "max_prime_chars": "prompt",
    "max_ids_length": "prompt",
    "max_rows_per_call": "n",
    "max_request_elements": "n",
    "max_chars_per_call": "max_tokens",
    "max_message_bytes": "max_tokens",
}
Scores = tuple[list, list | None]  # per character: its log-probability (None: none), and its alternatives
PARAM_OF_INPUT = {"num_chars": "max_tokens", "stop_tail": "continuation", "min_chars": "continuation"}


# ----- a version's facts --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the endpoint reads of a loaded version, once: its characters and state tensors.

    Args:
        vocabulary: the characters in id order, id 0 (unknown) first.
        state_names: the state tensors.
        state_size: their width.
    """

    vocabulary: tuple[str, ...]
    state_names: tuple[str, ...]
    state_size: int

    def ids(self, text: str) -> np.ndarray:
        """``text``'s character ids (0 for a character outside the vocabulary)."""
        index = {c: i for i, c in enumerate(self.vocabulary) if i > 0}
        return np.array([index.get(c, 0) for c in text], np.int32)


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a version's module -> its facts
_FACTS_LOCK = threading.Lock()


def model_facts(loaded: LoadedVersion) -> ModelFacts:
    """A version's ``ModelFacts``, from its ``metadata`` signature (run once per loaded version).

    Args:
        loaded: the version.

    Returns:
        The facts.
    """
    facts = _FACTS.get(loaded.module)
    if facts is None:
        outputs = SignatureCall.of(loaded, "metadata").run({})
        config = json.loads(bytes(np.asarray(outputs["config"]).reshape(-1)[0]).decode("utf-8"))
        chars = tuple(c.decode("utf-8") for c in np.asarray(outputs["vocabulary"]).reshape(-1))
        facts = ModelFacts(chars, tuple(config["state_names"]), int(config["state_size"]))
        with _FACTS_LOCK:
            _FACTS[loaded.module] = facts
    return facts


# ----- one completion call ------------------------------------------------------------------


@dataclass
class Start:
    """Where a row starts: a zero state by default, or a continuation's (see ``continuation``).

    Args:
        states: each state tensor's row (None: zeros).
        pending: text the model has not fed yet, before the prompt ("": none).
        position: characters generated before.
        tail: the last characters generated since the last feed (stops match across calls).
        model: the model id it is pinned to (None: the request's).
    """

    states: dict[str, np.ndarray] | None = None
    pending: str = ""
    position: int = 0
    tail: str = ""
    model: str | None = None

    def state(self, name: str, size: int) -> np.ndarray:
        """One state tensor's starting row (zeros for a fresh start)."""
        if self.states is None:
            return np.zeros([1, size], np.float32)
        row = self.states.get(name)
        if row is None or row.size != size:
            raise ApiError(400, "the continuation's states do not fit this model", "continuation", "invalid_value")
        return np.asarray(row, np.float32).reshape(1, size)


class _Generation:
    """The rows of one ``/v1/completions`` call, generated segment by segment, and the choices they make."""

    def __init__(self, api: OpenAIApi, request: CompletionRequest, call: SignatureCall, start: Start):
        self.api, self.request, self.call, self.start = api, request, call, start
        self.facts = model_facts(call.loaded)
        self.deadline = None if api.timeout_s is None else time.monotonic() + api.timeout_s
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # characters a stream holds back
        rows, asked = request.rows, request.logprobs
        self.acc = [
            Completion("", "length", None, 0, None if asked is None else [], [] if asked else None, r)
            for r in range(rows)
        ]
        self.carry: list[dict[str, Any]] = [{} for _ in range(rows)]
        self.inputs = self._inputs()

    def prompt(self, row: int) -> str:
        """The prompt of a row (``n`` rows per prompt)."""
        return self.request.prompts[row // self.request.n]

    def _inputs(self) -> dict[str, np.ndarray]:
        """The first call's inputs: every row primed with its prompt, its seed, the request's controls."""
        request, facts, start = self.request, self.facts, self.start
        rows = request.rows
        ctx = context(len(facts.vocabulary), self.api.prediction.limits.advertised())
        bias = None
        if request.logit_bias:
            bias = np.zeros(len(facts.vocabulary), np.float32)
            for i, value in request.logit_bias.items():
                if i >= len(facts.vocabulary):
                    raise ApiError(
                        400, f"logit_bias: no character id {i} (the model has ids 0..{len(facts.vocabulary) - 1})",
                        "logit_bias", "invalid_value",
                    )  # fmt: skip
                bias[i] = value
        values = {
            "temperature": request.temperature,
            "top_k": request.top_k,
            "top_p": request.top_p,
            "position": start.position,
            "min_p": request.min_p,
            "logit_bias": bias,
            "stop": request.stop,
            "stop_tail": start.tail,
            "min_chars": 0,
            "logprobs": LOGPROBS_OFF if request.logprobs is None else request.logprobs,
            "num_chars": max(request.max_tokens, 1),
        }
        primes = [(start.pending + self.prompt(r)) or DEFAULT_PRIME for r in range(rows)]
        arrays: dict[str, np.ndarray] = {"prime": np.array([p.encode("utf-8") for p in primes], dtype=object)}
        for name in facts.state_names:
            arrays[name] = np.repeat(start.state(name, facts.state_size), rows, axis=0)
        for spec in inputs_of(SIGNATURE):
            if spec.name == "seed":
                seeds = [sample_seed(request.seed, r % request.n) for r in range(rows)]
                arrays["seed"] = np.array(seeds, np.int64)
            else:
                arrays[spec.name] = spec.column(rows, ctx, values[spec.name])
        try:
            check_rows(arrays, ctx, facts.vocabulary)
        except RuleError as exc:
            name = PARAM_OF_INPUT.get(exc.input, exc.input)
            raise ApiError(400, exc.message.replace(exc.input, name, 1), name, "invalid_value") from None
        return arrays

    def _time_left(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ServingError("DEADLINE_EXCEEDED", "the completion ran past this server's rest_api_timeout_in_ms")
        return left

    def segments(self) -> Iterator[list[int]]:
        """Generates the rows in calls of at most ``SEGMENT_CHARS`` characters; yields the rows each call moved.

        Each call goes through ``predict_arrays`` (the gRPC path's checks, limits and batching);
        the next one continues by ``generation.continue_rows``; a row that met a stop leaves.
        """
        current, active, left = self.inputs, np.arange(self.request.rows), self.request.max_tokens
        vocabulary, states = list(self.facts.vocabulary), list(self.facts.state_names)
        while left > 0 and active.size:
            take = min(left, SEGMENT_CHARS)
            current["num_chars"] = np.full(active.size, take, np.int32)
            outputs = self.api.prediction.predict_arrays(self.call, current, timeout=self._time_left())
            results = completions(outputs, current, vocabulary)
            following = continue_rows(current, outputs, states)
            for j, row in enumerate(active):
                self.acc[row] = self.acc[row].extend(results[j])
                self.carry[row] = {k: following[k][j] for k in ("prime", "position", "stop_tail", *states)}
            yield [int(r) for r in active]
            keep = [j for j, result in enumerate(results) if result.finish_reason != "stop"]
            left -= take
            active = active[keep]
            current = {k: v[keep] for k, v in following.items()}

    def finished(self, row: int) -> bool:
        """Whether a row is done: a stop matched or its ``max_tokens`` reached."""
        acc = self.acc[row]
        return acc.finish_reason == "stop" or acc.num_chars >= self.request.max_tokens

    def visible(self, row: int) -> tuple[str, Scores | None]:
        """A row's text a caller may see now, and its scores: without a matched stop; while the row runs,
        without the last characters that could begin a stop string."""
        acc = self.acc[row]
        text = acc.text_without_stop if self.finished(row) else acc.text[: max(len(acc.text) - self.hold, 0)]
        if acc.logprobs is None:
            return text, None
        tops = None if acc.top_logprobs is None else acc.top_logprobs[: len(text)]
        return text, (acc.logprobs[: len(text)], tops)

    def prompt_scores(self) -> list[Scores | None]:
        """Per prompt, each character's log-probability and alternatives (``echo`` with ``logprobs``), from ``step``.

        A character's score is the model's distribution after the characters before it (from the
        row's start: a zero state, or a continuation's); the first character of a fresh text has none.
        """
        k = self.request.logprobs
        if not self.request.echo or k is None:
            return [None] * len(self.request.prompts)
        step = self.api.prediction.signature_call(_spec(self.call.loaded.name, self.call.loaded.version), "step")
        vocabulary = self.facts.vocabulary
        scores: list[Scores | None] = []
        for prompt in self.request.prompts:
            text = self.start.pending + prompt
            skip = len(self.start.pending)
            if not prompt:
                scores.append(([], None if k == 0 else []))
                continue
            ids = self.facts.ids(text)
            inputs = {"ids": ids[None, :]}
            for name in self.facts.state_names:
                inputs[name] = self.start.state(name, self.facts.state_size)
            logits = np.asarray(self.api.prediction.predict_arrays(step, inputs, timeout=self._time_left())["logits"])
            shifted = logits[0] - logits[0].max(axis=-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # float32, as the graph's scores
            values: list[float | None] = [
                None if t == 0 else float(logp[t - 1, ids[t]]) for t in range(skip, len(text))
            ]
            tops: list[dict[str, float] | None] | None = None
            if k:
                tops = []
                for t in range(skip, len(text)):
                    if t == 0:
                        tops.append(None)
                        continue
                    best = np.argsort(-logp[t - 1, 1:], kind="stable")[:k] + 1
                    tops.append({vocabulary[i]: float(logp[t - 1, i]) for i in best})
            scores.append((values, tops))
        return scores

    def usage(self) -> dict[str, int]:
        """Characters: the prompts' (once each), the generated ones (stops included), and both."""
        prompt = sum(len(p) for p in self.request.prompts)
        completion = sum(a.num_chars for a in self.acc)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _spec(name: str, version: int | None = None, label: str | None = None):
    spec = predict_pb2.PredictRequest().model_spec
    spec.name = name
    if version is not None:
        spec.version.value = version
    if label:
        spec.version_label = label
    return spec


def _sse(document: Any) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _joined(first: Scores | None, second: Scores | None) -> Scores | None:
    """Two (values, alternatives) score pairs one after the other."""
    if first is None or second is None:
        return second if first is None else first
    tops = None if first[1] is None or second[1] is None else [*first[1], *second[1]]
    return [*first[0], *second[0]], tops


# ----- the routes ---------------------------------------------------------------------------


class OpenAIApi:
    """The OpenAI-compatible routes over the gRPC service's ``predict_arrays``.

    Args:
        prediction: the ``PredictionServicer`` (its manager, limits and ``predict_arrays``).
        timeout_s: the longest one completion may take (``rest_api_timeout_in_ms``; None: no limit).
        name_setting: how the server's operator sets a setting, added to the errors a setting causes.
        continuations: signs and reads continuation tokens (``continuation.Continuations``; None: none offered).

    Example:

    >>> rest = RestServer(RestApi(prediction, status), extra_routes=OpenAIApi(prediction).handle)  # doctest: +SKIP
    """

    def __init__(
        self,
        prediction: PredictionServicer,
        timeout_s: float | None = None,
        name_setting: SettingNamer | None = None,
        continuations: Any = None,
    ):
        self.prediction, self.timeout_s, self.name_setting = prediction, timeout_s, name_setting
        self.continuations = continuations

    def handle(self, method: str, path: str, body: bytes) -> Reply | None:
        """Answers an OpenAI route; None for any other path (the REST API's then).

        Args:
            method: the HTTP method.
            path: the URL path.
            body: the request body.

        Returns:
            The reply (errors in that API's shape), or None.
        """
        note = {"model": ""}  # the model a completion names, for the metrics
        routes: dict[str, tuple[str, Callable[[], Reply]]] = {
            "/v1/models": ("GET", self._models),
            "/v1/completions": ("POST", lambda: self._completions(body, note)),
            "/v1/chat/completions": ("POST", self._chat),
        }
        match = VOCABULARY_PATH.fullmatch(path)
        if path in routes:
            allowed, answer = routes[path]
        elif match is not None:
            allowed, answer = "GET", lambda: self._vocabulary(unquote(match.group(1)))
        else:
            return None
        api = path.rsplit("/", 1)[-1]
        start, status = time.perf_counter(), "INTERNAL"
        try:
            if method != allowed and not (allowed == "GET" and method == "HEAD"):
                raise ApiError(405, f"{path} takes {allowed}, not {method}", None, "method_not_allowed")
            reply = answer()
            if reply.chunks is not None:  # a stream counts itself once it ends
                reply.chunks = self._counted(reply.chunks, note["model"], api, start)
                status = ""
                return reply
            status = "OK"
            return reply
        except ServingError as exc:
            error = self._api_error(exc)
            status = error.grpc_code
            return self._error_reply(error)
        except ApiError as exc:
            status = exc.grpc_code
            return self._error_reply(exc)
        except Exception as exc:  # never a traceback to the caller
            log.exception("internal error in OpenAI %s %s", method, path)
            return self._error_reply(ApiError(500, f"internal error: {type(exc).__name__}"))
        finally:
            if status:
                monitoring.record_request(note["model"], api, ENTRYPOINT, status, time.perf_counter() - start)

    def _counted(self, chunks: Iterable[bytes], model: str, api: str, start: float) -> Iterator[bytes]:
        status = "CANCELLED"
        try:
            yield from chunks
            status = "OK"
        finally:
            monitoring.record_request(model, api, ENTRYPOINT, status, time.perf_counter() - start)

    def _api_error(self, exc: ServingError) -> ApiError:
        """A ``ServingError`` in that API's terms (a request too large for a limit is a 400, not a 429)."""
        status = HTTP_STATUS.get(exc.code, 500)
        if exc.code == "RESOURCE_EXHAUSTED" and exc.setting != "max_concurrent_requests":
            status = 400
        param = PARAM_OF_SETTING.get(exc.setting or "")
        code = "model_not_found" if status == 404 else "limit_exceeded" if exc.setting else None
        return ApiError(status, error_text(exc, self.name_setting), param, code, exc.code)

    @staticmethod
    def _error_reply(error: ApiError) -> Reply:
        return Reply(error.status, "application/json", json.dumps(error.document()).encode("utf-8") + b"\n")

    @staticmethod
    def _json(document: Any) -> Reply:
        return Reply(200, "application/json", json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n")

    def _resolve(self, model: str) -> LoadedVersion:
        name, version, label = parse_model_id(model)
        try:
            return self.prediction.manager.resolve(name, version, label)
        except ServingError as exc:
            raise ApiError(
                404, f"The model {model!r} does not exist: {exc.message}", "model", "model_not_found"
            ) from None

    def _models(self) -> Reply:
        manager, data = self.prediction.manager, []
        for name in sorted(manager.models):
            loaded = dict(manager.models[name].loaded)
            if not loaded:
                continue
            ids = [(name, max(loaded))] + [(f"{name}/{v}", v) for v in sorted(loaded)]
            ids += [(f"{name}@{label}", v) for label, v in sorted(manager.labels(name).items()) if v in loaded]
            for model_id, version in ids:
                try:
                    created = int(loaded[version].path.stat().st_mtime)
                except OSError:
                    created = 0
                data.append(
                    {"id": model_id, "object": "model", "created": created, "owned_by": OWNER, "version": version}
                )
        return self._json({"object": "list", "data": data})

    def _vocabulary(self, model: str) -> Reply:
        loaded = self._resolve(model)
        tokens = list(model_facts(loaded).vocabulary)
        return self._json({"object": "vocabulary", "model": model, "version": loaded.version, "tokens": tokens})

    def _chat(self) -> Reply:
        raise ApiError(
            400,
            "chat completions are not supported: a character model has no chat template; use POST /v1/completions "
            "with the conversation as the prompt",
            None,
            "unsupported_endpoint",
        )

    def _completions(self, body: bytes, note: dict[str, str]) -> Reply:
        try:
            document = parse_json(body)
        except ServingError as exc:
            raise ApiError(400, exc.message, None, "invalid_json") from None
        request = CompletionRequest.parse(document, self.prediction.limits)
        if request.user is not None:
            log.info("completion for user %r: model %s, %d row(s)", request.user[:64], request.model, request.rows)
        start = Start()
        if request.continuation is not None:
            if self.continuations is None:
                raise ApiError(400, "this server offers no continuation tokens", "continuation", "unsupported")
            start = self.continuations.start(request)
        loaded = self._resolve(start.model or request.model)
        note["model"] = loaded.name
        try:
            call = self.prediction.signature_call(_spec(loaded.name, loaded.version), SIGNATURE)
        except ServingError as exc:
            if exc.code != "FAILED_PRECONDITION":
                raise
            raise ApiError(
                400,
                f"model {loaded.name} version {loaded.version} has no '{SIGNATURE}' signature (exported before "
                f"keras-charrnn 0.3); re-export it with keras_charrnn.reexport.reexport_savedmodel",
                "model",
                "model_not_supported",
            ) from None
        generation = _Generation(self, request, call, start)
        scores = generation.prompt_scores()
        head = {
            "id": "cmpl-" + secrets.token_hex(12),
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": f"{loaded.name}/{loaded.version}",
        }
        segments = generation.segments()
        if not request.stream:
            for _ in segments:
                pass
            return self._json({**head, "choices": self._choices(generation, scores), "usage": generation.usage()})
        first = next(segments, None)  # a failing first call still answers with an HTTP error
        chunks = self._stream(generation, scores, head, segments, first is not None)
        return Reply(200, "text/event-stream", b"", chunks=chunks)

    def _choices(self, generation: _Generation, scores: list[Scores | None]) -> list[dict[str, Any]]:
        choices = []
        for row in range(generation.request.rows):
            prompt, echo = generation.prompt(row), generation.request.echo
            text, own = generation.visible(row)
            if echo:
                text, own = prompt + text, _joined(scores[row // generation.request.n], own)
            choice = choice_record(row, text, own, 0 if echo else len(prompt), generation.acc[row].finish_reason)
            self._offer_continuation(generation, row, choice)
            choices.append(choice)
        return choices

    def _offer_continuation(self, generation: _Generation, row: int, choice: dict[str, Any]) -> None:
        if self.continuations is not None:
            choice["continuation"] = self.continuations.token(generation, row)

    def _stream(
        self, generation: _Generation, scores: list[Scores | None], head: dict, segments: Iterator, ran: bool
    ) -> Iterator[bytes]:
        """The SSE stream: the echoed prompts, each segment's new characters, each row's finish, the usage."""
        request, rows = generation.request, generation.request.rows
        sent, closed = [0] * rows, [False] * rows
        if request.echo:
            yield _sse({**head, "choices": [
                choice_record(r, generation.prompt(r), scores[r // request.n], 0, None) for r in range(rows)
            ]})  # fmt: skip

        def pieces(moved: list[int]) -> list[dict]:
            out = []
            for row in moved:
                text, own = generation.visible(row)
                done = generation.finished(row)
                if len(text) == sent[row] and not done:
                    continue
                part = None if own is None else (own[0][sent[row] :], None if own[1] is None else own[1][sent[row] :])
                offset = len(generation.prompt(row)) + sent[row]
                choice = choice_record(
                    row, text[sent[row] :], part, offset, generation.acc[row].finish_reason if done else None
                )
                if done:
                    self._offer_continuation(generation, row, choice)
                out.append(choice)
                sent[row], closed[row] = len(text), done
            return out

        try:
            if ran:
                yield _sse({**head, "choices": pieces(list(range(rows)))})
                for moved in segments:
                    yield _sse({**head, "choices": pieces(moved)})
            last = pieces([r for r in range(rows) if not closed[r]])
            if last:
                yield _sse({**head, "choices": last})
        except ServingError as exc:
            yield _sse(self._api_error(exc).document())
            return
        except Exception as exc:
            log.exception("internal error in a streamed completion")
            yield _sse(ApiError(500, f"internal error: {type(exc).__name__}").document())
            return
        if request.include_usage:
            yield _sse({**head, "choices": [], "usage": generation.usage()})
        yield b"data: [DONE]\n\n"
