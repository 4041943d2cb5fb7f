"""The cell types: every fact about a recurrent cell in one ``CellSpec``, and ``CELLS``, the registry.

A cell type is its Keras layer (``keras_charrnn.layers``), the names of its states, its gate
count, which state is its output ``h``, its parameter and FLOP counts, and its twin in plain
TensorFlow ops for the exported model: ``project`` (the input's share of the pre-activations,
every time step at once) and ``recur`` (one step from the projected input and the states), as
cuDNN and PyTorch split a cell. The twin computes what the Keras layer computes, on the
layer's own weights (``layer.get_weights()``); ``tests/test_export.py`` checks the equality to
1e-5. Every product in a twin goes through ``cells.matmul``/``matmul_rows``, every mean over a
row through ``cells.row_mean`` and every division by a row's own number through
``cells.divide_rows``, which make each row's bits independent of the rows beside it (batch
invariance, ``tests/test_batch_invariance.py``).

``config``, ``model``, ``export`` and ``budget`` read this registry; a new cell type is one
more ``CellSpec`` here (and its Keras layer in ``layers.py`` if Keras has none).

Pure Python at import (``config`` reads the names, and the CLI shows its help without
TensorFlow): the twins import TensorFlow when they are first traced, the Keras layer is
looked up in ``keras_charrnn.layers`` when a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from keras_charrnn.errors import ConfigError

LN_EPSILON = 1e-5  # added to the variance in the layer-normalised LSTM's layer norms


@dataclass(frozen=True)
class CellSpec:
    """Everything the package knows about one cell type.

    Args:
        name: the ``cell`` value (``TrainConfig.cell``, ``--cell``, the SavedModel's ``config``).
        about: what it is, in a few words (the README and ``--help``).
        layer: the Keras layer's class name in ``keras_charrnn.layers``.
        states: the per-layer state names, in the layer's order (``("h", "c")``).
        output_state: the index in ``states`` of the state that is the layer's output ``h``.
        gates: gates per unit: the width of the pre-activations is ``gates * units``.
        vectors: per-unit parameter vectors besides the two kernels (biases, gains), counted in
            units: ``params`` adds ``vectors * units``.
        project: ``project(x, weights)``, the input's share of the pre-activations for ``x`` of any
            leading shape ``[..., inputs]``, as TF ops on ``layer.get_weights()``.
        recur: ``recur(xw, states, weights)`` -> ``(h, states)``: one step from the projected input
            ``xw`` [B, gates * units] and the states (a tuple in ``states`` order), as TF ops.

    Example:

    >>> CELLS["lstm"].states, CELLS["lstm"].params(inputs=64, units=128)
    (('h', 'c'), 98816)
    """

    name: str
    about: str
    layer: str
    states: tuple[str, ...]
    output_state: int
    gates: int
    vectors: int
    project: Callable[[Any, Sequence[Any]], Any]
    recur: Callable[[Any, tuple, Sequence[Any]], tuple[Any, tuple]]

    def params(self, inputs: int, units: int) -> int:
        """Trainable parameters of one layer of ``units`` units fed ``inputs`` features.

        Args:
            inputs: the layer's input width (the embedding, or the layer below's units).
            units: the layer's units.

        Returns:
            Both kernels and every per-unit vector.
        """
        return self.gates * units * (inputs + units) + self.vectors * units

    def flops_per_char(self, inputs: int, units: int) -> int:
        """Matmul FLOPs (2 per multiply-add) of one layer per character, forward; element-wise ops not counted.

        Args:
            inputs: the layer's input width.
            units: the layer's units.

        Returns:
            ``2 * gates * units * (inputs + units)``.
        """
        return 2 * self.gates * units * (inputs + units)

    def layer_class(self) -> type:
        """The Keras layer class (imports Keras).

        Returns:
            ``keras_charrnn.layers.<layer>``, a stateful-capable ``keras.layers.RNN``.
        """
        return getattr(importlib.import_module("keras_charrnn.layers"), self.layer)

    def output(self, states: Sequence[Any]) -> Any:
        """The output ``h`` among one layer's ``states`` (in ``states`` order)."""
        return states[self.output_state]


class RowOps(NamedTuple):
    """The per-row operations of a layer norm, as the Keras layer or the exported twin computes them.

    Args:
        mean: the mean over the last axis, keeping it (``[..., N]`` -> ``[..., 1]``).
        divide: ``divide(x, d)``, ``x`` [..., N] divided by one divisor per row ``d`` [..., 1].
    """

    mean: Callable
    divide: Callable


def _tf():
    """TensorFlow and ``keras_charrnn.cells``, imported when a twin is first traced (see the module doc)."""
    import tensorflow as tf

    from keras_charrnn import cells

    return tf, cells


def _tf_rows() -> RowOps:
    """The twin's batch-invariant row operations (``cells.row_mean``, ``cells.divide_rows``)."""
    _, cells = _tf()
    return RowOps(cells.row_mean, cells.divide_rows)


# ----- the twins of Keras' LSTM, GRU (reset_after=True) and SimpleRNN: their math and weight layout


def _project_with_bias(x, weights):
    """``x @ kernel + bias``: the LSTM's and SimpleRNN's input share."""
    _, cells = _tf()
    kernel, _, bias = weights
    return cells.matmul_rows(x, kernel) + bias


