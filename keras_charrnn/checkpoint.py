"""Training checkpoints: the full state needed to resume a run exactly.

One ``.npz`` file holds every model variable (weights and dropout seed
states), every recurrent layer's hidden state, every optimizer variable
(step count, moments), and a JSON record of where training stood (epoch,
batches done in it, best validation loss). It is written atomically.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from keras_charrnn.errors import InputError
from keras_charrnn.fileio import atomic_write
from keras_charrnn.model import get_states, model_variables, set_states


@dataclass
class Progress:
    """Where a run stands: ``step`` batches of ``epoch`` are done (0-based epoch)."""

    epoch: int = 0
    step: int = 0
    best_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)


def snapshot(model: keras.Model, progress: Progress) -> dict[str, np.ndarray]:
    """A copy, in memory, of everything ``save_checkpoint`` writes.

    Args:
        model: a compiled model whose optimizer has been built.
        progress: where the run stands.

    Returns:
        The arrays of the checkpoint, for ``write_checkpoint``.
    """
    # model_variables: the hidden states are saved once, as state_i, on every backend (JAX also lists
    # them in model.variables), so a checkpoint's format does not depend on the backend or the strategy.
    arrays = {f"model_{i}": np.array(v.numpy()) for i, v in enumerate(model_variables(model))}
    arrays.update({f"state_{i}": s for i, s in enumerate(get_states(model))})
    arrays.update({f"opt_{i}": np.array(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    arrays["progress"] = np.array(json.dumps(progress.__dict__))
    return arrays


def write_checkpoint(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Writes a ``snapshot`` to ``path`` atomically (file and folder fsynced).

    Args:
        path: the ``.npz`` file (a run folder's ``state_path``).
        arrays: what ``snapshot`` returned.
    """

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types allow_pickle as a keyword

    atomic_write(path, write)


def save_checkpoint(path: str | os.PathLike, model: keras.Model, progress: Progress) -> None:
    """Writes the model, its hidden states, its optimizer and ``progress`` to ``path``, atomically.

    Args:
        path: the ``.npz`` file (a run folder's ``state_path``).
        model: a compiled model whose optimizer has been built.
        progress: where the run stands.
    """
    write_checkpoint(path, snapshot(model, progress))


# What a truncated or corrupted file (.npz, .keras: both zip archives) raises while it is opened or read.
UNREADABLE = (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile)


def unreadable(path: str | os.PathLike, what: str, exc: BaseException) -> InputError:
    """The one-line error for a file that could not be read.

    Args:
        path: the file.
        what: what it should have been ("checkpoint", "model").
        exc: what reading it raised.

    Returns:
        An ``InputError`` naming the file and the first line of the cause.
    """
    lines = str(exc).strip().splitlines()
    cause = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return InputError(f"{path}: unreadable {what} ({cause})")


def read_progress(path: str | os.PathLike) -> Progress:
    """The progress record of a checkpoint, without loading its arrays.

    Args:
        path: a file written by ``save_checkpoint``.

    Returns:
        The run's progress at the time of the checkpoint.

    Raises:
        InputError: the file is missing, truncated or corrupted (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint")
    try:
        with np.load(path) as data:
            return Progress(**json.loads(str(data["progress"])))
    except UNREADABLE as exc:
        raise unreadable(path, "checkpoint", exc) from None


def load_checkpoint(path: str | os.PathLike, model: keras.Model) -> Progress:
    """Restores what ``save_checkpoint`` wrote into a compiled model of the same shape.

    Args:
        path: a file written by ``save_checkpoint``.
        model: a compiled model built from the same config.

    Returns:
        The run's progress at the time of the checkpoint.

    Raises:
        InputError: the file is missing, truncated, corrupted or of another model.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no checkpoint to resume from")
    try:
        with np.load(path) as data:
            keys = set(data.files)
            n_model = sum(k.startswith("model_") for k in keys)
            n_opt = sum(k.startswith("opt_") for k in keys)
            n_state = sum(k.startswith("state_") for k in keys)
            variables = model_variables(model)
            if n_model != len(variables):
                raise InputError(f"{path}: checkpoint has {n_model} model variables, the model {len(variables)}")
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            if n_opt != len(model.optimizer.variables):
                raise InputError(f"{path}: checkpoint does not match this optimizer")
            model_values = [data[f"model_{i}"] for i in range(n_model)]
            opt_values = [data[f"opt_{i}"] for i in range(n_opt)]
            states = [data[f"state_{i}"] for i in range(n_state)]
            progress = Progress(**json.loads(str(data["progress"])))
    except UNREADABLE as exc:
        raise unreadable(path, "checkpoint", exc) from None
    try:
        for v, value in zip(variables, model_values):
            v.assign(value)
        for v, value in zip(model.optimizer.variables, opt_values):
            v.assign(value)
    except ValueError as exc:  # a shape mismatch: another model's checkpoint
        raise InputError(f"{path}: checkpoint does not match this model ({str(exc).splitlines()[0]})") from None
    set_states(model, states)
    return progress
