"""Training hyper-parameters and their defaults (what ``charrnn train`` uses with no flags).

``TrainConfig``'s fields are the one list of them: each field's metadata
holds its help text (and its choices), and ``charrnn train`` makes one flag
per field from it (``batch_size`` -> ``--batch-size``).

Pure Python, no TensorFlow import, so the CLI can show the defaults instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keras_charrnn.errors import ConfigError

CELLS = ("lstm", "gru", "rnn")
LR_SCHEDULES = ("cosine", "constant")


def _field(default, help: str, choices: tuple[str, ...] | None = None):
    """A dataclass field with its default, its help text and its allowed values (for the CLI)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Hyper-parameters of a run; the defaults are ``charrnn train``'s.

    Example:

    >>> TrainConfig(units=64, epochs=2).validate()
    """

    cell: str = _field("lstm", "recurrent cell", CELLS)
    layers: int = _field(2, "stacked recurrent layers")
    units: int = _field(512, "units per recurrent layer")
    embedding_dim: int = _field(64, "size of each character's embedding")
    dropout: float = _field(0.2, "dropout after each recurrent layer, in [0, 1)")
    batch_size: int = _field(32, "streams trained side by side (rows of a batch)")
    seq_len: int = _field(100, "characters per row of a batch (the truncated-BPTT length)")
    epochs: int = _field(14, "passes over the training part of the corpus")
    lr: float = _field(2e-3, "Adam's learning rate (the start of the cosine schedule)")
    lr_schedule: str = _field("cosine", "cosine (down to lr/10 over the run) or constant", LR_SCHEDULES)
    clip_norm: float | None = _field(5.0, "clip gradients by global norm (turned off by clip_value)")
    clip_value: float | None = _field(None, "clip each gradient element (turns off clip_norm)")
    val_frac: float = _field(0.1, "fraction of the corpus, from its end, held out for validation, in [0, 1)")
    seed: int = _field(0, "random seed (weights, dropout)")
    checkpoint_every: int = _field(100, "batches between mid-epoch checkpoints; 0 = epoch ends only")
    tensorboard: bool = _field(False, "also write TensorBoard logs")

    def validate(self) -> None:
        """Checks every field.

        Raises:
            ConfigError: a field is out of range; the message names it (``lr must be positive``).
        """
        if self.cell not in CELLS:
            raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("layers", "units", "embedding_dim", "batch_size", "seq_len", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_frac < 1.0:
            raise ConfigError(f"val_frac must be in [0, 1), got {self.val_frac}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        for name in ("clip_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.clip_norm is not None and self.clip_value is not None:
            raise ConfigError("use clip_norm or clip_value, not both")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be 0 or more, got {self.checkpoint_every}")
