"""Training hyper-parameters and their defaults (what ``charrnn train`` uses with no flags).

Pure Python, no TensorFlow import, so the CLI can show the defaults instantly.
"""

from __future__ import annotations

from dataclasses import dataclass

from keras_charrnn.errors import CharRNNError


@dataclass
class TrainConfig:
    """Hyper-parameters of a run; the defaults are ``charrnn train``'s."""

    cell: str = "lstm"
    layers: int = 2
    units: int = 512
    embedding_dim: int = 64
    dropout: float = 0.2
    batch_size: int = 32
    seq_len: int = 100
    epochs: int = 14
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # "cosine" (to lr/10 over the run) or "constant"
    clip_norm: float | None = 5.0
    clip_value: float | None = None
    val_frac: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100  # batches between mid-epoch checkpoints; 0 = epoch ends only
    tensorboard: bool = False

    def validate(self) -> None:
        if self.lr <= 0:
            raise CharRNNError(f"--lr must be positive, got {self.lr}")
        if self.epochs < 1:
            raise CharRNNError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise CharRNNError(f"--lr-schedule must be cosine or constant, got {self.lr_schedule!r}")
        for name in ("clip_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CharRNNError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.clip_norm is not None and self.clip_value is not None:
            raise CharRNNError("use --clip-norm or --clip-value, not both")
        if self.checkpoint_every < 0:
            raise CharRNNError(f"--checkpoint-every must be 0 or more, got {self.checkpoint_every}")
