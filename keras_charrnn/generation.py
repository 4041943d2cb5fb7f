"""The generation inputs and results: one table of every input of the generate signatures, and one continuation rule.

Every surface reads this module: the Python parameters (``SamplingParams``), the
session's requests, the server's per-call checks (``serving.limits``), the
graph's checks (``generation_graph``), the warm-up records, the REST/JSON field
names, the CLI flags and the playground (``schema_json``). Adding an input
touches ``INPUTS``, the graph, and a test.

Two generations of signatures share the table (``Input.since``):

* ``generate`` / ``generate_text`` (release 0.2): ``num_chars``, ``temperature``,
  ``top_k``, ``top_p``, ``seed``, ``position``;
* ``generate_v2`` / ``generate_text_v2`` (0.3): the same, plus ``min_p``,
  ``logit_bias``, ``stop``, ``stop_tail``, ``min_chars`` and ``logprobs``, and
  per-row results (``num_generated``, ``finish_reason``, ``stop_index``,
  ``char_logprobs``, ``top_ids``, ``top_logprobs``).

The old signatures stay in every export, unchanged, so clients written for 0.2
(and TF Serving, which refuses a request missing an input) keep working.

Pure Python and NumPy (no TensorFlow), so the light gRPC client imports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ----- the defaults and caps (a model's graph enforces the caps; a server may lower them) ---------------------

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 0  # 0: every character is a candidate
DEFAULT_TOP_P = 1.0  # 1: no nucleus cut
DEFAULT_MIN_P = 0.0  # 0: no floor
DEFAULT_PRIME = "\n"  # the text a session starts from when none is given
DEFAULT_CHUNK = 64  # characters per model call when streaming
MAX_CHARS_PER_CALL = 4096  # the most characters one generate call may ask for
MAX_STOPS = 4  # stop strings per row
MAX_STOP_CHARS = 32  # characters per stop string
MAX_LOGPROBS = 10  # alternatives per character (``logprobs``)
MAX_SAMPLES = 128  # samples of one ``samples`` call (split into calls of ``max_rows_per_call``)
BIAS_BAN = -100.0  # a ``logit_bias`` of this value bans the character; values lie in [-100, 100]
LOGPROBS_OFF = -1  # ``logprobs`` of a row that asks for no scores

PLAIN_SIGNATURES = ("generate", "generate_text")  # release 0.2's
CONTROLLED_SIGNATURES = ("generate_v2", "generate_text_v2")  # with stops, bias, min_p, scores
SIGNATURE_VERSION = {"generate": 1, "generate_text": 1, "generate_v2": 2, "generate_text_v2": 2}
FINISH_REASONS = ("length", "stop")  # finish_reason of a row: its num_chars reached, or a stop string matched


def controlled(signature: str) -> str:
    """The generation-controls twin of a 0.2 generate signature (``generate_text`` -> ``generate_text_v2``)."""
    return signature if signature.endswith("_v2") else signature + "_v2"


# ----- the table --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One per-row input of the generate signatures.

    Args:
        name: the tensor's name (also the REST/JSON field and the saved session's field).
        dtype: NumPy dtype name of the tensor (``object``: UTF-8 strings).
        row_shape: the shape of one row: ``()``, ``("stops",)`` (up to ``max_stops``), ``("vocab",)``.
        default: a row's value when the caller gives none (None for ``seed``: drawn at random).
        rule: ``rule(values, context)`` -> a boolean array, True where a value is acceptable
            (NumPy here; the graph runs the same expression on tensors, see ``generation_graph``).
        message: the rule's error message (``{vocab}``, ``{max}`` filled from the context).
        limit: the server limit (``ServingLimits`` field and ``charrnn serve`` flag) that bounds it.
        flag: the ``charrnn sample`` flag that sets it.
        since: 1 for release 0.2's signatures (and the new ones), 2 for the new ones only.
        carry: how a session's next call gets it from this one (``continue_rows``): ``keep``,
            ``advance`` (plus the characters generated), ``countdown`` (minus them, down to 0),
            ``tail`` (the last characters generated since the last feed, for stops across calls).
        help: one line for the CLI and the docs.
    """

    name: str
    dtype: str
    row_shape: tuple[str, ...]
    default: Any
    rule: Callable[[np.ndarray, Mapping[str, int]], np.ndarray] | None
    message: str
    limit: str | None
    flag: str | None
    since: int
    carry: str
    help: str

    def message_for(self, context: Mapping[str, int]) -> str:
        """The rule's message with the context's numbers filled in."""
        return self.message.format(vocab=context.get("vocab_size", 0) - 1, **context)

    def column(self, rows: int, context: Mapping[str, int], value: Any = None) -> np.ndarray:
        """``rows`` copies of ``value`` (the default when None) as this input's array."""
        value = self.default if value is None else value
        if self.row_shape == ("vocab",):
            row = np.zeros(context["vocab_size"], np.float32) if value is None else np.asarray(value, np.float32)
            return np.repeat(row[None, :], rows, axis=0)
        if self.row_shape == ("stops",):
            stops = [s.encode("utf-8") if isinstance(s, str) else s for s in value]
            return np.array([stops] * rows, dtype=object).reshape(rows, len(stops))
        if self.dtype == "object":
            return np.array([value.encode("utf-8") if isinstance(value, str) else value] * rows, dtype=object)
        return np.full([rows], value, self.dtype)


