"""Choosing the next character inside the graph: temperature, top-k, top-p, keyed randomness.

Randomness is a pure function of (seed, position, character id) for every
row: a SplitMix64 hash gives each candidate character a uniform number, and
Gumbel-max turns them into a draw from the softmax. So the character sampled
at position p of a session with seed s is the same whichever batch it shares
and however the generation is cut into calls.
"""

from __future__ import annotations

import tensorflow as tf

from keras_charrnn.generation import BIAS_BAN

_GOLDEN = 0x9E3779B97F4A7C15


def _u64(value: int) -> tf.Tensor:
    return tf.constant(value, tf.uint64)


def _mix64(x: tf.Tensor) -> tf.Tensor:
    """SplitMix64's finaliser: a bijective, well-mixed hash of 64-bit integers."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u64(30))) * _u64(0xBF58476D1CE4E5B9)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u64(27))) * _u64(0x94D049BB133111EB)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u64(31)))


def keyed_uniform(seed: tf.Tensor, position: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Uniform numbers in (0, 1) of shape [B, vocab_size], a pure function of (seed, position).

    Args:
        seed: int64 [B].
        position: int64 [B], the index of the character being sampled in its session.
        vocab_size: number of candidate ids.
    """
    key = _mix64(tf.bitcast(seed, tf.uint64) + _u64(_GOLDEN))
    key = _mix64(tf.bitwise.bitwise_xor(key, tf.bitcast(position, tf.uint64)))
    ids = tf.range(1, vocab_size + 1, dtype=tf.int64)
    bits = _mix64(key[:, None] + tf.bitcast(ids, tf.uint64)[None, :] * _u64(_GOLDEN))
    top24 = tf.cast(tf.bitwise.right_shift(bits, _u64(40)), tf.float32)
    return (top24 + 0.5) / float(1 << 24)


def filter_logits(logits: tf.Tensor, top_k: tf.Tensor, top_p: tf.Tensor) -> tf.Tensor:
    """Sets to -inf every logit outside each row's top-k and nucleus (top-p) set.

    Args:
        logits: float32 [B, V], already divided by the temperature.
        top_k: int32 [B]; 0 keeps every id.
        top_p: float32 [B] in (0, 1]; 1 keeps every id.
    """
    neg_inf = tf.constant(-float("inf"), logits.dtype)
    vocab = tf.shape(logits)[-1]
    ordered = tf.sort(logits, axis=-1, direction="DESCENDING")
    k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
    kth = tf.gather(ordered, k - 1, batch_dims=1)
    logits = tf.where(logits < kth[:, None], neg_inf, logits)

    ordered = tf.sort(logits, axis=-1, direction="DESCENDING")
    probs = tf.nn.softmax(ordered, axis=-1)
    before = tf.cumsum(probs, axis=-1, exclusive=True)
    # keep the smallest prefix whose mass reaches top_p: ids whose preceding mass is below it
    keep = before < top_p[:, None]
    floor = tf.reduce_min(tf.where(keep, ordered, tf.constant(float("inf"), logits.dtype)), axis=-1)
    nucleus = tf.where(logits < floor[:, None], neg_inf, logits)
    return tf.where((top_p < 1.0)[:, None], nucleus, logits)


def choose(
    logits: tf.Tensor,
    temperature: tf.Tensor,
    top_k: tf.Tensor,
    top_p: tf.Tensor,
    seed: tf.Tensor,
    position: tf.Tensor,
    min_p: tf.Tensor | None = None,
    bias: tf.Tensor | None = None,
) -> tf.Tensor:
    """Picks the next id of every row.

    Args:
        logits: float32 [B, V]; id 0 (unknown character) is never chosen.
        temperature: float32 [B]; 0 picks the most likely id.
        top_k, top_p: see ``filter_logits``.
        seed, position: int64 [B], the key of each row's randomness.
        min_p: float32 [B]; drop ids whose probability (after temperature, top-k and top-p) is
            below ``min_p`` times the most likely one's (0: off). None: not traced.
        bias: float32 [B, V] added to the logits first, bans as -inf (``effective_bias``).
            None: not traced (0.2's signatures, bit for bit as before).

    Returns:
        int32 [B].
    """
    vocab = logits.shape[-1] or tf.shape(logits)[-1]
    never_unknown = tf.concat([tf.fill([tf.shape(logits)[0], 1], -float("inf")), tf.zeros_like(logits[:, 1:])], axis=-1)
    logits = logits + never_unknown
    if bias is not None:
        logits = logits + bias
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    warm = temperature > 0
    scaled = logits / tf.where(warm, temperature, 1.0)[:, None]
    # The filter sorts each row twice; a row with top_k 0 and top_p 1 comes out of it bit for bit
    # unchanged, so a batch where no row filters skips it (a row's result is the same either way).
    filtering = tf.reduce_any((top_k > 0) | (top_p < 1.0))
    scaled = tf.cond(filtering, lambda: filter_logits(scaled, top_k, top_p), lambda: scaled)
    if min_p is not None:
        scaled = tf.cond(tf.reduce_any(min_p > 0.0), lambda: min_p_filter(scaled, min_p), lambda: scaled)
    gumbel = -tf.math.log(-tf.math.log(keyed_uniform(seed, position, vocab)))
    sampled = tf.argmax(scaled + gumbel, axis=-1, output_type=tf.int32)
    return tf.where(warm, sampled, greedy)


def effective_bias(bias: tf.Tensor) -> tf.Tensor:
    """A ``logit_bias`` as ``choose`` adds it: ``BIAS_BAN`` (-100) or less becomes -inf (the id is banned).

    Args:
        bias: float32 [B, V].

    Returns:
        float32 [B, V].
    """
    return tf.where(bias <= BIAS_BAN, tf.constant(-float("inf"), bias.dtype), bias)


def min_p_filter(logits: tf.Tensor, min_p: tf.Tensor) -> tf.Tensor:
    """Sets to -inf every logit whose probability is below ``min_p`` times its row's largest.

    Args:
        logits: float32 [B, V], already divided by the temperature and filtered.
        min_p: float32 [B] in [0, 1]; 0 keeps every id (the row comes out bit for bit unchanged).
    """
    top = tf.reduce_max(logits, axis=-1, keepdims=True)
    floor = top + tf.math.log(tf.maximum(min_p, 1e-30))[:, None]  # p_i >= min_p * p_max <=> l_i >= l_max + log(min_p)
    cut = tf.where(logits < floor, tf.constant(-float("inf"), logits.dtype), logits)
    return tf.where((min_p > 0.0)[:, None], cut, logits)
