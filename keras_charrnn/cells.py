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

MIN_LOOP_ROWS = 2  # under XLA, a product (and the sampling loop) runs on at least this many rows (see ``matmul``)


def _compiled_by_xla() -> bool:
    """Whether the op being built is inside a ``jit_compile=True`` function (or a loop in one)."""
    if _in_xla_context is None:
        return True
    return _in_xla_context(tf.compat.v1.get_default_graph())


def matmul(x, w):
    """``x @ w`` where every row of the result is bitwise the same whatever the number of rows.

    Every row is multiplied on its own: the result for a row is one ``[1, K] x [K, N]``
    product of that row and ``w``, whatever the batch size and whatever the row's place
    in it. So no decision a kernel makes from the shape it is given (matrix-vector or
    matrix-matrix code, register blocking and its left-over rows, cache blocking of the
    sum over ``K`` from the CPU's cache sizes, how threads split the work) can depend on
    the rows beside it: every row's product has the same shape, and no row has a place
    in a block of rows. A row's bits then depend on its own values, ``w``, the machine
    and the flavour only.

    * In graph mode (the default signatures, and a stock ``tensorflow_model_server``)
      the rows are one ``BatchMatMulV2`` of ``[M, 1, K]`` by ``w``: TensorFlow's own CPU
      kernel runs a product of one row per batch entry as its own single-threaded
      contraction, and oneDNN's kernel (on by default on x86-64) keeps the entries
      apart on AVX2 and AVX-512.
    * Under XLA (the ``*_xla`` twins), which folds a batched product with a shared
      operand back into one ``[M, K] x [K, N]`` matrix product, the rows are multiplied
      one per iteration of a loop XLA compiles once for one row; a lone row gets one
      padding row, since XLA drops a loop of one iteration and compiles the product
      with its consumers.

    A row's bits in graph mode and under XLA differ (other kernels), so the default
    signatures and their ``*_xla`` twins are each batch-invariant, not equal to each
    other bit for bit. BENCHMARKS.md ("Batch invariance") has the argument, the
    alternatives measured and what this costs.

    Args:
        x: float32 [M, K], M >= 0.
        w: float32 [K, N] with a static shape.

    Returns:
        float32 [M, N], ``tf.matmul(x, w)`` up to rounding.

    Example:

    >>> y = matmul(tf.ones([3, 5]), tf.ones([5, 2]))  # three [1, 5] x [5, 2] products
    >>> y.shape
    TensorShape([3, 2])
    """
    n = w.shape[1]
    if not _compiled_by_xla():
        y = tf.linalg.matmul(x[:, None, :], w)[:, 0, :]
        return tf.ensure_shape(y, [x.shape[0], n])
    # At least two iterations: XLA removes a loop of one, and the product of a lone row
    # is then compiled together with the ops that use it, into other code.
    m = tf.shape(x)[0]
    rows = tf.pad(x, [[0, tf.maximum(MIN_LOOP_ROWS - m, 0)], [0, 0]])
    y = tf.map_fn(
        lambda row: tf.matmul(row[None, :], w)[0],
        rows,
        parallel_iterations=1,
        fn_output_signature=tf.TensorSpec([n], x.dtype),
    )
    return tf.ensure_shape(y[:m], [x.shape[0], n])


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