def _finite(x):
    """True where ``x`` is finite; operators only, so the graph runs the same rule on tensors."""
    return (x == x) & (x < float("inf")) & (x > -float("inf"))  # noqa: PLR0124 (x != x for NaN)


INPUTS: tuple[Input, ...] = (
    Input(
        "num_chars", "int32", (), DEFAULT_CHUNK,
        lambda x, c: (x >= 1) & (x <= c["max_chars_per_call"]),
        "num_chars must be at least 1 and at most {max_chars_per_call} per call",
        "max_chars_per_call", "--num-chars", 1, "keep",
        "characters to generate (a stop may end a row sooner)",
    ),
    Input(
        "temperature", "float32", (), DEFAULT_TEMPERATURE,
        lambda x, c: _finite(x) & (x >= 0),
        "temperature must be 0 (greedy) or positive (and finite)",
        None, "--temperature", 1, "keep",
        "0 picks the most likely character; higher is more varied",
    ),
    Input(
        "top_k", "int32", (), DEFAULT_TOP_K,
        lambda x, c: (x >= 0) & (x <= c["vocab_size"] - 1),
        "top_k must be 0 (off) or positive, at most the vocabulary size ({vocab})",
        None, "--top-k", 1, "keep",
        "sample among the k most likely characters (0: all)",
    ),
    Input(
        "top_p", "float32", (), DEFAULT_TOP_P,
        lambda x, c: (x > 0) & (x <= 1),
        "top_p must be in (0, 1]",
        None, "--top-p", 1, "keep",
        "sample among the most likely characters whose mass reaches p (1: all)",
    ),
    Input(
        "seed", "int64", (), None, None, "", None, "--seed", 1, "keep",
        "makes the text reproducible (with position, it keys each character's randomness)",
    ),
    Input(
        "position", "int64", (), 0,
        lambda x, c: x >= 0,
        "position must be 0 or more",
        None, None, 1, "advance",
        "characters the session has generated before this call",
    ),
    Input(
        "min_p", "float32", (), DEFAULT_MIN_P,
        lambda x, c: (x >= 0) & (x <= 1),
        "min_p must be in [0, 1]",
        None, "--min-p", 2, "keep",
        "drop characters less likely than min_p times the most likely one (0: off)",
    ),
    Input(
        "logit_bias", "float32", ("vocab",), None,
        lambda x, c: _finite(x) & (x >= BIAS_BAN) & (x <= -BIAS_BAN),
        "logit_bias values must be finite, in [-100, 100] (-100 bans the character)",
        None, "--bias", 2, "keep",
        "added to each character's logit (by id); -100 bans it",
    ),
    Input(
        "stop", "object", ("stops",), (),
        None,  # checked as strings: see check_rows
        "stop: up to {max_stops} strings per row, each at most {max_stop_chars} characters of the vocabulary",
        "max_stops", "--stop", 2, "keep",
        "a row ends once its text generated since the last prime or feed ends with one of these",
    ),
    Input(
        "stop_tail", "object", (), "",
        None,
        "stop_tail: at most {max_stop_chars} characters",
        "max_stop_chars", None, 2, "tail",
        "the text generated since the last prime or feed, its last characters: stops match across calls",
    ),
    Input(
        "min_chars", "int32", (), 0,
        lambda x, c: (x >= 0) & (x <= MAX_CHARS_PER_CALL * 1024),
        "min_chars must be 0 or more",
        None, "--min-chars", 2, "countdown",
        "a stop cannot end a row before this many characters since the last prime or feed",
    ),
    Input(
        "logprobs", "int32", (), LOGPROBS_OFF,
        lambda x, c: (x >= LOGPROBS_OFF) & (x <= c["max_logprobs"]),
        "logprobs must be -1 (no scores), 0 (each character's log-probability) or up to {max_logprobs} "
        "(also that many alternatives)",
        "max_logprobs", "--logprobs", 2, "keep",
        "-1: no scores; 0: each character's log-probability; N: also the N most likely alternatives",
    ),
)  # fmt: skip

