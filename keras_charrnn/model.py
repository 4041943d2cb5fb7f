"""The model: Embedding -> stacked stateful recurrent layers -> Dense logits.

``build_model`` returns a plain Keras functional model; ``model_from_config``
builds (and ``compile_model`` compiles) the one a ``TrainConfig`` describes. The helpers below
name the recurrent layers' hidden states (``h_0``, ``c_0``, ``h_1``, ...), read
and write them, and reset them; Keras 3 has no ``Model.reset_states()``.

The recurrent layers are the package's own ``CharLSTM``, ``CharGRU`` and
``CharSimpleRNN``: Keras' ``LSTM``, ``GRU`` and ``SimpleRNN`` with the same math,
config and weights (``layer.get_weights()`` is Keras' ``[kernel, recurrent_kernel,
bias]``; a ``.keras`` file holds the same variables), but with hidden-state
variables that work on every backend and under ``tf.distribute``:

- TensorFlow backend: the states are untracked (as in Keras) and created
  ``synchronization="on_read", aggregation="none"``. Without a strategy that is a
  plain variable; under a ``tf.distribute`` strategy each replica owns its own copy,
  the state of its share of the streams (see ``distribute.py``).
- JAX backend: Keras' stateful layers keep their states out of the variables the
  JAX trainer threads through its (pure) train step, so ``fit`` silently drops
  every state update and trains as if ``stateful=False``. Here the states are
  tracked non-trainable variables (in ``model.variables``, so ``fit`` carries them),
  but left out of ``layer.weights`` and of saved ``.keras`` files, so both stay as
  Keras' layers have them; ``checkpoint.py`` saves them once, as states.
"""

from __future__ import annotations

import keras
import numpy as np
from keras.src.utils.tracking import no_automatic_dependency_tracking  # what Keras' RNN uses for its states

from keras_charrnn.config import TrainConfig
from keras_charrnn.errors import ConfigError, InputError

STOCK_LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}
STATES_PER_LAYER = {"lstm": ("h", "c"), "gru": ("h",), "rnn": ("h",)}


def _tf_distribute():
    """``keras_charrnn.distribute`` on the TensorFlow backend (replica-local states), None on others."""
    if keras.backend.backend() != "tensorflow":
        return None
    from keras_charrnn import distribute

    return distribute


