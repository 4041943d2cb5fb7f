"""What a session knows of a model and how it reaches it: ``ModelInfo`` (states, sizes, limits, signatures,
vocabulary) and the ``Runner`` protocol (one signature run in process or over gRPC). TensorFlow-free,
so light clients import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from keras_charrnn.errors import InputError
from keras_charrnn.generation import MAX_CHARS_PER_CALL, context


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
        signatures: the model's signature names (empty: unknown, taken as 0.2's).
        vocabulary: the characters in id order, id 0 (unknown) first (None: unknown).
    """

    name: str
    state_names: list[str]
    state_size: int
    vocab_size: int
    max_chars_per_call: int
    config: dict = field(default_factory=dict)
    version: int | None = None
    limits: dict = field(default_factory=dict)
    signatures: frozenset[str] = frozenset()
    vocabulary: list[str] | None = None

    @classmethod
    def from_config(
        cls,
        name: str,
        config: dict,
        version: int | None = None,
        limits: dict | None = None,
        signatures: Iterable[str] = (),
        vocabulary: list[str] | None = None,
    ) -> ModelInfo:
        """Reads the facts from a model's ``metadata`` config.

        Args:
            name: the model's name (its folder, or its name on a server).
            config: the JSON object of the ``metadata`` signature's ``config``.
            version: the version the config was read from, if known.
            limits: request limits advertised by the server (positive integers by name);
                ``max_chars_per_call`` lowers the model's own cap.
            signatures: the model's signature names.
            vocabulary: the characters in id order, id 0 first (the ``metadata`` signature's).

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
            signatures=frozenset(signatures),
            vocabulary=vocabulary,
        )

    @property
    def max_prime_chars(self) -> int | None:
        """The most characters of text one call may feed (None: no advertised limit)."""
        return self.limits.get("max_prime_chars")

    @property
    def controlled(self) -> bool:
        """Whether the model has the generation-controls signature (stops, bias, min_p, scores)."""
        return "generate_text_v2" in self.signatures

    def context(self) -> dict[str, int]:
        """The numbers the generation inputs' rules read (``generation.context``)."""
        return context(self.vocab_size, self.limits)

    def require_controls(self, what: str) -> None:
        """Raises ``InputError`` naming the missing signature when ``what`` needs it and the model lacks it."""
        if not self.controlled:
            raise InputError(
                f"model {self.name!r}{'' if self.version is None else f' version {self.version}'} has no "
                f"'generate_text_v2' signature (exported before keras-charrnn 0.3), which {what} needs; "
                f"re-export it with keras_charrnn.reexport.reexport_savedmodel"
            )
