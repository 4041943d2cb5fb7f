"""The exported model's batch-invariant TensorFlow ops: matrix products, row means, division by a row's scalar.

Every matrix product of the exported model goes through ``matmul`` (or
``matmul_rows``), which makes each row's result bitwise independent of how many
rows share the product (batch invariance, see ``matmul``), every mean over a
row through ``row_mean``, a product too, and every division by one number per
row through ``divide_rows``. The cells' own math, as TF ops on these, is in
``cell_types.py``; ``tests/test_batch_invariance.py`` checks the invariance end
to end.
"""

from __future__ import annotations

import tensorflow as tf

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


def row_mean(x):
    """The mean of each row of ``x`` over its last axis, through ``matmul_rows``: batch-invariant like it.

    A reduction op (``tf.reduce_mean``) may pick its code from the whole shape (TensorFlow
    folds a lone row into a full reduction of one vector); a product of each row with a
    column of ones is the same ``[1, N] x [N, 1]`` product for every row, whatever the rows
    beside it.

    Args:
        x: float32 [..., N] with a static last dimension.

    Returns:
        float32 [..., 1], ``tf.reduce_mean(x, -1, keepdims=True)`` up to rounding.

    Example:

    >>> row_mean(tf.constant([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])).numpy().tolist()
    [[2.0], [4.0]]
    """
    n = x.shape[-1]
    return matmul_rows(x, tf.ones([n, 1], x.dtype)) / n


def divide_rows(x, d):
    """``x / d`` for one divisor per row, batch-invariant: the divisor is broadcast to ``x``'s shape first.

    Grappler and XLA rewrite ``x / sqrt(v)`` as ``x * rsqrt(v)`` (and ``1 / d`` as a
    reciprocal). On a ``[B, 1]`` column the CPU kernels compute ``rsqrt`` with vector
    instructions (an approximation refined by a Newton step) for whole vectors of rows
    and with scalar code (exact) for the rows left over, so a row's bits would depend on
    ``B``. Divided by its own divisor broadcast to ``[B, N]``, every element is one exact
    (correctly rounded) division, whatever the rows beside it.

    Args:
        x: float32 [..., N].
        d: float32 [..., 1], one divisor per row.

    Returns:
        float32 [..., N], ``x / d``.

    Example:

    >>> divide_rows(tf.constant([[2.0, 4.0], [3.0, 6.0]]), tf.constant([[2.0], [3.0]])).numpy().tolist()
    [[1.0, 2.0], [1.0, 2.0]]
    """
    return x / tf.broadcast_to(d, tf.shape(x))