BY_NAME: dict[str, Input] = {i.name: i for i in INPUTS}
SAMPLING_NAMES: tuple[str, ...] = tuple(i.name for i in INPUTS)  # every generation input but the text and states


def inputs_of(signature: str) -> tuple[Input, ...]:
    """The generation inputs (besides ``prime``/``ids`` and the states) of a generate signature.

    Args:
        signature: ``generate``, ``generate_text``, their ``_v2`` twins or their ``_xla`` twins.

    Returns:
        The table's rows the signature takes, in table order.
    """
    version = 2 if "_v2" in signature else 1
    return tuple(i for i in INPUTS if i.since <= version)


def context(vocab_size: int, limits: Mapping[str, int] | None = None) -> dict[str, int]:
    """The numbers the rules and messages read: the model's vocabulary and the caps (a server's limits if lower).

    Args:
        vocab_size: ids of the model, id 0 (unknown) included.
        limits: a server's limits by name (``max_chars_per_call``, ``max_stops``, ...); missing ones: the caps.

    Returns:
        ``{"vocab_size", "max_chars_per_call", "max_stops", "max_stop_chars", "max_logprobs"}``.
    """
    limits = dict(limits or {})
    return {
        "vocab_size": vocab_size,
        "max_chars_per_call": min(limits.get("max_chars_per_call", MAX_CHARS_PER_CALL), MAX_CHARS_PER_CALL),
        "max_stops": min(limits.get("max_stops", MAX_STOPS), MAX_STOPS),
        "max_stop_chars": min(limits.get("max_stop_chars", MAX_STOP_CHARS), MAX_STOP_CHARS),
        "max_logprobs": min(limits.get("max_logprobs", MAX_LOGPROBS), MAX_LOGPROBS, max(vocab_size - 1, 0)),
    }


class RuleError(ValueError):
    """A generation input breaks its rule; ``input`` names it, ``limit`` the server limit it is over (or None)."""

    def __init__(self, message: str, input_name: str, limit: str | None = None):
        super().__init__(message)
        self.message, self.input, self.limit = message, input_name, limit


