"""Re-exporting: a SavedModel of this package rebuilt with the current code, in place.

When the exported graph changes (a batch-invariance fix, new signatures), a version that is
already served or bundled gets the new graph with the same weights, vocabulary and facts, and
keeps its version number. The SavedModel's own graph is never run: only its variables and its
``metadata`` are read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import tensorflow as tf

from keras_charrnn import warmup
from keras_charrnn.errors import InputError
from keras_charrnn.export import RUN_FACTS, CharRNNModule, save_module
from keras_charrnn.fileio import fsync_path
from keras_charrnn.model import build_model, recurrent_layers
from keras_charrnn.vocab import Vocabulary


def module_from_savedmodel(path: str | os.PathLike, xla: bool | None = None) -> CharRNNModule:
    """A SavedModel of this package rebuilt by this package's code: its weights, vocabulary and facts.

    The SavedModel's own graph may come from older code; only its variables and its
    ``metadata`` (vocabulary, architecture, run facts) are taken, so the module computes
    what this version of the package exports.

    Args:
        path: a version folder written by ``save_savedmodel`` / ``export_run``.
        xla: add the XLA-compiled twins of the generating signatures; None: as the SavedModel has them.

    Returns:
        The module; ``named_signatures()`` runs it as a SavedModel.

    Raises:
        InputError: the folder holds no SavedModel of this package.

    Example:

    >>> module = module_from_savedmodel("saved_models/shakespeare/1")  # doctest: +SKIP
    >>> module.cell, module.units                                       # doctest: +SKIP
    ('lstm', 512)
    """
    try:
        checkpoint = tf.train.load_checkpoint(str(Path(path) / "variables" / "variables"))
        metadata = tf.saved_model.load(str(path)).signatures["metadata"]()
    except (OSError, ValueError, KeyError, tf.errors.OpError) as exc:
        raise InputError(f"{path}: not a SavedModel of this package ({str(exc).splitlines()[0]})") from None
    config = json.loads(metadata["config"].numpy())
    chars = [c.decode("utf-8") for c in metadata["vocabulary"].numpy()[1:]]

    def weight(name):
        return checkpoint.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

    model = build_model(
        len(chars) + 1,
        config["cell"],
        units=config["units"],
        layers=config["layers"],
        embedding_dim=config["embedding_dim"],
        dropout=config.get("dropout", 0.0),
        batch_size=None,
        seq_len=None,
        stateful=False,
    )
    model.get_layer("embedding").set_weights([weight("embedding")])
    for i, layer in enumerate(recurrent_layers(model)):
        layer.set_weights([weight(f"rnn/{i}/{j}") for j in range(len(layer.weights))])
    model.get_layer("logits").set_weights([weight("logits_kernel"), weight("logits_bias")])
    info = {key: config[key] for key in RUN_FACTS if key in config}
    return CharRNNModule(model, Vocabulary(chars), info, jit_compile=config.get("xla", True) if xla is None else xla)


def reexport_savedmodel(
    path: str | os.PathLike, warmup_batch_sizes: Iterable[int] = warmup.DEFAULT_BATCH_SIZES
) -> Path:
    """Rewrites a SavedModel in place with this package's graph: same folder, weights, vocabulary and facts.

    For a bundled or long-served version whose graph should gain what a newer package
    exports, without a new version number. The new folder is written beside the old one
    and swapped in by renames; a server polling the base path sees either version whole.

    Args:
        path: the version folder, e.g. ``saved_models/shakespeare/1``.
        warmup_batch_sizes: the batch sizes of the warm-up records.

    Returns:
        ``path``.

    Raises:
        InputError: the folder holds no SavedModel of this package, or cannot be written.
    """
    path = Path(path)
    module = module_from_savedmodel(path)
    fresh = path.with_name(f".{path.name}.new")
    old = path.with_name(f".{path.name}.old")
    save_module(module, fresh, warmup_batch_sizes)
    os.rename(path, old)
    os.rename(fresh, path)
    fsync_path(path.parent)
    shutil.rmtree(old)
    return path
