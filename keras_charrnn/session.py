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
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.sampling import DEFAULT_CHUNK, SamplingParams


class Runner(Protocol):
    """Runs one signature of one model on NumPy inputs (batch of one row)."""

    def run(self, signature: str, inputs: dict[str, np.ndarray], version: int | None) -> tuple[dict[str, np.ndarray], int | None]:
        """Returns the outputs and the model version that answered."""


@dataclass
class ModelInfo:
    """What a session must know of a model: its state tensors and limits (from ``metadata``)."""

    name: str
    state_names: list[str]
    state_size: int
    vocab_size: int
    max_chars_per_call: int
    config: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, config: dict) -> "ModelInfo":
        """Reads the facts from a model's ``metadata`` config.

        Args:
            name: the model's name (its folder, or its name on a server).
            config: the JSON object of the ``metadata`` signature's ``config``.

        Returns:
            The model's info.
        """
        return cls(name=name, state_names=list(config["state_names"]), state_size=int(config["state_size"]),
                   vocab_size=int(config["vocab_size"]), max_chars_per_call=int(config["max_chars_per_call"]),
                   config=config)


class Session:
    """A stream of generated text that continues from call to call.

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
        self.version: int | None = None

    def generate(self, n: int) -> str:
        """Returns the next ``n`` characters (in calls of at most ``max_chars_per_call``)."""
        return "".join(self.stream(n, chunk=self.info.max_chars_per_call))

    def stream(self, n: int, chunk: int = DEFAULT_CHUNK) -> Iterator[str]:
        """Yields the next ``n`` characters, ``chunk`` characters per model call."""
        if n < 1:
            raise ConfigError(f"n (the number of characters) must be at least 1, got {n}")
        if not 1 <= chunk <= self.info.max_chars_per_call:
            raise ConfigError(f"chunk must be in 1..{self.info.max_chars_per_call}, got {chunk}")
        left = n
        while left:
            take = min(chunk, left)
            yield self._call(take)
            left -= take

    def feed(self, text: str) -> None:
        """Pushes ``text`` into the state: the next characters continue after it."""
        self.pending += text

    def _call(self, n: int) -> str:
        p = self.params
        inputs = {"prime": np.array([self.pending.encode("utf-8")], dtype=object),
                  **self.states,
                  "num_chars": np.array([n], np.int32), "temperature": np.array([p.temperature], np.float32),
                  "top_k": np.array([p.top_k], np.int32), "top_p": np.array([p.top_p], np.float32),
                  "seed": np.array([p.seed], np.int64), "position": np.array([self.position], np.int64)}
        outputs, version = self.runner.run("generate_text", inputs, self.version)
        text = outputs["text"].reshape(-1)[0]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        self.states = {name: np.asarray(outputs[name], np.float32) for name in self.info.state_names}
        if self.version is None:
            self.version = version
        self.pending = text[-1]
        self.position += n
        return text

    def fork(self) -> "Session":
        """An independent copy: both continue identically from here unless fed differently."""
        return Session.from_json(self.to_json(), self.runner, self.info)

    def to_json(self) -> str:
        """Everything needed to continue this session later, elsewhere (JSON)."""
        return json.dumps({
            "model": self.info.name, "version": self.version, "position": self.position, "pending": self.pending,
            "temperature": self.params.temperature, "top_k": self.params.top_k, "top_p": self.params.top_p,
            "seed": self.params.seed, "states": {k: v.reshape(-1).tolist() for k, v in self.states.items()},
        })

    @classmethod
    def from_json(cls, data: str, runner: Runner, info: ModelInfo) -> "Session":
        """Restores a session saved by ``to_json`` onto ``runner``.

        Args:
            data: the JSON text from ``to_json``.
            runner: executes the model's signatures.
            info: the model the session continues on.

        Returns:
            The session, ready to continue.

        Raises:
            InputError: ``data`` is not a saved session, or one saved from a model of other states.
        """
        try:
            obj = json.loads(data)
            params = SamplingParams(obj["temperature"], obj["top_k"], obj["top_p"], obj["seed"])
            session = cls(runner, info, obj["pending"], params)
            states = {k: np.asarray(v, np.float32).reshape(1, -1) for k, v in obj["states"].items()}
            position = int(obj["position"])
            version = obj["version"]
        except KeyError as exc:
            raise InputError(f"not a saved session: no {exc} field") from None
        except (ValueError, TypeError, AttributeError, ConfigError) as exc:
            raise InputError(f"not a saved session: {exc}") from None
        if set(states) != set(info.state_names):
            raise InputError(f"saved session states {sorted(states)} do not match the model's {info.state_names}")
        if any(v.shape[1] != info.state_size for v in states.values()):
            raise InputError(f"saved session states are not of width {info.state_size}")
        if position < 0:
            raise InputError(f"saved session position must be 0 or more, got {position}")
        session.states, session.position, session.version = states, position, version
        return session
