"""The recurrent cells as plain TensorFlow ops on Keras' weights.

Each cell is split in two, as cuDNN and PyTorch do it: ``project`` computes
the input's contribution for every time step at once (one large matmul),
``recur`` advances the state one step using only the recurrent matmul. The
math and weight layout are those of ``keras.layers.LSTM``, ``GRU``
(``reset_after=True``) and ``SimpleRNN``, so the exported stateless model
computes what the trained stateful model computes; ``tests/test_export.py``
checks the equality to 1e-5.

``weights`` is ``[kernel, recurrent_kernel, bias]`` as ``layer.get_weights()``
returns them.

Every matrix product goes through ``matmul``, which makes each row's result
bitwise independent of how many rows share the product (batch invariance, see
``matmul``); ``tests/test_batch_invariance.py`` checks it end to end.
"""

from __future__ import annotations

import tensorflow as tf

from keras_charrnn.errors import ConfigError

try:  # how Keras and TF's own layers tell an XLA-compiled trace from a plain one
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext as _in_xla_context
except ImportError:  # pragma: no cover - a TF without it: take the path that is invariant in both modes
    _in_xla_context = None

ROW_MULTIPLE = 4  # a matmul's rows are padded to a multiple of this (graph mode) ...
ROW_TILE = 32  # ... and, under XLA, cut into tiles of this many rows (see ``matmul``)


def _compiled_by_xla() -> bool:
    """Whether the op being built is inside a ``jit_compile=True`` function (or a loop in one)."""
    if _in_xla_context is None:
        return True
    return _in_xla_context(tf.compat.v1.get_default_graph())


def matmul(x, w):
    """``x @ w`` where every row of the result is bitwise the same whatever the number of rows.

    CPU kernels pick their code, and with it the order of the sum over ``K``, from the
    shape: one row takes a matrix-vector path, Eigen (oneDNN off) treats some left-over
    rows apart, and XLA leaves its small-matrix code above about 32 rows. So a row's
    bits would depend on the batch it shares. Measured on TensorFlow 2.21 (x86-64,
    oneDNN on and off), a row comes out the same

    * in graph mode, in any matmul whose row count is a multiple of ``ROW_MULTIPLE``
      (checked up to 6400 rows): one padded matmul;
    * under XLA, in any matmul of 2 to ``ROW_TILE`` rows that XLA compiles the same
      way (one row takes a matrix-vector path, more than about ``ROW_TILE`` another
      kernel): fewer than ``ROW_TILE`` rows are padded by one row (a product whose
      result is not sliced was seen fused into its consumer, e.g. a GRU's bias add,
      and compiled into other code inside the sampling loop; one row, not a multiple
      of ``ROW_MULTIPLE``, keeps single rows cheap), ``ROW_TILE`` rows are two 16-row
      tiles, and more are ``ROW_TILE``-row tiles; tiles are multiplied one at a time
      in a loop that XLA cannot merge back into one large product (it does merge a
      batched matmul) nor drop (it does drop a loop of one iteration).

    A row's bits in graph mode and under XLA differ (other kernels), so the default
    signatures and their ``*_xla`` twins are each batch-invariant, not equal to each
    other bit for bit. This is an observed property of TensorFlow's kernels on one CPU
    type, not a documented contract: another CPU type or TensorFlow version may give
    other bits (``tests/test_batch_invariance.py`` catches a change).

    Args:
        x: float32 [M, K], M >= 0.
        w: float32 [K, N] with a static shape.

    Returns:
        float32 [M, N], ``tf.matmul(x, w)`` up to rounding.

    Example:

    >>> y = matmul(tf.ones([3, 5]), tf.ones([5, 2]))  # rows padded to 4, then cut back to 3
    >>> y.shape
    TensorShape([3, 2])
    """
    k, n = w.shape
    m = tf.shape(x)[0]

    def padded(rows):
        return tf.pad(x, [[0, rows - m], [0, 0]])

    if not _compiled_by_xla():
        y = tf.matmul(padded((m + ROW_MULTIPLE - 1) // ROW_MULTIPLE * ROW_MULTIPLE), w)[:m]
        return tf.ensure_shape(y, [x.shape[0], n])

    def one_product():  # one row of padding, at most ROW_TILE rows
        return tf.matmul(padded(m + 1), w)[:m]

    def tiles(rows):  # a loop over at least two tiles, so XLA keeps the loop
        count = (m + rows - 1) // rows
        y = tf.map_fn(lambda tile: tf.matmul(tile, w), tf.reshape(padded(count * rows), [count, rows, k]),
                      parallel_iterations=1)
        return tf.reshape(y, [-1, n])[:m]

    # XLA compiles for the actual row count, so only one branch is ever compiled.
    y = tf.cond(m < ROW_TILE, one_product,
                lambda: tf.cond(m > ROW_TILE, lambda: tiles(ROW_TILE), lambda: tiles(ROW_TILE // 2)))
    return tf.ensure_shape(y, [x.shape[0], n])


def matmul_rows(x, w):
    """``x @ w`` through ``matmul`` for ``x`` of any leading shape [..., K] (e.g. [T, B, K]).

    Args:
        x: float32 [..., K].
        w: float32 [K, N] with a static shape.

    Returns:
        float32 [..., N].
    """
    if x.shape.rank == 2:
        return matmul(x, w)
    y = matmul(tf.reshape(x, [-1, w.shape[0]]), w)
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [w.shape[1]]], 0))


def project(cell: str, x, weights):
    """The input's share of the pre-activations, for inputs of any leading shape."""
    kernel, _, bias = weights
    return matmul_rows(x, kernel) + (bias[0] if cell == "gru" else bias)


def recur(cell: str, xw, states, weights):
    """One step from the projected input ``xw`` [B, G] and ``states``; returns ``(h, states)``."""
    _, recurrent_kernel, bias = weights
    if cell == "lstm":
        h, c = states
        i, f, g, o = tf.split(xw + matmul(h, recurrent_kernel), 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, (h, c)
    if cell == "gru":
        (h,) = states
        xz, xr, xh = tf.split(xw, 3, axis=-1)
        hz, hr, hh = tf.split(matmul(h, recurrent_kernel) + bias[1], 3, axis=-1)
        z = tf.sigmoid(xz + hz)
        r = tf.sigmoid(xr + hr)
        h = z * h + (1.0 - z) * tf.tanh(xh + r * hh)
        return h, (h,)
    if cell == "rnn":
        (h,) = states
        h = tf.tanh(xw + matmul(h, recurrent_kernel))
        return h, (h,)
    raise ConfigError(f"cell must be lstm, gru or rnn, got {cell!r}")