def _lstm_recur(xw, states, weights):
    tf, cells = _tf()
    h, c = states
    i, f, g, o = tf.split(xw + cells.matmul(h, weights[1]), 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    h = tf.sigmoid(o) * tf.tanh(c)
    return h, (h, c)


def _gru_project(x, weights):
    """``x @ kernel`` plus the input bias (Keras' GRU keeps an input and a recurrent bias row)."""
    _, cells = _tf()
    kernel, _, bias = weights
    return cells.matmul_rows(x, kernel) + bias[0]


def _gru_recur(xw, states, weights):
    tf, cells = _tf()
    _, recurrent_kernel, bias = weights
    (h,) = states
    xz, xr, xh = tf.split(xw, 3, axis=-1)
    hz, hr, hh = tf.split(cells.matmul(h, recurrent_kernel) + bias[1], 3, axis=-1)
    z = tf.sigmoid(xz + hz)
    r = tf.sigmoid(xr + hr)
    h = z * h + (1.0 - z) * tf.tanh(xh + r * hh)
    return h, (h,)


def _rnn_recur(xw, states, weights):
    tf, cells = _tf()
    (h,) = states
    h = tf.tanh(xw + cells.matmul(h, weights[1]))
    return h, (h,)


# ----- the layer-normalised LSTM: one copy of its math, for Keras (keras.ops) and for its twin (tf)


def layer_norm(ops: Any, rows: RowOps, z, gain, bias, epsilon: float = LN_EPSILON):
    """Layer normalisation of each row of ``z`` over its last axis: ``(z - mean) / sqrt(var + epsilon) * gain + bias``.

    The mean and the variance are each row's own (over its ``N`` elements, never across rows).

    Args:
        ops: the op namespace: ``keras.ops`` (the Keras layer, any backend) or ``tensorflow`` (the twin).
        rows: the per-row mean and division (``RowOps``).
        z: the rows, ``[..., N]``.
        gain: ``[N]``.
        bias: ``[N]``.
        epsilon: added to the variance.

    Returns:
        ``[..., N]``.
    """
    centred = z - rows.mean(z)
    return rows.divide(centred, ops.sqrt(rows.mean(ops.square(centred)) + epsilon)) * gain + bias


def lnlstm_input(ops: Any, rows: RowOps, xw, weights: Sequence[Any]):
    """The layer-normalised LSTM's input share ``LN(W_x x; gain_x, bias_x)`` from ``xw = x @ W_x``.

    Args:
        ops: ``keras.ops`` or ``tensorflow`` (see ``layer_norm``).
        rows: the per-row mean and division (``RowOps``).
        xw: ``[..., 4 * units]``.
        weights: the layer's weights (``LNLSTMCell`` order).

    Returns:
        ``[..., 4 * units]``.
    """
    return layer_norm(ops, rows, xw, weights[2], weights[3])


def lnlstm_step(ops: Any, rows: RowOps, x_share, hw, c, weights: Sequence[Any]):
    """One step of the layer-normalised LSTM from its input share, ``hw = h @ W_h`` and ``c``.

    Args:
        ops: ``keras.ops`` or ``tensorflow`` (see ``layer_norm``).
        rows: the per-row mean and division (``RowOps``).
        x_share: ``lnlstm_input`` of this step, ``[B, 4 * units]``.
        hw: the previous ``h`` times the recurrent kernel, ``[B, 4 * units]``.
        c: the previous cell state, ``[B, units]``.
        weights: the layer's weights (``LNLSTMCell`` order).

    Returns:
        ``(h, c)``, each ``[B, units]``.
    """
    gates = x_share + layer_norm(ops, rows, hw, weights[4], weights[5])
    i, f, g, o = ops.split(gates, 4, axis=-1)
    c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
    h = ops.sigmoid(o) * ops.tanh(layer_norm(ops, rows, c, weights[6], weights[7]))
    return h, c


def _lnlstm_project(x, weights):
    tf, cells = _tf()
    return lnlstm_input(tf, _tf_rows(), cells.matmul_rows(x, weights[0]), weights)


def _lnlstm_recur(xw, states, weights):
    tf, cells = _tf()
    h, c = states
    h, c = lnlstm_step(tf, _tf_rows(), xw, cells.matmul(h, weights[1]), c, weights)
    return h, (h, c)


CELLS: dict[str, CellSpec] = {
    spec.name: spec
    for spec in (
        CellSpec("lstm", "Keras' LSTM", "CharLSTM", ("h", "c"), 0, 4, 4, _project_with_bias, _lstm_recur),
        CellSpec("gru", "Keras' GRU, reset_after", "CharGRU", ("h",), 0, 3, 6, _gru_project, _gru_recur),
        CellSpec("rnn", "Keras' SimpleRNN, tanh", "CharSimpleRNN", ("h",), 0, 1, 1, _project_with_bias, _rnn_recur),
        # Weights: both kernels, the input and recurrent layer norms' gain and bias (4 * units each), the
        # cell state's layer norm gain and bias (units each): 4 + 4 + 4 + 4 + 1 + 1 vectors of units.
        CellSpec(
            "lnlstm",
            "layer-normalised LSTM, Ba et al. 2016",
            "CharLNLSTM",
            ("h", "c"),
            0,
            4,
            18,
            _lnlstm_project,
            _lnlstm_recur,
        ),
    )
}


def cell_spec(name: str) -> CellSpec:
    """The registry's spec of cell type ``name``.

    Args:
        name: a cell type, e.g. ``"lstm"``.

    Returns:
        Its ``CellSpec``.

    Raises:
        ConfigError: ``name`` is no cell type; the message names the parameter ``cell`` and every choice.

    Example:

    >>> cell_spec("gru").gates
    3
    """
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"cell must be one of {', '.join(CELLS)}, got {name!r}") from None
