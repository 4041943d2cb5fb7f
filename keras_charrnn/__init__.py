"""keras-charrnn: character-level RNN language models on Keras, served with TF Serving's gRPC API.

The pipeline, one module each: ``vocab`` -> ``batching`` -> ``model`` -> ``train``
(``callbacks``, ``checkpoint``) -> ``export`` (``cells``, ``decoding``) ->
``serving`` (server and gRPC client) -> ``sample`` (in-process, ``session``) ->
``visualize``.

Names are imported lazily, so ``import keras_charrnn.serving.client`` does not
import TensorFlow.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Vocabulary": "keras_charrnn.vocab",
    "TBPTTBatches": "keras_charrnn.batching",
    "build_model": "keras_charrnn.model",
    "reset_states": "keras_charrnn.model",
    "TrainConfig": "keras_charrnn.config",
    "train": "keras_charrnn.train",
    "load_run": "keras_charrnn.train",
    "export_run": "keras_charrnn.export",
    "save_savedmodel": "keras_charrnn.export",
    "load": "keras_charrnn.sample",
    "CharRNN": "keras_charrnn.sample",
    "inspect": "keras_charrnn.visualize",
    "CharRNNError": "keras_charrnn.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'keras_charrnn' has no attribute {name!r}")