class StatefulStatesMixin:
    """Hidden-state variables for Keras' recurrent layers that work on every backend and under ``tf.distribute``.

    See the module docstring. Mixed into ``keras.layers.LSTM``/``GRU``/``SimpleRNN``;
    overrides only how the state variables are made, built, read in Keras' symbolic
    build, reset, listed in ``weights`` and saved.
    """

    def _create_state_variables(self, batch_size):
        if keras.backend.backend() == "tensorflow":
            self._create_replica_local_states(batch_size)
            return
        self.states = [
            self.add_weight(shape=tuple(s.shape), initializer="zeros", trainable=False, name=f"rnn_state_{i}")
            for i, s in enumerate(self.get_initial_state(batch_size))
        ]

    @no_automatic_dependency_tracking
    def _create_replica_local_states(self, batch_size):
        with keras.name_scope(self.name, caller=self):
            self.states = [
                keras.Variable(
                    value,
                    trainable=False,
                    dtype=self.variable_dtype,
                    name="rnn_state",
                    synchronization="on_read",
                    aggregation="none",
                )
                for value in self.get_initial_state(batch_size)
            ]

    def build(self, sequences_shape, initial_state_shape=None):
        # Keras' RNN.build reads the state (its shape, and zeros_like(state) to reset it); a replica-local
        # state cannot be read outside its replica, so this uses the static shapes only.
        if isinstance(self.cell, keras.layers.Layer) and not self.cell.built:
            self.cell.build((sequences_shape[0],) + tuple(sequences_shape[2:]))
            self.cell.built = True
        if self.stateful:
            if self.states is None:
                if sequences_shape[0] is None:
                    raise ConfigError("a stateful model needs a fixed batch_size")
                self._create_state_variables(sequences_shape[0])
                self._expected_batch_size = sequences_shape[0]
            else:
                self.reset_state()

    def call(self, sequences, initial_state=None, mask=None, training=False):
        dist = _tf_distribute() if self.stateful and initial_state is None else None
        if dist is not None and dist.in_cross_replica_context():
            # Keras' TF trainer builds the model symbolically outside the replicas, where a replica-local
            # state cannot be read: that build only needs shapes, so it starts from zeros.
            self.stateful = False
            try:
                return super().call(sequences, initial_state=None, mask=mask, training=training)
            finally:
                self.stateful = True
        if self.stateful and initial_state is None and keras.backend.backend() == "torch":
            # Keras assigns the new state in place at the end of the call, which on torch would change a
            # tensor that autograd saved for the backward pass: start from a copy of the state.
            initial_state = [keras.ops.copy(v) for v in self.states]
        return super().call(sequences, initial_state=initial_state, mask=mask, training=training)

    def reset_state(self):
        if self.states is None:
            return
        dist = _tf_distribute()
        for v in self.states:
            if dist is not None:
                dist.zero_local(v)
            else:
                v.assign(keras.ops.zeros(v.shape, v.dtype))

    def _state_ids(self) -> set[int]:
        return {id(v) for v in self.states or ()} if self.stateful else set()

    @property
    def weights(self):
        skip = self._state_ids()
        return [w for w in super().weights if id(w) not in skip]

    def _own_saved_variables(self) -> list:
        skip = self._state_ids()
        variables = self._trainable_variables + self._non_trainable_variables  # type: ignore[attr-defined]
        return [v for v in variables if id(v) not in skip]

    def save_own_variables(self, store):
        for i, v in enumerate(self._own_saved_variables()):
            store[f"{i}"] = v

    def load_own_variables(self, store):
        own = self._own_saved_variables()
        if len(store.keys()) != len(own):
            raise ValueError(
                f"layer {self.name!r} expects {len(own)} saved variables, the file has {len(store.keys())}"
            )
        for i, v in enumerate(own):
            v.assign(store[f"{i}"])


@keras.saving.register_keras_serializable(package="keras_charrnn")
class CharLSTM(StatefulStatesMixin, keras.layers.LSTM):
    """``keras.layers.LSTM`` with hidden states for every backend and ``tf.distribute`` (``StatefulStatesMixin``)."""


@keras.saving.register_keras_serializable(package="keras_charrnn")
class CharGRU(StatefulStatesMixin, keras.layers.GRU):
    """``keras.layers.GRU`` with hidden states for every backend and ``tf.distribute`` (``StatefulStatesMixin``)."""


@keras.saving.register_keras_serializable(package="keras_charrnn")
class CharSimpleRNN(StatefulStatesMixin, keras.layers.SimpleRNN):
    """``keras.layers.SimpleRNN`` with hidden states for every backend and ``tf.distribute``."""


CELL_LAYERS: dict[str, type[keras.layers.RNN]] = {"lstm": CharLSTM, "gru": CharGRU, "rnn": CharSimpleRNN}


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
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (SimpleRNN).
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
    if cell not in CELL_LAYERS:
        raise ConfigError(f"cell must be one of {', '.join(CELL_LAYERS)}, got {cell!r}")
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
        x = CELL_LAYERS[cell](units, return_sequences=True, stateful=stateful, name=f"rnn_{i}")(x)
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
    cell = next(name for name, cls in STOCK_LAYERS.items() if isinstance(rnns[0], cls))
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
    """Names of the hidden-state tensors, in order: ``h_0, c_0, h_1, c_1`` for LSTM."""
    return [f"{s}_{i}" for i in range(layers) for s in STATES_PER_LAYER[cell]]


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
    dist = _tf_distribute()
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
    dist = _tf_distribute()
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
