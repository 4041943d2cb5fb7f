"""The package's Keras recurrent layers, one per cell type of ``cell_types.CELLS``.

``CharLSTM``, ``CharGRU`` and ``CharSimpleRNN`` are Keras' ``LSTM``, ``GRU`` and ``SimpleRNN`` with the same
math, config and weights (``layer.get_weights()`` is Keras' ``[kernel, recurrent_kernel,
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

``CharLNLSTM`` is the layer-normalised LSTM (``LNLSTMCell`` in ``keras.layers.RNN``), written in
``keras.ops`` for every backend, with the same hidden-state variables.
"""

from __future__ import annotations

import keras
from keras.src.utils.tracking import no_automatic_dependency_tracking  # what Keras' RNN uses for its states

from keras_charrnn.cell_types import RowOps, lnlstm_input, lnlstm_step
from keras_charrnn.errors import ConfigError


def tf_distribute():
    """``keras_charrnn.distribute`` on the TensorFlow backend (replica-local states), None on others."""
    if keras.backend.backend() != "tensorflow":
        return None
    from keras_charrnn import distribute

    return distribute


class StatefulStatesMixin:
    """Hidden-state variables for Keras' recurrent layers that work on every backend and under ``tf.distribute``.

    See the module docstring. Mixed into ``keras.layers.LSTM``/``GRU``/``SimpleRNN``/``RNN``;
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
        dist = tf_distribute() if self.stateful and initial_state is None else None
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
        dist = tf_distribute()
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


_KERAS_ROWS = RowOps(mean=lambda z: keras.ops.mean(z, axis=-1, keepdims=True), divide=keras.ops.divide)


def _forget_bias_ones(units: int):
    """An initializer of the 4 * units gate bias: 1 for the forget gate, 0 elsewhere (Keras' ``unit_forget_bias``)."""

    def init(shape, dtype=None):
        zeros = keras.ops.zeros((units,), dtype=dtype)
        return keras.ops.concatenate([zeros, keras.ops.ones((units,), dtype=dtype), zeros, zeros])

    return init


@keras.saving.register_keras_serializable(package="keras_charrnn")
class LNLSTMCell(keras.layers.Layer):
    """The layer-normalised LSTM cell of Ba, Kiros and Hinton 2016 ("Layer Normalization", LN for RNNs).

    With ``LN(z; g, b) = (z - mean(z)) / sqrt(var(z) + epsilon) * g + b`` over each row's units
    (mean and variance of the row's own elements, never across the batch)::

        i, f, g, o = split(LN(W_x x; g_x, b_x) + LN(W_h h; g_h, b_h))     # gates in Keras' LSTM order
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(LN(c'; g_c, b_c))

    The layer norms of ``W_x x`` and ``W_h h`` each normalise the whole ``4 * units`` pre-activation
    vector, as in the paper. The paper's separate gate bias ``b`` is left out: it only adds to
    ``b_x + b_h``, so it would add parameters and no function; ``b_x`` starts with 1 for the forget
    gate (Keras' ``unit_forget_bias``), every other bias at 0 and every gain at 1. The math is
    ``cell_types.lnlstm_input``/``lnlstm_step``, the same code the exported twin runs on TF ops.

    ``epsilon`` is ``cell_types.LN_EPSILON``, the twin's too.

    Args:
        units: the size of ``h`` and ``c``.
        **kwargs: ``keras.layers.Layer``'s (``name``, ``dtype``).

    Example:

    >>> layer = keras.layers.RNN(LNLSTMCell(8), return_sequences=True)
    >>> tuple(layer(keras.ops.ones((2, 5, 3))).shape)
    (2, 5, 8)

    Weights (``get_weights()`` order): ``kernel`` [inputs, 4u], ``recurrent_kernel`` [u, 4u],
    ``input_gain``, ``input_bias``, ``recurrent_gain``, ``recurrent_bias`` [4u], ``cell_gain``,
    ``cell_bias`` [u].
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = [units, units]
        self.output_size = units

    def build(self, input_shape):
        u, width = self.units, 4 * self.units

        def vector(name, size, init):
            return self.add_weight(shape=(size,), initializer=init, name=name)

        self.kernel = self.add_weight(shape=(input_shape[-1], width), initializer="glorot_uniform", name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(u, width), initializer="orthogonal", name="recurrent_kernel")
        self.norm_weights = [
            vector("input_gain", width, "ones"),
            vector("input_bias", width, _forget_bias_ones(u)),
            vector("recurrent_gain", width, "ones"),
            vector("recurrent_bias", width, "zeros"),
            vector("cell_gain", u, "ones"),
            vector("cell_bias", u, "zeros"),
        ]
        self.built = True

    def call(self, inputs, states, training=False):
        h, c = states
        weights = [self.kernel, self.recurrent_kernel, *self.norm_weights]
        ops = keras.ops
        x_share = lnlstm_input(ops, _KERAS_ROWS, ops.matmul(inputs, self.kernel), weights)
        h, c = lnlstm_step(ops, _KERAS_ROWS, x_share, ops.matmul(h, self.recurrent_kernel), c, weights)
        return h, [h, c]

    def get_initial_state(self, batch_size=None):
        return [keras.ops.zeros((batch_size, d), dtype=self.compute_dtype) for d in self.state_size]

    def get_config(self) -> dict:
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="keras_charrnn")
class CharLNLSTM(StatefulStatesMixin, keras.layers.RNN):
    """The layer-normalised LSTM layer: ``LNLSTMCell`` in ``keras.layers.RNN``, with the package's hidden states.

    Args:
        units: the size of ``h`` and ``c``.
        **kwargs: ``keras.layers.RNN``'s (``return_sequences``, ``stateful``, ``name``, ...).

    Example:

    >>> layer = CharLNLSTM(8, return_sequences=True)
    >>> tuple(layer(keras.ops.ones((2, 5, 3))).shape)
    (2, 5, 8)
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(LNLSTMCell(units, name="lnlstm_cell"), **kwargs)

    @property
    def units(self) -> int:
        return self.cell.units

    def get_config(self) -> dict:
        config = super().get_config()
        del config["cell"]
        return {**config, "units": self.cell.units}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