def check_rows(arrays: Mapping[str, np.ndarray], ctx: Mapping[str, int], vocab: Sequence[str] | None = None) -> None:
    """Checks every generation input present in ``arrays`` against its rule (what the graph checks, and the limits).

    Args:
        arrays: a call's inputs by name (one row per row of the call).
        ctx: ``context(...)``.
        vocab: the model's characters in id order, id 0 first (None: stop characters unchecked).

    Raises:
        RuleError: the first input that breaks its rule (its message names the input and the rule).
    """
    for spec in INPUTS:
        if spec.name not in arrays or spec.rule is None:
            continue
        values = np.asarray(arrays[spec.name])
        if spec.row_shape == ("vocab",):
            if values.ndim != 2 or values.shape[1] != ctx["vocab_size"]:
                raise RuleError(
                    f"logit_bias must hold one value per vocabulary id ({ctx['vocab_size']} per row), "
                    f"got shape {list(values.shape)}",
                    spec.name,
                )
            if values.size and (values[:, 1:] <= BIAS_BAN).all(axis=1).any():
                raise RuleError("logit_bias bans every character of a row: nothing could be sampled", spec.name)
        with np.errstate(invalid="ignore"):
            ok = spec.rule(values, ctx)
        if values.size and not np.all(ok):
            over = spec.limit is not None and spec.name in ("num_chars", "logprobs") and values.max() > ctx[spec.limit]
            raise RuleError(spec.message_for(ctx), spec.name, spec.limit if over else None)
    if "stop" in arrays:
        stop = np.asarray(arrays["stop"], dtype=object)
        if stop.ndim != 2:
            raise RuleError(f"stop must hold a list of strings per row, got shape {list(stop.shape)}", "stop")
        if stop.shape[1] > ctx["max_stops"]:
            raise RuleError(
                f"stop holds {stop.shape[1]} strings per row, over the limit max_stops={ctx['max_stops']}",
                "stop",
                "max_stops",
            )
        known = set(vocab[1:]) if vocab is not None else None
        for value in stop.reshape(-1):
            text = _text(value)
            if len(text) > ctx["max_stop_chars"]:
                raise RuleError(
                    f"a stop string holds {len(text)} characters, over the limit max_stop_chars="
                    f"{ctx['max_stop_chars']}",
                    "stop",
                    "max_stop_chars",
                )
            if known is not None and not set(text) <= known:
                missing = "".join(sorted(set(text) - known))
                raise RuleError(
                    f"stop string {text!r} holds characters outside the model's vocabulary ({missing!r}): "
                    f"it could never match",
                    "stop",
                )
    if "stop_tail" in arrays:
        for value in np.asarray(arrays["stop_tail"], dtype=object).reshape(-1):
            if len(_text(value)) > MAX_STOP_CHARS:
                raise RuleError(BY_NAME["stop_tail"].message_for(ctx), "stop_tail", "max_stop_chars")


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# ----- per-row results ------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One row's result: its text, why it ended, and (when asked) each character's score.

    The shape a stream's last message and an OpenAI-style choice carry unchanged.

    Args:
        text: the characters generated (a matched stop string included).
        finish_reason: ``"length"`` (its ``num_chars`` reached) or ``"stop"``.
        stop: the stop string that matched (None for ``"length"``).
        num_chars: characters generated (``len(text)``).
        logprobs: each character's natural-log probability under the model (temperature 1,
            before top-k/top-p/min-p/bias: what ``score`` measures); None unless asked.
        top_logprobs: per character, the most likely alternatives ``{char: logprob}``; None unless asked.
        index: the sample's index (``samples``; 0 otherwise).
        seed: the seed that made it.

    Example:

    >>> c = Completion("ab\\n", "stop", "\\n", 3)
    >>> c.text_without_stop
    'ab'
    """

    text: str
    finish_reason: str
    stop: str | None
    num_chars: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None
    index: int = 0
    seed: int | None = None
    session: Any = field(default=None, repr=False, compare=False)  # the sample's own session (``samples``)

    @property
    def text_without_stop(self) -> str:
        """``text`` without the stop string that ended it."""
        return self.text[: len(self.text) - len(self.stop)] if self.finish_reason == "stop" and self.stop else self.text

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record (no session)."""
        record = {
            "index": self.index,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stop": self.stop,
            "num_chars": self.num_chars,
            "seed": self.seed,
        }
        if self.logprobs is not None:
            record["logprobs"] = self.logprobs
        if self.top_logprobs is not None:
            record["top_logprobs"] = self.top_logprobs
        return record

    def extend(self, more: Completion) -> Completion:
        """This result followed by ``more`` (the next call's, of the same row)."""
        join = lambda a, b: None if a is None or b is None else a + b  # noqa: E731
        return Completion(
            self.text + more.text,
            more.finish_reason,
            more.stop,
            self.num_chars + more.num_chars,
            join(self.logprobs, more.logprobs),
            join(self.top_logprobs, more.top_logprobs),
            self.index,
            self.seed,
            self.session,
        )


