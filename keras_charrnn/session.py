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

import json
import math
from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import Iterator

import numpy as np

from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.sampling import DEFAULT_CHUNK, MAX_CHARS_PER_CALL, SamplingParams


class Runner(Protocol):
    """What a session calls: one signature of one model run on NumPy inputs, and the facts of a version."""

    def run(
        self, signature: str, inputs: dict[str, np.ndarray], version: int | None
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """Runs ``signature`` on ``inputs`` (a batch of one row).

        Args:
            signature: the signature's name, e.g. ``"generate_text"``.
            inputs: its inputs by name.
            version: the version to run (None: the newest).

        Returns:
            The outputs, and the version that answered (None: unknown).
        """

    def model_info(self, version: int | None) -> ModelInfo:
        """The facts of one version of the model (its states, sizes and limits).

        Args:
            version: the version (None: the newest).

        Returns:
            The model's info for that version.
        """


@dataclass
class ModelInfo:
    """What a session must know of a model: its state tensors and limits.

    Args:
        name: the model's name (its folder, or its name on a server).
        state_names: the state tensors, in the order of the model's layers.
        state_size: the width of every state tensor (the units of each layer).
        vocab_size: the number of ids, 0 (unknown) included.
        max_chars_per_call: the most characters one ``generate_text`` call may ask for:
            the model's own cap, or the server's advertised limit if lower.
        config: the model's ``metadata`` config.
        version: the version these facts describe (None: unknown, e.g. in-process).
        limits: the server's advertised request limits (``max_prime_chars``,
            ``max_chars_per_call``, ...); empty when it advertises none.
    """

    name: str
    state_names: list[str]
    state_size: int
    vocab_size: int
    max_chars_per_call: int
    config: dict = field(default_factory=dict)
    version: int | None = None
    limits: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, config: dict, version: int | None = None, limits: dict | None = None) -> ModelInfo:
        """Reads the facts from a model's ``metadata`` config.

        Args:
            name: the model's name (its folder, or its name on a server).
            config: the JSON object of the ``metadata`` signature's ``config``.
            version: the version the config was read from, if known.
            limits: request limits advertised by the server (positive integers by name);
                ``max_chars_per_call`` lowers the model's own cap.

        Returns:
            The model's info.

        Example:

        >>> config = {"state_names": ["h_0"], "state_size": 8, "vocab_size": 30, "max_chars_per_call": 4096}
        >>> ModelInfo.from_config("m", config, limits={"max_chars_per_call": 256}).max_chars_per_call
        256
        """
        limits = {k: int(v) for k, v in (limits or {}).items() if isinstance(v, (int, float)) and v > 0}
        cap = int(config.get("max_chars_per_call", MAX_CHARS_PER_CALL))
        if "max_chars_per_call" in limits:
            cap = min(cap, limits["max_chars_per_call"])
        return cls(
            name=name,
            state_names=list(config["state_names"]),
            state_size=int(config["state_size"]),
            vocab_size=int(config["vocab_size"]),
            max_chars_per_call=cap,
            config=config,
            version=version,
            limits=limits,
        )

    @property
    def max_prime_chars(self) -> int | None:
        """The most characters of text one call may feed (None: no advertised limit)."""
        return self.limits.get("max_prime_chars")


