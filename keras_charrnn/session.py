"""A sampling session: the caller's side of a stateless model, holding the hidden state.

The exported model keeps no state between calls. A ``Session`` holds every
layer's hidden state, the number of characters sampled so far (the
``position`` that keys the randomness) and the text still to be fed (the prime,
the last sampled character, and anything the user typed). Each call sends
them to the model's ``generate_text`` signature and keeps what comes back, so
the text continues where it left off and a seeded session produces the same
text however its calls are chunked.

The same class serves in-process models (``keras_charrnn.load``) and model
servers over gRPC (``keras_charrnn.serving.SamplingClient``): they differ only
in the ``Runner`` that executes a signature. This module needs NumPy only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Mapping

import numpy as np

from keras_charrnn.errors import CharRNNError, ConfigError, InputError
from keras_charrnn.generation import (
    BIAS_BAN,
    LOGPROBS_OFF,
    MAX_SAMPLES,
    MAX_STOP_CHARS,
    Completion,
    RuleError,
    check_rows,
    completions,
    continue_rows,
    inputs_of,
    next_segment_size,
    sample_seed,
)
from keras_charrnn.model_info import ModelInfo, Runner
from keras_charrnn.sampling import DEFAULT_CHUNK, SamplingParams

__all__ = ["ModelInfo", "Runner", "Session"]

log = logging.getLogger("charrnn")


class Session:
    """A stream of generated text that continues from call to call.

    A session is pinned to the version its ``info`` describes (``info.version``; None:
    whichever answers, then that one): its hidden state belongs to those weights. With stop
    strings (``params.stop``), a call ends at the first one; the session is then exactly where
    a session that generated that text and nothing more would be, so ``feed`` and the next
    call continue from the right place.

    Args:
        runner: executes signatures (in-process or over gRPC).
        info: the model's state names and limits.
        prime: text that starts the session (at least one character).
        params: temperature, top-k, top-p, seed, min-p, bias, stops and ``min_chars``.

    Example:

    >>> model = keras_charrnn.load("saved_models/shakespeare")  # doctest: +SKIP
    >>> s = model.session(prime="ROMEO:", seed=1)               # doctest: +SKIP
    >>> s.generate(100) + s.generate(100)  # == model.generate("ROMEO:", 200, seed=1)  # doctest: +SKIP
    >>> s.complete(500, stop=["\\n\\n"]).finish_reason           # doctest: +SKIP
    'stop'
    """

    def __init__(self, runner: Runner, info: ModelInfo, prime: str, params: SamplingParams):
        if not prime:
            raise ConfigError("prime must hold at least one character")
        if params.top_k > info.vocab_size - 1:
            raise ConfigError(f"top_k must be at most the vocabulary size ({info.vocab_size - 1}), got {params.top_k}")
        if params.controlled:
            info.require_controls("stop, min_chars, min_p or bias")
        self.runner = runner
        self.info = info
        self.params = params
        self._bias_row = _bias_row(params.bias, info) if params.bias else None  # checked now, not at the first call
        if params.stop:
            try:
                check_rows({"stop": np.array([params.stop], dtype=object)}, info.context(), info.vocabulary)
            except RuleError as exc:
                raise ConfigError(exc.message) from None
        self.states = {n: np.zeros((1, info.state_size), np.float32) for n in info.state_names}
        self.pending = prime
        self.position = 0
        self.tail = ""  # the last characters generated since the last prime or feed: stops match across calls
        self.min_chars_left = params.min_chars  # counts down from the last prime or feed
        self.version: int | None = info.version  # pinned to the version its facts came from
        self.last: Completion | None = None  # the result of the last generate, complete or stream

    def generate(self, n: int, strip_stop: bool = False) -> str:
        """Returns the next ``n`` characters, or fewer if a stop string ends them (in calls of at most
        ``max_chars_per_call``).

        Args:
            n: the most characters to generate.
            strip_stop: leave the matched stop string out of the text (the state is past it either way).

        Returns:
            The text (``self.last`` holds its finish reason).
        """
        result = self.complete(n)
        return result.text_without_stop if strip_stop else result.text

    def complete(self, n: int, logprobs: int = LOGPROBS_OFF) -> Completion:
        """Generates up to ``n`` characters; returns them with why they ended and, if asked, their scores.

        Args:
            n: the most characters to generate.
            logprobs: -1: no scores; 0: each character's log-probability; 1..10: also that many
                of the most likely alternatives.

        Returns:
            The ``Completion`` (text, finish reason, matched stop, count, scores).
        """
        self._check_call(n, logprobs)
        result = None
        for piece in self._chained(n, self.info.max_chars_per_call, logprobs):  # unary calls: no stream needed
            result = piece if result is None else result.extend(piece)
        assert result is not None
        self.last = result
        return result

    def stream(self, n: int, chunk: int = DEFAULT_CHUNK) -> Iterator[str]:
        """Yields the next ``n`` characters, ``chunk`` at a time, ending early at a stop string.

        A chunk over the model's or the server's ``max_chars_per_call`` is made of
        several calls; the text is the same however it is chunked. From a server that streams
        (``charrnn serve``), pieces are its segments: ``chunk`` characters first, then each twice
        the last, up to 256.
        """
        for piece in self.stream_completions(n, chunk):
            yield piece.text

    def stream_completions(
        self, n: int, chunk: int = DEFAULT_CHUNK, logprobs: int = LOGPROBS_OFF
    ) -> Iterator[Completion]:
        """Like ``stream``, yielding each chunk's ``Completion`` (the last one's ``finish_reason`` is the call's).

        Args:
            n: the most characters to generate.
            chunk: characters per piece.
            logprobs: as in ``complete``.

        Yields:
            One ``Completion`` per chunk.
        """
        self._check_call(n, logprobs)
        if chunk < 1:
            raise ConfigError(f"chunk must be at least 1, got {chunk}")
        stream = getattr(self.runner, "stream", None)
        if stream is not None and self.info.limits.get("max_concurrent_streams", 0) > 0:
            segment = self.info.limits.get("segment_chars", 0)
            if 1 <= chunk <= segment:  # the server's stream sends segments of the chunk's size
                yield from self._streamed(n, chunk, logprobs, stream)
                return
        yield from self._chained(n, chunk, logprobs)

    def _chained(self, n: int, chunk: int, logprobs: int, total: Completion | None = None) -> Iterator[Completion]:
        """``stream_completions`` by chained calls of at most ``max_chars_per_call`` (any model, any server)."""
        left = n
        while left:
            take, piece = min(chunk, left), None
            for done in range(0, take, self.info.max_chars_per_call):
                part = self._call(min(self.info.max_chars_per_call, take - done), logprobs)
                piece = part if piece is None else piece.extend(part)
                if part.finish_reason == "stop":
                    break
            assert piece is not None
            total = piece if total is None else total.extend(piece)  # what ``last`` reports
            self.last = total
            yield piece
            if piece.finish_reason == "stop":
                return
            left -= piece.num_chars

    def _streamed(self, n: int, chunk: int, logprobs: int, stream) -> Iterator[Completion]:
        """``stream_completions`` through the server's stream (``GenerationStream``): one piece per segment.

        The first segment holds ``chunk`` characters and each next one twice the last, up to the
        server's ``segment_chars`` (256): the first characters come soon, and a long call pays few
        model runs. Pieces are segments, so the session is always at the end of the text yielded.

        Every segment's response carries its states, so the session moves on segment by segment as
        after a unary call of that size (the continuation rule). If the stream breaks (a replica is
        lost), the rest comes from chained unary calls, which fail over: the text is the same.
        """
        left, total = n, None
        while left:
            call_left = min(self.info.max_chars_per_call, left)
            self._flush_pending()
            try:
                size = chunk  # the server's segments: chunk, then twice the last, up to its segment_chars
                for outputs, version in stream(self.signature, self._row(call_left, logprobs), self.version, chunk):
                    inputs = self._row(min(call_left, size), logprobs)  # this segment's inputs, as the server ran it
                    size = next_segment_size(size, self.info.limits.get("segment_chars", size))
                    self._answered_by(version)
                    piece = _advance([self], inputs, outputs)[0]
                    total = piece if total is None else total.extend(piece)
                    self.last = total
                    yield piece
                    if piece.finish_reason == "stop":
                        return
                    left -= piece.num_chars
                    call_left -= piece.num_chars
            except CharRNNError as exc:  # the stream broke: the session holds the last segment's state
                log.warning("model %s: the stream broke (%s); continuing by unary calls", self.info.name, exc)
                yield from self._chained(left, chunk, logprobs, total)
                return

    def samples(self, n: int, num_chars: int, logprobs: int = LOGPROBS_OFF) -> list[Completion]:
        """``n`` samples continuing this session, generated side by side as rows of the same calls.

        Sample i is this session forked with the seed ``generation.sample_seed(seed, i)``
        (sample 0 keeps the session's own seed, so it is the text ``generate`` would give);
        each is reproducible alone and continues as a session of its own (``.session``).
        This session does not move.

        Args:
            n: how many samples (1..128); calls hold at most ``max_rows_per_call`` rows.
            num_chars: the most characters of each.
            logprobs: as in ``complete``.

        Returns:
            One ``Completion`` per sample, in order, each with its ``index``, ``seed`` and ``session``.

        Example:

        >>> [c.text for c in model.session("ROMEO:", seed=1, stop="\\n").samples(3, 80)]  # doctest: +SKIP
        """
        if not 1 <= n <= MAX_SAMPLES:
            raise ConfigError(f"n (the number of samples) must be in 1..{MAX_SAMPLES}, got {n}")
        if num_chars < 1:
            raise ConfigError(f"num_chars must be at least 1, got {num_chars}")
        self._check_logprobs(logprobs)
        forks = []
        for i in range(n):
            fork = self.fork()
            fork.params = dataclasses.replace(self.params, seed=sample_seed(int(self.params.seed or 0), i))
            forks.append(fork)
        results: list[Completion | None] = [None] * n
        left = [num_chars] * n
        rows = max(1, int(self.info.limits.get("max_rows_per_call", 64)))
        active = list(range(n))
        while active:
            for start in range(0, len(active), rows):
                batch = active[start : start + rows]
                take = [min(self.info.max_chars_per_call, left[i]) for i in batch]
                for i, part in zip(batch, _call_rows([forks[i] for i in batch], take, logprobs)):
                    results[i] = part if results[i] is None else results[i].extend(part)  # type: ignore[union-attr]
                    left[i] = 0 if part.finish_reason == "stop" else left[i] - part.num_chars
            active = [i for i in active if left[i] > 0]
        done = []
        for i, (fork, result) in enumerate(zip(forks, results)):
            assert result is not None
            result.index, result.seed, result.session = i, fork.params.seed, fork
            fork.last = result
            done.append(result)
        return done

    def feed(self, text: str) -> None:
        """Pushes ``text`` into the state: the next characters continue after it (stops and ``min_chars``
        count from here)."""
        self.pending += text
        self.tail = ""
        self.min_chars_left = self.params.min_chars

    def _check_call(self, n: int, logprobs: int) -> None:
        """What ``complete`` and ``stream_completions`` check before any call: ``n`` and ``logprobs``."""
        if n < 1:
            raise ConfigError(f"n (the number of characters) must be at least 1, got {n}")
        self._check_logprobs(logprobs)

    def _check_logprobs(self, logprobs: int) -> None:
        if logprobs == LOGPROBS_OFF:
            return
        self.info.require_controls("scores (logprobs)")
        top = self.info.context()["max_logprobs"]
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not LOGPROBS_OFF <= logprobs <= top:
            raise ConfigError(f"logprobs must be -1 (off), 0 or up to {top} alternatives, got {logprobs!r}")

    @property
    def signature(self) -> str:
        """The signature this session calls: ``generate_text_v2`` when the model has it, else ``generate_text``."""
        return "generate_text_v2" if self.info.controlled else "generate_text"

    def _row(self, n: int, logprobs: int) -> dict[str, np.ndarray]:
        """This session's row of a call: its pending text, states and generation inputs."""
        p = self.params
        values = {
            "num_chars": n,
            "temperature": p.temperature,
            "top_k": p.top_k,
            "top_p": p.top_p,
            "seed": p.seed,
            "position": self.position,
            "min_p": p.min_p,
            "logit_bias": self._bias_row,
            "stop": p.stop,
            "stop_tail": self.tail,
            "min_chars": self.min_chars_left,
            "logprobs": logprobs,
        }
        ctx = self.info.context()
        row = {"prime": np.array([self.pending.encode("utf-8")], dtype=object), **self.states}
        for spec in inputs_of(self.signature):
            row[spec.name] = spec.column(1, ctx, values[spec.name])
        return row

    def _flush_pending(self) -> None:
        """Feeds pending text longer than the server's ``max_prime_chars`` in pieces it accepts."""
        limit = self.info.max_prime_chars
        while limit and len(self.pending) > limit:
            # A call samples one character it does not feed, so its states are those after the piece
            # alone; that sample is dropped (the position does not move).
            row = self._row(1, LOGPROBS_OFF)
            row["prime"] = np.array([self.pending[:limit].encode("utf-8")], dtype=object)
            outputs = self._run(row)
            self.states = {name: np.asarray(outputs[name], np.float32) for name in self.info.state_names}
            self.pending = self.pending[limit:]

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of this session's signature; keeps the version that answered."""
        outputs, version = self.runner.run(self.signature, inputs, self.version)
        self._answered_by(version)
        return outputs

    def _answered_by(self, version: int | None) -> None:
        """Pins the session to the version that answered (its facts, if they differ)."""
        if version is not None:
            if version != self.info.version:
                self.info = self.runner.model_info(version)  # the facts of the version that answered
            self.version = version

    def _call(self, n: int, logprobs: int = LOGPROBS_OFF) -> Completion:
        return _call_rows([self], [n], logprobs)[0]

    def fork(self) -> Session:
        """An independent copy: both continue identically from here unless fed differently."""
        return Session.from_json(self.to_json(), self.runner, self.info)

    def to_json(self) -> str:
        """Everything needed to continue this session later, elsewhere (JSON)."""
        p = self.params
        return json.dumps(
            {
                "model": self.info.name,
                "version": self.version,
                "position": self.position,
                "pending": self.pending,
                "temperature": p.temperature,
                "top_k": p.top_k,
                "top_p": p.top_p,
                "seed": p.seed,
                "states": {k: v.reshape(-1).tolist() for k, v in self.states.items()},
                "min_p": p.min_p,
                "bias": dict(p.bias),
                "stop": list(p.stop),
                "min_chars": p.min_chars,
                "stop_tail": self.tail,
                "min_chars_left": self.min_chars_left,
            }
        )

    @classmethod
    def from_json(cls, data: str, runner: Runner, info: ModelInfo) -> Session:
        """Restores a session saved by ``to_json`` onto ``runner``, checking every field.

        Sessions saved by release 0.2 (without stops, bias and ``min_p``) restore as they were.

        Args:
            data: the JSON text from ``to_json``.
            runner: executes the model's signatures.
            info: the model the session continues on.

        Returns:
            The session, ready to continue.

        Raises:
            InputError: ``data`` is not a saved session, or a field is invalid or belongs to
                another model (the message names the field). Unknown fields are ignored.

        Example:

        >>> Session.from_json('{"temperature": -1, ...}', runner, info)  # doctest: +SKIP
        InputError: saved session field 'temperature': must be a finite number, 0 or more, got -1
        """
        try:
            obj = json.loads(data)
        except (ValueError, TypeError) as exc:
            raise InputError(f"not a saved session: {exc}") from None
        if not isinstance(obj, dict):
            raise InputError(f"not a saved session: expected a JSON object, got {type(obj).__name__}")
        for name in SAVED_FIELDS:
            if name not in obj:
                raise InputError(f"not a saved session: no {name!r} field")
        model, version, position, pending = obj["model"], obj["version"], obj["position"], obj["pending"]
        if model != info.name:
            raise InputError(f"saved session field 'model': saved from model {model!r}, not {info.name!r}")
        if version is not None and not (_is_int(version) and version >= 1):
            raise InputError(
                f"saved session field 'version': must be a version number (1 or more) or null, got {version!r}"
            )
        if not (_is_int(position) and 0 <= position <= INT64_MAX):
            raise InputError(f"saved session field 'position': must be an integer, 0 or more, got {position!r}")
        if not isinstance(pending, str) or not pending:
            raise InputError(
                f"saved session field 'pending': must be a non-empty string (the text still to feed, "
                f"as a prime is), got {pending!r}"
            )
        params = _saved_params(obj, info)
        states = _saved_states(obj["states"], info)
        tail, left = obj.get("stop_tail", ""), obj.get("min_chars_left", params.min_chars)
        if not isinstance(tail, str) or len(tail) > MAX_STOP_CHARS:
            raise InputError(
                f"saved session field 'stop_tail': must be a string of at most {MAX_STOP_CHARS} characters"
            )
        if not (_is_int(left) and 0 <= left <= params.min_chars):
            raise InputError(f"saved session field 'min_chars_left': must be an integer in 0..min_chars, got {left!r}")
        session = cls(runner, info, pending, params)
        session.states, session.position, session.tail, session.min_chars_left = states, position, tail, left
        session.version = version if version is not None else info.version
        return session


def _call_rows(sessions: list[Session], take: list[int], logprobs: int) -> list[Completion]:
    """One generate call for several sessions of one model (a row each): runs it, then moves each session on.

    The continuation rule is ``generation.continue_rows``: each session keeps its row's states,
    the last character generated as its pending text, its advanced position, its stop tail and
    its ``min_chars`` countdown.
    """
    for session in sessions:
        session._flush_pending()
    rows = [s._row(n, logprobs) for s, n in zip(sessions, take)]
    inputs = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return _advance(sessions, inputs, sessions[0]._run(inputs))


def _advance(
    sessions: list[Session], inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
) -> list[Completion]:
    """Moves each session (row r of a call's ``inputs``) on by the call's ``outputs``: the continuation rule."""
    first = sessions[0]
    nxt = continue_rows(inputs, outputs, first.info.state_names)
    results = completions(outputs, inputs, first.info.vocabulary)
    for r, session in enumerate(sessions):
        if session is not first:
            session.version, session.info = first.version, first.info
        session.states = {name: nxt[name][r : r + 1] for name in first.info.state_names}
        session.pending = nxt["prime"][r].decode("utf-8")
        session.position = int(nxt["position"][r])
        if "stop_tail" in nxt:
            session.tail = nxt["stop_tail"][r].decode("utf-8")
            session.min_chars_left = int(nxt["min_chars"][r])
        results[r].seed = session.params.seed
    return results


def _bias_row(bias: Mapping[str, float], info: ModelInfo) -> np.ndarray:
    """A ``{character: value}`` bias as the model's ``logit_bias`` row (one value per id)."""
    info.require_controls("bias")
    if info.vocabulary is None:
        raise InputError(f"model {info.name!r}: its vocabulary is unknown, so a character bias cannot be applied")
    index = {c: i for i, c in enumerate(info.vocabulary) if i > 0}
    row = np.zeros(info.vocab_size, np.float32)
    for char, value in bias.items():
        if char not in index:
            raise ConfigError(f"bias: {char!r} is not in the model's vocabulary (it is never generated)")
        row[index[char]] = value
    if (row[1:] <= BIAS_BAN).all():
        raise ConfigError("bias bans every character of the vocabulary: nothing could be generated")
    return row


SAVED_FIELDS = ("temperature", "top_k", "top_p", "seed", "pending", "states", "position", "version", "model")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _saved_params(obj: dict, info: ModelInfo) -> SamplingParams:
    temperature, top_k, top_p, seed = obj["temperature"], obj["top_k"], obj["top_p"], obj["seed"]
    if not (_is_number(temperature) and temperature >= 0):
        raise InputError(f"saved session field 'temperature': must be a finite number, 0 or more, got {temperature!r}")
    if not (_is_int(top_k) and 0 <= top_k <= info.vocab_size - 1):
        raise InputError(
            f"saved session field 'top_k': must be an integer in 0..{info.vocab_size - 1} "
            f"(0: off; at most the vocabulary size), got {top_k!r}"
        )
    if not (_is_number(top_p) and 0 < top_p <= 1):
        raise InputError(f"saved session field 'top_p': must be in (0, 1], got {top_p!r}")
    if not (_is_int(seed) and INT64_MIN <= seed <= INT64_MAX):
        raise InputError(f"saved session field 'seed': must be an integer in the int64 range, got {seed!r}")
    min_p, bias, stop, min_chars = (
        obj.get("min_p", 0.0),
        obj.get("bias", {}),
        obj.get("stop", []),
        obj.get("min_chars", 0),
    )
    if not (_is_number(min_p) and 0 <= min_p <= 1):
        raise InputError(f"saved session field 'min_p': must be in [0, 1], got {min_p!r}")
    if not isinstance(stop, list) or not isinstance(bias, dict) or not _is_int(min_chars):
        raise InputError("saved session fields 'stop', 'bias', 'min_chars': must be a list, an object and an integer")
    try:
        return SamplingParams(float(temperature), top_k, float(top_p), seed, float(min_p), bias, tuple(stop), min_chars)
    except ConfigError as exc:
        raise InputError(f"saved session: {exc}") from None


def _saved_states(saved, info: ModelInfo) -> dict[str, np.ndarray]:
    if not isinstance(saved, dict):
        raise InputError(
            f"not a saved session: field 'states' must map state names to values, got {type(saved).__name__}"
        )
    if set(saved) != set(info.state_names):
        raise InputError(
            f"saved session field 'states': names {sorted(saved)} do not match the model's {info.state_names}"
        )
    states = {}
    for name in info.state_names:
        where = f"saved session field 'states' ({name!r})"
        try:
            value = np.asarray(saved[name])
        except (ValueError, TypeError):
            raise InputError(f"{where}: not an array of numbers") from None
        if value.dtype.kind not in "iuf":  # strings, booleans, ragged lists (object) are not states
            raise InputError(f"{where}: must hold numbers, got {value.dtype.name} values")
        if value.shape not in ((info.state_size,), (1, info.state_size)):
            raise InputError(
                f"{where}: must be 1 row of width {info.state_size} (the model's state_size), "
                f"got shape {list(value.shape)}"
            )
        with np.errstate(over="ignore"):
            value = value.astype(np.float32).reshape(1, info.state_size)
        if not np.isfinite(value).all():
            raise InputError(f"{where}: must be finite float32 numbers (no NaN, no infinity, |x| < 3.4e38)")
        states[name] = value
    return states
