"""keras-charrnn: character-level RNN language models on Keras, served with TF Serving's gRPC API.

The pipeline, one module each (README.md, "Layout"): ``corpus``, ``vocab`` -> ``tbptt`` ->
``model`` (``cell_types``, ``layers``) -> ``train``
(``callbacks``, ``checkpoint``) -> ``export`` (``cells``, ``decoding``) ->
``serving`` (server and gRPC client) -> ``inprocess`` (``session``, ``sampling``) ->
``analysis`` -> ``report``.

Names are imported lazily, so ``import keras_charrnn.serving.client`` does not
import TensorFlow. ``bundled_model_path()`` is where the Shakespeare model shipped
with the package lies (a SavedModel folder: ``tf.saved_model.load`` it, or
``keras_charrnn.load`` it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

_EXPORTS = {
    "Vocabulary": "keras_charrnn.vocab",
    "TBPTTBatches": "keras_charrnn.tbptt",
    "build_model": "keras_charrnn.model",
    "reset_states": "keras_charrnn.model",
    "TrainConfig": "keras_charrnn.config",
    "train": "keras_charrnn.train",
    "RunFolder": "keras_charrnn.run_folder",
    "export_run": "keras_charrnn.export",
    "save_savedmodel": "keras_charrnn.export",
    "load": "keras_charrnn.inprocess",
    "CharRNN": "keras_charrnn.inprocess",
    "SamplingParams": "keras_charrnn.sampling",
    "inspect": "keras_charrnn.analysis",
    "write_report": "keras_charrnn.report",
    "CharRNNError": "keras_charrnn.errors",
    "ConfigError": "keras_charrnn.errors",
    "InputError": "keras_charrnn.errors",
    "ServingError": "keras_charrnn.errors",
    "bundled_model_path": "keras_charrnn.bundled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'keras_charrnn' has no attribute {name!r}")