class Session:
    """A stream of generated text that continues from call to call.

    A session is pinned to the version its ``info`` describes (``info.version``; None:
    whichever answers, then that one): its hidden state belongs to those weights.

    Args:
        runner: executes signatures (in-process or over gRPC).
        info: the model's state names and limits.
        prime: text that starts the session (at least one character).
        params: temperature, top-k, top-p and seed.

    Example:

    >>> model = keras_charrnn.load("saved_models/shakespeare")  # doctest: +SKIP
    >>> s = model.session(prime="ROMEO:", seed=1)               # doctest: +SKIP
    >>> s.generate(100) + s.generate(100)  # == model.generate("ROMEO:", 200, seed=1)  # doctest: +SKIP
    """

    def __init__(self, runner: Runner, info: ModelInfo, prime: str, params: SamplingParams):
        if not prime:
            raise ConfigError("prime must hold at least one character")
        if params.top_k > info.vocab_size - 1:
            raise ConfigError(f"top_k must be at most the vocabulary size ({info.vocab_size - 1}), got {params.top_k}")
        self.runner = runner
        self.info = info
        self.params = params
        self.states = {n: np.zeros((1, info.state_size), np.float32) for n in info.state_names}
        self.pending = prime
        self.position = 0
        self.version: int | None = info.version  # pinned to the version its facts came from

    def generate(self, n: int) -> str:
        """Returns the next ``n`` characters (in calls of at most ``max_chars_per_call``)."""
        return "".join(self.stream(n, chunk=self.info.max_chars_per_call))

    def stream(self, n: int, chunk: int = DEFAULT_CHUNK) -> Iterator[str]:
        """Yields the next ``n`` characters, ``chunk`` at a time.

        A chunk over the model's or the server's ``max_chars_per_call`` is made of
        several calls; the text is the same however it is chunked.
        """
        if n < 1:
            raise ConfigError(f"n (the number of characters) must be at least 1, got {n}")
        if chunk < 1:
            raise ConfigError(f"chunk must be at least 1, got {chunk}")
        left = n
        while left:
            take = min(chunk, left)
            yield "".join(
                self._call(min(self.info.max_chars_per_call, take - done))
                for done in range(0, take, self.info.max_chars_per_call)
            )
            left -= take

    def feed(self, text: str) -> None:
        """Pushes ``text`` into the state: the next characters continue after it."""
        self.pending += text

    def _run(self, text: str, n: int) -> dict[str, np.ndarray]:
        """One ``generate_text`` call: feeds ``text``, samples ``n``; keeps the states and the version."""
        p = self.params
        inputs = {
            "prime": np.array([text.encode("utf-8")], dtype=object),
            **self.states,
            "num_chars": np.array([n], np.int32),
            "temperature": np.array([p.temperature], np.float32),
            "top_k": np.array([p.top_k], np.int32),
            "top_p": np.array([p.top_p], np.float32),
            "seed": np.array([p.seed], np.int64),
            "position": np.array([self.position], np.int64),
        }
        outputs, version = self.runner.run("generate_text", inputs, self.version)
        if version is not None:
            if version != self.info.version:
                self.info = self.runner.model_info(version)  # the facts of the version that answered
            self.version = version
        self.states = {name: np.asarray(outputs[name], np.float32) for name in self.info.state_names}
        return outputs

    def _call(self, n: int) -> str:
        limit = self.info.max_prime_chars
        while limit and len(self.pending) > limit:
            # Feed the text in pieces the server accepts: a call samples one character it does not
            # feed, so its states are those after the piece alone; that sample is dropped.
            self._run(self.pending[:limit], 1)
            self.pending = self.pending[limit:]
        text = self._run(self.pending, n)["text"].reshape(-1)[0]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        self.pending = text[-1]
        self.position += n
        return text

    def fork(self) -> Session:
        """An independent copy: both continue identically from here unless fed differently."""
        return Session.from_json(self.to_json(), self.runner, self.info)

    def to_json(self) -> str:
        """Everything needed to continue this session later, elsewhere (JSON)."""
        return json.dumps(
            {
                "model": self.info.name,
                "version": self.version,
                "position": self.position,
                "pending": self.pending,
                "temperature": self.params.temperature,
                "top_k": self.params.top_k,
                "top_p": self.params.top_p,
                "seed": self.params.seed,
                "states": {k: v.reshape(-1).tolist() for k, v in self.states.items()},
            }
        )

    @classmethod
    def from_json(cls, data: str, runner: Runner, info: ModelInfo) -> Session:
        """Restores a session saved by ``to_json`` onto ``runner``, checking every field.

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
        session = cls(runner, info, pending, params)
        session.states, session.position = states, position
        session.version = version if version is not None else info.version
        return session


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
    return SamplingParams(float(temperature), top_k, float(top_p), seed)


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
