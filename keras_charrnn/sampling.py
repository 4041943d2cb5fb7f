"""How characters are sampled and when a row stops: ``SamplingParams``, checked before any model call.

The defaults and caps live in ``keras_charrnn.generation`` (the table of the
generation inputs); the CLI's flags, the in-process model, the gRPC client,
the model server and the exported SavedModel all read them from there. Pure
Python and NumPy (no TensorFlow), so light clients can import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from keras_charrnn.errors import ConfigError
from keras_charrnn.generation import (
    BIAS_BAN,
    DEFAULT_CHUNK,
    DEFAULT_MIN_P,
    DEFAULT_PRIME,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    MAX_CHARS_PER_CALL,
    MAX_STOP_CHARS,
    MAX_STOPS,
)

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_PRIME",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "MAX_CHARS_PER_CALL",
    "SamplingParams",
]

MAX_BIAS_ENTRIES = 1024  # characters one bias map may name (a vocabulary is smaller)


@dataclass
class SamplingParams:
    """How the next character is chosen and when a row stops; checked here, so mistakes fail before any model call.

    Args:
        temperature: 0 picks the most likely character; higher is more varied.
        top_k: sample only among the k most likely characters (0: all).
        top_p: sample only among the most likely characters whose mass reaches p (1: all).
        seed: makes the text reproducible; None draws a random one.
        min_p: drop characters less likely than ``min_p`` times the most likely one (0: off).
        bias: ``{character: value}`` added to the characters' logits; -100 bans one
            (e.g. ``{d: -100 for d in "0123456789"}`` forbids digits).
        stop: up to 4 strings (each up to 32 characters); generation ends once the text
            generated since the last prime or ``feed`` ends with one (it is included in the text).
        min_chars: a stop cannot end generation before this many characters since the last
            prime or ``feed``.

    Raises:
        ConfigError: a value is out of range (the message names the parameter).

    Example:

    >>> SamplingParams(temperature=0.5, seed=1, stop=("\\n",)).stop
    ('\\n',)
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    min_p: float = DEFAULT_MIN_P
    bias: Mapping[str, float] = field(default_factory=dict)
    stop: Sequence[str] = ()
    min_chars: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.min_chars, bool) or not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ConfigError(f"min_chars must be an integer, 0 or more, got {self.min_chars!r}")
        self.stop = _checked_stops(self.stop)
        self.bias = _checked_bias(self.bias)
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(8), "little") >> 1

    @property
    def controlled(self) -> bool:
        """Whether these parameters need the generation-controls signatures (stops, min_p, bias)."""
        return bool(self.stop or self.min_chars or self.min_p or self.bias)

    @classmethod
    def of(cls, params: SamplingParams | None = None, **fields) -> SamplingParams:
        """``params`` itself, or new parameters built from keyword ``fields`` (the keyword convenience).

        Args:
            params: ready-made parameters, or None.
            **fields: the fields (``temperature``, ``top_k``, ``top_p``, ``seed``, ``min_p``, ``bias``,
                ``stop``, ``min_chars``), when ``params`` is None.

        Returns:
            The parameters to use.

        Example:

        >>> SamplingParams.of(seed=3).seed
        3
        """
        if params is None:
            return cls(**fields)
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be a SamplingParams, got {type(params).__name__}")
        if fields:
            raise ConfigError(f"pass either params or {', '.join(sorted(fields))}, not both")
        return params


def _checked_stops(stop) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    stops = tuple(stop)
    if len(stops) > MAX_STOPS:
        raise ConfigError(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"stop: every stop string must be a non-empty string, got {s!r}")
        if len(s) > MAX_STOP_CHARS:
            raise ConfigError(f"stop: a stop string holds at most {MAX_STOP_CHARS} characters, got {len(s)} in {s!r}")
    return stops


def _checked_bias(bias) -> dict[str, float]:
    if not isinstance(bias, Mapping):
        raise ConfigError(f"bias must map characters to numbers, got {type(bias).__name__}")
    if len(bias) > MAX_BIAS_ENTRIES:
        raise ConfigError(f"bias names {len(bias)} characters, more than {MAX_BIAS_ENTRIES}")
    checked = {}
    for char, value in bias.items():
        if not isinstance(char, str) or len(char) != 1:
            raise ConfigError(f"bias: keys must be single characters, got {char!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"bias[{char!r}] must be a finite number, got {value!r}")
        if not BIAS_BAN <= value <= -BIAS_BAN:
            raise ConfigError(f"bias[{char!r}] must be in [-100, 100] (-100 bans it), got {value}")
        checked[char] = float(value)
    return checked