def completions(
    outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray], vocab: Sequence[str] | None
) -> list[Completion]:
    """Per-row results of one call of a generate signature (0.2's or the controlled one).

    Args:
        outputs: the call's outputs (``text`` or ``ids``; ``num_generated``, ``finish_reason``,
            ``stop_index``, scores when the signature has them).
        inputs: the call's inputs (``num_chars``, ``stop``, ``logprobs``).
        vocab: the characters in id order, id 0 first (for ``ids`` and the alternatives).

    Returns:
        One ``Completion`` per row.
    """
    num_chars = np.asarray(inputs["num_chars"]).reshape(-1)
    rows = num_chars.shape[0]
    counts = np.asarray(outputs["num_generated"]).reshape(-1) if "num_generated" in outputs else num_chars
    stop_index = np.asarray(outputs.get("stop_index", np.full(rows, -1))).reshape(-1)
    asked = np.asarray(inputs.get("logprobs", np.full(rows, LOGPROBS_OFF))).reshape(-1)
    results = []
    for r in range(rows):
        n = int(counts[r])
        if "text" in outputs:
            text = _text(np.asarray(outputs["text"]).reshape(-1)[r])
        else:
            ids = np.asarray(outputs["ids"])[r, :n]
            text = "".join(vocab[int(i)] for i in ids) if vocab is not None else ""
        s = int(stop_index[r])
        stop = _text(np.asarray(inputs["stop"])[r, s]) if s >= 0 else None
        logprobs = top = None
        if asked[r] >= 0 and "char_logprobs" in outputs:
            logprobs = [float(v) for v in np.asarray(outputs["char_logprobs"])[r, :n]]
            k = int(asked[r])
            if k > 0 and vocab is not None:
                ids, values = np.asarray(outputs["top_ids"])[r, :n, :k], np.asarray(outputs["top_logprobs"])[r, :n, :k]
                top = [{vocab[int(i)]: float(v) for i, v in zip(ids[t], values[t])} for t in range(n)]
        results.append(Completion(text, "stop" if s >= 0 else "length", stop, n, logprobs, top))
    return results


# ----- the continuation rule ------------------------------------------------------------------------------


