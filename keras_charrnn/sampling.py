"""How characters are sampled: ``SamplingParams`` and the sampling defaults, in one place.

The defaults here are the package's only copy: the CLI's flags, the
in-process model, the gRPC client, the model server and the exported
SavedModel all read them from this module. Pure Python (no NumPy, no
TensorFlow), so light clients can import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from keras_charrnn.errors import ConfigError

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 0  # 0: every character is a candidate
DEFAULT_TOP_P = 1.0  # 1: no nucleus cut
DEFAULT_PRIME = "\n"  # the text a session starts from when none is given
DEFAULT_CHUNK = 64  # characters per model call when streaming
MAX_CHARS_PER_CALL = 4096  # the most characters one generate call may ask for


@dataclass
class SamplingParams:
    """How the next character is chosen; checked here, so mistakes fail before any model call.

    Args:
        temperature: 0 picks the most likely character; higher is more varied.
        top_k: sample only among the k most likely characters (0: all).
        top_p: sample only among the most likely characters whose mass reaches p (1: all).
        seed: makes the text reproducible; None draws a random one.

    Raises:
        ConfigError: a value is out of range (the message names the parameter).

    Example:

    >>> SamplingParams(temperature=0.5, seed=1)
    SamplingParams(temperature=0.5, top_k=0, top_p=1.0, seed=1)
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is None:
            self.seed = int.from_bytes(os.urandom(8), "little") >> 1

    @classmethod
    def of(cls, params: SamplingParams | None = None, **fields) -> SamplingParams:
        """``params`` itself, or new parameters built from keyword ``fields`` (the keyword convenience).

        Args:
            params: ready-made parameters, or None.
            **fields: ``temperature``, ``top_k``, ``top_p``, ``seed``, when ``params`` is None.

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
