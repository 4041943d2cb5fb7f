"""One ``/v1/completions`` call's rows: primed, generated segment by segment through Predict, scored.

``Generation`` builds the ``generate_text_v2`` inputs of every row (``n`` per prompt, choice ``i``
seeded ``generation.sample_seed(seed, i)``, from a zero state or a continuation's ``Start``),
checks them by the generation table's rules, runs them as one call through the Predict
service's segments (``streaming.stream_outputs``: the gRPC path's limits, checks, batching and
segments), and keeps each row's ``Completion``. ``echo`` with ``logprobs`` scores the prompt with ``step``.
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
from keras_charrnn.serving.openai_schema import ApiError, CompletionRequest
from keras_charrnn.serving.servicers import SEGMENT_CHARS, PredictionServicer
from keras_charrnn.serving.streaming import DEFAULT_STREAM_SEGMENT, stream_outputs
from keras_charrnn.serving.signature_runner import SignatureCall
from keras_charrnn.serving.version_loader import LoadedVersion

__all__ = ["SIGNATURE", "Generation", "ModelFacts", "Scores", "Start", "model_facts", "model_spec"]

SIGNATURE = "generate_text_v2"
Scores = tuple[list, list | None]  # per character: its log-probability (None: none), and its alternatives
SCORE_BYTES, ALTERNATIVE_BYTES = 48, 32  # about what one character's score, and one alternative, take in JSON
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


class Generation:
    """The rows of one ``/v1/completions`` call, generated segment by segment, and the choices they make."""

    def __init__(
        self,
        prediction: PredictionServicer,
        request: CompletionRequest,
        call: SignatureCall,
        start: Start,
        timeout_s: float | None = None,
    ):
        self.prediction, self.request, self.call, self.start = prediction, request, call, start
        self.facts = model_facts(call.loaded)
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # characters a stream holds back
        rows, asked = request.rows, request.logprobs
        self.acc = [
            Completion("", "length", None, 0, None if asked is None else [], [] if asked else None, r)
            for r in range(rows)
        ]
        self.carry: list[dict[str, Any]] = [{} for _ in range(rows)]
        self._check_answer_size()
        self.inputs = self._inputs()

    def _check_answer_size(self) -> None:
        """Refuses, before any work, scores whose answer would outgrow the server's ``max_message_bytes``."""
        request, limit = self.request, self.prediction.max_message_bytes
        if request.logprobs is None:
            return  # text alone: at most rows x max_tokens x 4 bytes, within the limits
        chars = request.rows * request.max_tokens + (sum(map(len, request.prompts)) * request.n if request.echo else 0)
        size = chars * (SCORE_BYTES + ALTERNATIVE_BYTES * request.logprobs)
        if size > limit:
            raise ApiError(
                400,
                f"scores of {chars} characters with {request.logprobs} alternatives would take about {size} bytes, "
                f"over this server's limit max_message_bytes={limit}; ask for fewer choices, characters or "
                f"alternatives",
                "logprobs",
                "limit_exceeded",
            )

    def prompt(self, row: int) -> str:
        """The prompt of a row (``n`` rows per prompt)."""
        return self.request.prompts[row // self.request.n]

    def _inputs(self) -> dict[str, np.ndarray]:
        """The first call's inputs: every row primed with its prompt, its seed, the request's controls."""
        request, facts, start = self.request, self.facts, self.start
        rows = request.rows
        ctx = context(len(facts.vocabulary), self.prediction.limits.advertised())
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
        """Generates the rows through the Predict service's own segments; yields the rows each segment moved.

        The call runs as a stream (``streaming.stream_outputs``: the gRPC path's checks, limits,
        batching and segments, a segment per model run); each row's ``Completion`` grows by its
        segments, and its continuation (states, next prime, position, stop tail) follows
        ``generation.continue_rows``.
        """
        current = dict(self.inputs)
        vocabulary, states = list(self.facts.vocabulary), list(self.facts.state_names)
        size = DEFAULT_STREAM_SEGMENT if self.request.stream else SEGMENT_CHARS
        left, active = self.request.max_tokens, np.arange(self.request.rows)
        while left > 0 and active.size:  # calls of at most the server's max_chars_per_call, as a session makes
            take = min(left, self.prediction.limits.max_chars_per_call)
            call = {k: v[active] for k, v in current.items()}
            call["num_chars"] = np.full(active.size, take, np.int32)
            inputs = self.call.check_arrays(call, self.prediction.limits)
            for outputs in stream_outputs(self.prediction, self.call, inputs, set(), self.deadline, None, size):
                rows = active[outputs["row_index"]]
                before = {k: v[rows] for k, v in current.items()}
                results = completions(outputs, before, vocabulary)
                following = continue_rows(before, outputs, states)
                for j, row in enumerate(rows):
                    self.acc[row] = self.acc[row].extend(results[j])
                    self.carry[row] = {k: following[k][j] for k in ("prime", "position", "stop_tail", *states)}
                    for key, value in following.items():
                        if key != "num_chars":
                            current[key][row] = value[j]
                yield [int(r) for r in rows]
            left -= take
            active = np.array([r for r in active if self.acc[r].finish_reason != "stop"], np.int64)

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
        step = self.prediction.signature_call(model_spec(self.call.loaded.name, self.call.loaded.version), "step")
        vocabulary = self.facts.vocabulary
        scores: list[Scores | None] = []
        for prompt in self.request.prompts:
            text = self.start.pending + prompt
            skip = len(self.start.pending)
            if not prompt:
                scores.append(([], None if k == 0 else []))
                continue
            ids = self.facts.ids(text)
            logp = self._log_probabilities(step, ids)
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

    def _log_probabilities(self, step: SignatureCall, ids: np.ndarray) -> np.ndarray:
        """The model's log-probabilities [T, V] after each of ``ids`` (from the row's start), by ``step`` calls.

        The text is fed in windows whose logits fit the server's ``max_message_bytes`` (states carried),
        so any prompt within ``max_prime_chars`` is scored.
        """
        vocab = len(self.facts.vocabulary)
        window = max(1, self.prediction.max_message_bytes // (8 * vocab))
        states = {name: self.start.state(name, self.facts.state_size) for name in self.facts.state_names}
        pieces = []
        for begin in range(0, ids.size, window):
            inputs = {"ids": ids[None, begin : begin + window], **states}
            outputs = self.prediction.predict_arrays(step, inputs, timeout=self._time_left())
            states = {name: np.asarray(outputs[name], np.float32) for name in self.facts.state_names}
            logits = np.asarray(outputs["logits"], np.float32)[0]
            shifted = logits - logits.max(axis=-1, keepdims=True)
            pieces.append(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))  # float32, as the graph's
        return np.concatenate(pieces)

    def usage(self) -> dict[str, int]:
        """Characters: the prompts' (once each), the generated ones (stops included), and both."""
        prompt = sum(len(p) for p in self.request.prompts)
        completion = sum(a.num_chars for a in self.acc)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def model_spec(name: str, version: int | None = None, label: str | None = None):
    spec = predict_pb2.PredictRequest().model_spec
    spec.name = name
    if version is not None:
        spec.version.value = version
    if label:
        spec.version_label = label
    return spec
