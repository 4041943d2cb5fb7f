"""The model: Embedding -> stacked stateful recurrent layers -> Dense logits.

``build_model`` returns a plain Keras functional model; ``model_from_config``
builds (and ``compile_model`` compiles) the one a ``TrainConfig`` describes. The helpers below
name the recurrent layers' hidden states (``h_0``, ``c_0``, ``h_1``, ...), read
and write them, and reset them; Keras 3 has no ``Model.reset_states()``.

The recurrent layers are the package's own (``layers.py``), one per cell type of the
registry (``cell_types.py``).
"""

from __future__ import annotations

import keras
import numpy as np

from keras_charrnn.cell_types import CELLS, cell_spec
from keras_charrnn.config import TrainConfig
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.layers import tf_distribute


def build_model(
    vocab_size: int,
    cell: str = "lstm",
    units: int = 512,
    layers: int = 2,
    embedding_dim: int = 64,
    dropout: float = 0.0,
    batch_size: int | None = 64,
    seq_len: int | None = 100,
    stateful: bool = True,
) -> keras.Model:
    """Builds a character language model.

    Args:
        vocab_size: number of ids (``Vocabulary.size``, the unknown id included).
        cell: a cell type of ``cell_types.CELLS``: ``"lstm"``, ``"gru"``, ``"rnn"`` (SimpleRNN) or
            ``"lnlstm"`` (layer-normalised LSTM).
        units: hidden units per recurrent layer.
        layers: number of stacked recurrent layers.
        embedding_dim: size of the character embedding.
        dropout: dropout rate after each recurrent layer (0 disables it).
        batch_size: rows per batch; a stateful model needs a fixed one.
        seq_len: characters per row, or None for any length.
        stateful: carry the hidden state from one batch to the next.

    Returns:
        A ``keras.Model`` from int ids ``[batch, time]`` to logits
        ``[batch, time, vocab_size]``.

    Example:

    >>> model = build_model(vocab_size=66, cell="gru", units=128, batch_size=32, seq_len=50)
    >>> model.output_shape
    (32, 50, 66)
    """
    layer_class = cell_spec(cell).layer_class()
    for name, value in (
        ("units", units),
        ("layers", layers),
        ("embedding_dim", embedding_dim),
        ("vocab_size", vocab_size),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    if stateful and batch_size is None:
        raise ConfigError("a stateful model needs a fixed batch_size")

    ids = keras.Input(batch_shape=(batch_size, seq_len), dtype="int32", name="ids")
    x = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding")(ids)
    for i in range(layers):
        x = layer_class(units, return_sequences=True, stateful=stateful, name=f"rnn_{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    logits = keras.layers.Dense(vocab_size, name="logits")(x)
    return keras.Model(ids, logits, name=f"charrnn_{cell}")


def recurrent_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's recurrent layers, bottom first."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.RNN)]


def describe(model: keras.Model) -> dict:
    """The architecture of a model made by ``build_model``, as plain values."""
    rnns = recurrent_layers(model)
    if not rnns:
        raise InputError(f"model {model.name!r} has no recurrent layers")
    cell = next((name for name, spec in CELLS.items() if isinstance(rnns[0], spec.layer_class())), None)
    if cell is None:
        raise InputError(f"model {model.name!r}: {type(rnns[0]).__name__} is the layer of no cell type")
    dropouts = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    return {
        "cell": cell,
        "units": rnns[0].units if hasattr(rnns[0], "units") else rnns[0].cell.units,
        "layers": len(rnns),
        "embedding_dim": model.get_layer("embedding").output_dim,
        "vocab_size": model.get_layer("logits").units,
        "dropout": dropouts[0] if dropouts else 0.0,
    }


def state_names(cell: str, layers: int) -> list[str]:
    """Names of the hidden-state tensors, in order: ``h_0, c_0, h_1, c_1`` for LSTM (the cell's ``states``)."""
    return [f"{s}_{i}" for i in range(layers) for s in cell_spec(cell).states]


def reset_states(model: keras.Model) -> None:
    """Zeroes the hidden state of every stateful recurrent layer (on every replica, under ``tf.distribute``)."""
    for layer in recurrent_layers(model):
        if layer.stateful:
            layer.reset_state()


def _state_variables(model: keras.Model) -> list:
    return [v for layer in recurrent_layers(model) if layer.stateful for v in layer.states]


def model_variables(model: keras.Model) -> list:
    """``model.variables`` without the hidden states (which the JAX backend tracks there, see above).

    The same list, in the same order, on every backend: weights and dropout seed states.
    """
    states = {id(v) for v in _state_variables(model)}
    return [v for v in model.variables if id(v) not in states]


def get_states(model: keras.Model) -> list[np.ndarray]:
    """The current hidden states of a stateful model, in ``state_names`` order.

    Each is one ``(batch_size, units)`` array, rows in stream order; under ``tf.distribute`` the
    replicas' (and workers') rows are gathered, so the arrays are those of a single-device run.
    Under ``MultiWorkerMirroredStrategy`` this is a collective: every worker must call it.
    """
    variables = _state_variables(model)
    dist = tf_distribute()
    if dist is not None:
        return dist.read_states(variables)
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


def set_states(model: keras.Model, values: list[np.ndarray]) -> None:
    """Sets the hidden states of a stateful model, in ``state_names`` order.

    ``values`` are whole-batch arrays as ``get_states`` returns them; under ``tf.distribute``
    each replica takes its own rows.
    """
    variables = _state_variables(model)
    if len(variables) != len(values):
        raise InputError(f"expected {len(variables)} state arrays, got {len(values)}")
    dist = tf_distribute()
    if dist is not None:
        dist.write_states(variables, values)
        return
    for var, value in zip(variables, values):
        var.assign(value)


def make_optimizer(
    config: TrainConfig, total_steps: int, optimizer_class: type = keras.optimizers.Adam
) -> keras.optimizers.Optimizer:
    """Adam with the config's learning rate, schedule and gradient clipping.

    Args:
        config: supplies ``lr``, ``lr_schedule``, ``clip_norm`` and ``clip_value``.
        total_steps: batches in the whole run (the cosine schedule's length, unless
            ``config.schedule_steps`` sets it).
        optimizer_class: Adam or a subclass (``distribute.GlobalClipAdam`` under ``tf.distribute``).

    Returns:
        A ``keras.optimizers.Adam``; clipping by global norm uses Keras'
        ``global_clipnorm``, clipping by value its ``clipvalue``.
    """
    lr = config.lr
    if config.lr_schedule == "cosine":
        total_steps = config.schedule_steps or total_steps  # a time budget's predicted batches
        lr = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=max(total_steps, 1), alpha=0.1)
    return optimizer_class(learning_rate=lr, global_clipnorm=config.clip_norm, clipvalue=config.clip_value)


def model_from_config(config: TrainConfig, vocab_size: int, replicas: int = 1) -> keras.Model:
    """The stateful training model that ``config`` describes.

    Args:
        config: the run's hyper-parameters.
        vocab_size: the vocabulary's size (the unknown id included).
        replicas: ``tf.distribute`` replicas sharing each batch: the model is built with the
            per-replica batch, ``config.batch_size // replicas``.

    Returns:
        An uncompiled ``build_model`` model with ``config``'s shape.
    """
    return build_model(
        vocab_size,
        cell=config.cell,
        units=config.units,
        layers=config.layers,
        embedding_dim=config.embedding_dim,
        dropout=config.dropout,
        batch_size=config.batch_size // replicas,
        seq_len=config.seq_len,
    )


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> keras.Model:
    """Compiles a char model: cross-entropy on logits, in nats per character.

    Args:
        model: a ``build_model`` model.
        optimizer: e.g. ``make_optimizer(config, steps)``.

    Returns:
        ``model``, compiled.
    """
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model
