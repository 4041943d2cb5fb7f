"""Training hyper-parameters and their defaults (what ``charrnn train`` uses with no flags).

``TrainConfig``'s fields are the one list of them: each field's metadata
holds its help text (and its choices), and ``charrnn train`` makes one flag
per field from it (``batch_size`` -> ``--batch-size``).

Resuming a run keeps its config. Only the fields marked ``on_resume`` may
change then (``RESUMABLE``: how long and how watched it trains, and the
optimizer's step size and clipping, e.g. to continue a diverged run with a lower
``lr``); every other field fixes the model, the data layout or the random
streams, and ``resume_changes`` refuses a change to it.

Pure Python, no TensorFlow import, so the CLI can show the defaults instantly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from keras_charrnn.cell_types import CELLS, cell_spec
from keras_charrnn.errors import ConfigError
from keras_charrnn.sampling import MAX_CHARS_PER_CALL

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_C = TypeVar("_C", bound="DataclassInstance")  # a config dataclass

LR_SCHEDULES = ("cosine", "constant")


DEFAULT_CLIP_NORM = 5.0  # clip_norm's default, which clip_value turns off
SAMPLE_TEMPERATURES = (0.5, 0.8, 1.0)  # the samples printed during training, one per temperature
MIN_TIME_BUDGET = 10.0  # seconds: the least time_budget (TensorFlow's tracing, a probe, a validation)
MAX_TIME_BUDGET = 30 * 86400.0
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration such as ``90s``, ``10m``, ``1.5h``, ``2d`` or ``600`` (plain seconds).

    Args:
        text: a positive number with an optional unit s, m, h or d (a number is taken as seconds).

    Returns:
        The duration in seconds.

    Raises:
        ConfigError: not a duration; the message names ``time_budget``.

    Example:

    >>> parse_duration("1.5h"), parse_duration("90s"), parse_duration("10m")
    (5400.0, 90.0, 600.0)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([smhd]?)\s*", str(text).lower())
        if not match:
            raise ConfigError(f"time_budget must be a duration such as 90s, 10m or 1.5h, got {text!r}")
        value, unit = float(match.group(1)), match.group(2)
    seconds = value * _DURATION_UNITS[unit]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time_budget must be a positive duration such as 90s, 10m or 1.5h, got {text!r}")
    return seconds


def _field(default: Any, help: str, choices: tuple[str, ...] | None = None, on_resume: bool = False) -> Any:
    """A dataclass field with its default, its help text, its allowed values (for the CLI),
    and whether resuming a run may change it."""
    return field(default=default, metadata={"help": help, "choices": choices, "on_resume": on_resume})


def _document_fields(cls: type[_C]) -> type[_C]:
    """Writes a config dataclass's ``Args:`` section (its ``FIELDS`` line) from its fields' help and defaults.

    The help text is the one copy (``charrnn train --help`` reads it too); written into
    the docstring, ``help(TrainConfig)`` shows every field.

    Args:
        cls: the dataclass.

    Returns:
        ``cls``.
    """
    if cls.__doc__ is None:  # python -OO
        return cls
    lines = []
    for f in dataclasses.fields(cls):
        text = f"{f.name}: {f.metadata['help']} (default: {f.default!r}"
        text += "; may change on resume)." if f.metadata.get("on_resume") else ")."
        lines.extend(textwrap.wrap(text, 104, initial_indent=" " * 8, subsequent_indent=" " * 12))
    cls.__doc__ = cls.__doc__.replace(" " * 8 + "FIELDS", "\n".join(lines))
    return cls


@_document_fields
@dataclass
class TrainConfig:
    """Hyper-parameters of a run; the defaults are ``charrnn train``'s.

    Each field is a ``charrnn train`` flag (``batch_size`` -> ``--batch-size``).

    Args:
        FIELDS

    Example:

    >>> TrainConfig(units=64, epochs=2).validate()
    """

    cell: str = _field(
        "lstm", "recurrent cell: " + ", ".join(f"{s.name} ({s.about})" for s in CELLS.values()), tuple(CELLS)
    )
    layers: int = _field(2, "stacked recurrent layers")
    units: int = _field(512, "units per recurrent layer")
    embedding_dim: int = _field(64, "size of each character's embedding")
    dropout: float = _field(0.2, "dropout after each recurrent layer, in [0, 1)")
    batch_size: int = _field(32, "streams trained side by side (rows of a batch)")
    seq_len: int = _field(100, "characters per row of a batch (the truncated-BPTT length)")
    epochs: int = _field(14, "passes over the training part of the corpus", on_resume=True)
    lr: float = _field(2e-3, "Adam's learning rate (the start of the cosine schedule)", on_resume=True)
    lr_schedule: str = _field("cosine", "cosine (down to lr/10 over the run) or constant", LR_SCHEDULES, on_resume=True)
    clip_norm: float | None = _field(
        DEFAULT_CLIP_NORM, "clip gradients by global norm (turned off by clip_value)", on_resume=True
    )
    clip_value: float | None = _field(
        None, "clip each gradient element (turns off clip_norm; giving both is an error)", on_resume=True
    )
    val_frac: float = _field(0.1, "fraction of the corpus, from its end, held out for validation, in [0, 1)")
    seed: int = _field(0, "random seed (weights, dropout)")
    checkpoint_every: int = _field(100, "batches between mid-epoch checkpoints; 0 = epoch ends only", on_resume=True)
    sample_every: int = _field(
        0,
        "batches between samples within an epoch (a sample is printed and added to "
        "samples.txt at each epoch end too); 0 = epoch ends only",
        on_resume=True,
    )
    sample_chars: int = _field(
        200,
        f"characters per sample (one per temperature "
        f"{', '.join(f'{t:g}' for t in SAMPLE_TEMPERATURES)}); 0 = no samples",
        on_resume=True,
    )
    tensorboard: bool = _field(False, "also write TensorBoard logs", on_resume=True)
    time_budget: float | None = _field(
        None,
        "train for this long (90s, 10m, 1.5h; seconds in config.json): a short "
        "probe of this machine picks layers, units, batch_size, seq_len, epochs, "
        "dropout and the schedule (flags given are kept), and training stops in "
        "time with the best model saved; see budget.py",
    )
    schedule_steps: int | None = _field(
        None,
        "batches the cosine schedule spans (default: every epoch's); "
        "time_budget sets it to the batches predicted to fit",
    )

    def __post_init__(self) -> None:
        # The clip rule: clip_value turns off clip_norm's default (clip_norm given too is refused by validate).
        if self.clip_value is not None and self.clip_norm == DEFAULT_CLIP_NORM:
            self.clip_norm = None

    def validate(self) -> None:
        """Checks every field.

        Raises:
            ConfigError: a field is out of range; the message names it (``lr must be positive``).
        """
        cell_spec(self.cell)
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
        for name in ("checkpoint_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.time_budget is not None and not MIN_TIME_BUDGET <= self.time_budget <= MAX_TIME_BUDGET:
            raise ConfigError(
                f"time_budget must be between {MIN_TIME_BUDGET:g} seconds and "
                f"{MAX_TIME_BUDGET / 86400:g} days (a probe and a final validation must fit), "
                f"got {self.time_budget:g} seconds"
            )
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ConfigError(f"schedule_steps must be at least 1, got {self.schedule_steps}")
        if not 0 <= self.sample_chars <= MAX_CHARS_PER_CALL:
            raise ConfigError(f"sample_chars must be in 0..{MAX_CHARS_PER_CALL}, got {self.sample_chars}")


RESUMABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["on_resume"])


def resume_changes(saved: TrainConfig, changes: Mapping[str, Any]) -> tuple[TrainConfig, dict[str, tuple]]:
    """The config of a resumed run: the saved one with the allowed changes applied.

    Args:
        saved: the run's config.
        changes: field values asked for (e.g. the flags given with ``--resume``);
            a value equal to the saved one is no change.

    Returns:
        ``(config, changed)``: the new config and ``{field: (old, new)}`` of what changed.

    Raises:
        ConfigError: a field is unknown, or a change would alter the run (one line naming
            every such field and what may change instead).

    Example:

    >>> resume_changes(TrainConfig(epochs=2), {"epochs": 4})[1]
    {'epochs': (2, 4)}
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
    if changes.get("clip_value") is not None and "clip_norm" not in changes:
        changes = {**changes, "clip_norm": None}  # the clip rule: a new clip_value turns off clip_norm
    changed = {
        f.name: (getattr(saved, f.name), changes[f.name])
        for f in dataclasses.fields(TrainConfig)
        if f.name in changes and getattr(saved, f.name) != changes[f.name]
    }
    fixed = [k for k in changed if k not in RESUMABLE]
    if fixed:
        what = ", ".join(f"{k} ({changed[k][0]} -> {changed[k][1]})" for k in fixed)
        raise ConfigError(
            f"resuming cannot change {what}: they fix the run (start a new run for that); "
            f"a resumed run may change {', '.join(RESUMABLE)}"
        )
    return dataclasses.replace(saved, **{k: new for k, (_, new) in changed.items()}), changed