def continue_rows(
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    state_names: Sequence[str],
    vocab: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The next call's inputs after one generate call: feed the last character, carry the states, advance.

    The one continuation rule of the session, the server's segmented generation and (in
    JavaScript, from ``schema_json``'s ``carry``) the playground: the next call's text is
    the last character generated (the model has not fed it yet); the states are the ones
    returned; ``position`` advances and ``min_chars`` counts down by the characters
    generated; ``stop_tail`` keeps the last characters generated since the last feed (empty
    after a stop, so matching starts again after it); everything else stays.

    Args:
        inputs: the call's inputs (``prime`` or ``ids``, states, generation inputs).
        outputs: its outputs.
        state_names: the model's state tensors (from its exported config).
        vocab: the characters in id order, id 0 first: the ``stop_tail`` of a call that answers
            ``ids`` (None: the tail is carried for ``text`` answers only).

    Returns:
        The next call's inputs (``num_chars`` as in this call: the caller sets it).
    """
    rows = np.asarray(inputs["num_chars"]).shape[0]
    counts = np.asarray(outputs.get("num_generated", inputs["num_chars"])).reshape(-1).astype(np.int64)
    stopped = np.asarray(outputs.get("stop_index", np.full(rows, -1))).reshape(-1) >= 0
    nxt: dict[str, np.ndarray] = {k: np.array(v, copy=True) for k, v in inputs.items()}
    for name in state_names:
        nxt[name] = np.asarray(outputs[name], np.float32)
    texts: list[str] | None = None
    if "text" in outputs:
        texts = [_text(t) for t in np.asarray(outputs["text"]).reshape(-1)]
        nxt["prime"] = np.array([t[-1:].encode("utf-8") for t in texts], dtype=object)
    else:
        ids = np.asarray(outputs["ids"])
        if vocab is not None:
            texts = ["".join(vocab[int(i)] for i in ids[r, : counts[r]]) for r in range(rows)]
        nxt["ids"] = ids[np.arange(rows), np.maximum(counts - 1, 0)].astype(np.int32)[:, None]
    for spec in INPUTS:
        if spec.name not in nxt:
            continue
        if spec.carry == "advance":
            nxt[spec.name] = (np.asarray(inputs[spec.name]) + counts).astype(spec.dtype)
        elif spec.carry == "countdown":
            nxt[spec.name] = np.maximum(np.asarray(inputs[spec.name]) - counts, 0).astype(spec.dtype)
        elif spec.carry == "tail" and texts is not None:
            tails = [
                "" if stopped[r] else (_text(inputs[spec.name][r]) + texts[r])[-(MAX_STOP_CHARS - 1) :]
                for r in range(rows)
            ]
            nxt[spec.name] = np.array([t.encode("utf-8") for t in tails], dtype=object)
    return nxt


def next_segment_size(size: int, cap: int) -> int:
    """The size of a growing stream's next segment: twice the last, up to ``cap`` (never below the last).

    The server's stream (``serving.segments.segments(grow=True)``) and a session reading it
    (``Session.stream_completions``) follow this one schedule.
    """
    return min(2 * size, max(cap, size))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a ``samples`` call made with ``seed``: sample 0 keeps ``seed``.

    Sample i > 0 takes SplitMix64's finaliser of ``seed + i * 0x9E3779B97F4A7C15`` (mod 2**64),
    its top 63 bits: distinct, well mixed, and computable alone, so sample i is reproduced by a
    plain session with this seed.

    Args:
        seed: the session's seed (int64).
        index: the sample's index, 0 or more.

    Returns:
        A non-negative int64 seed.

    Example:

    >>> sample_seed(1, 0)
    1
    """
    if index == 0:
        return seed
    mask = (1 << 64) - 1
    x = (seed + index * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


def schema_json() -> str:
    """The table as JSON for the playground and the docs: names, dtypes, defaults, carry rules, flags, help."""
    rows = [
        {
            "name": i.name,
            "dtype": "string" if i.dtype == "object" else i.dtype,
            "row_shape": list(i.row_shape),
            "default": list(i.default) if isinstance(i.default, tuple) else i.default,
            "since": i.since,
            "carry": i.carry,
            "flag": i.flag,
            "limit": i.limit,
            "help": i.help,
        }
        for i in INPUTS
    ]
    return json.dumps(
        {
            "inputs": rows,
            "max_stops": MAX_STOPS,
            "max_stop_chars": MAX_STOP_CHARS,
            "max_logprobs": MAX_LOGPROBS,
            "bias_ban": BIAS_BAN,
        }
    )
