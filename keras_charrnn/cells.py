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
"""

from __future__ import annotations

import tensorflow as tf

from keras_charrnn.errors import ConfigError


def project(cell: str, x, weights):
    """The input's share of the pre-activations, for inputs of any leading shape."""
    kernel, _, bias = weights
    return tf.tensordot(x, kernel, axes=1) + (bias[0] if cell == "gru" else bias)


def recur(cell: str, xw, states, weights):
    """One step from the projected input ``xw`` [B, G] and ``states``; returns ``(h, states)``."""
    _, recurrent_kernel, bias = weights
    if cell == "lstm":
        h, c = states
        i, f, g, o = tf.split(xw + tf.matmul(h, recurrent_kernel), 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, (h, c)
    if cell == "gru":
        (h,) = states
        xz, xr, xh = tf.split(xw, 3, axis=-1)
        hz, hr, hh = tf.split(tf.matmul(h, recurrent_kernel) + bias[1], 3, axis=-1)
        z = tf.sigmoid(xz + hz)
        r = tf.sigmoid(xr + hr)
        h = z * h + (1.0 - z) * tf.tanh(xh + r * hh)
        return h, (h,)
    if cell == "rnn":
        (h,) = states
        h = tf.tanh(xw + tf.matmul(h, recurrent_kernel))
        return h, (h,)
    raise ConfigError(f"cell must be lstm, gru or rnn, got {cell!r}")
