"""Training checkpoints: the full state needed to resume a run exactly.

One ``.npz`` file holds every model variable (weights and dropout seed
states), every recurrent layer's hidden state, every optimizer variable
(step count, moments), and a JSON record of where training stood (epoch,
batches done in it, best validation loss). It is written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from keras_charrnn.errors import CharRNNError
from keras_charrnn.fileio import atomic_write
from keras_charrnn.model import get_states, set_states


@dataclass
class Progress:
    """Where a run stands: ``step`` batches of ``epoch`` are done (0-based epoch)."""

    epoch: int = 0
    step: int = 0
    best_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)


def save_checkpoint(path: str | os.PathLike, model: keras.Model, progress: Progress) -> None:
    """Writes the model, its hidden states, its optimizer and ``progress`` to ``path``."""
    arrays = {f"model_{i}": np.asarray(v.numpy()) for i, v in enumerate(model.variables)}
    arrays.update({f"state_{i}": s for i, s in enumerate(get_states(model))})
    arrays.update({f"opt_{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    arrays["progress"] = np.array(json.dumps(progress.__dict__))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike, model: keras.Model) -> Progress:
    """Restores what ``save_checkpoint`` wrote into a compiled model of the same shape.

    Returns:
        The run's progress at the time of the checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CharRNNError(f"{path}: no checkpoint to resume from")
    try:
        data = np.load(path)
        keys = set(data.files)
        n_model = sum(k.startswith("model_") for k in keys)
        n_opt = sum(k.startswith("opt_") for k in keys)
        n_state = sum(k.startswith("state_") for k in keys)
        if n_model != len(model.variables):
            raise CharRNNError(f"{path}: checkpoint has {n_model} model variables, the model {len(model.variables)}")
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        if n_opt != len(model.optimizer.variables):
            raise CharRNNError(f"{path}: checkpoint does not match this optimizer")
        for i, v in enumerate(model.variables):
            v.assign(data[f"model_{i}"])
        for i, v in enumerate(model.optimizer.variables):
            v.assign(data[f"opt_{i}"])
        set_states(model, [data[f"state_{i}"] for i in range(n_state)])
        return Progress(**json.loads(str(data["progress"])))
    except (OSError, ValueError, KeyError) as exc:
        raise CharRNNError(f"{path}: unreadable checkpoint ({exc})") from None
