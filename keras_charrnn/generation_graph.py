"""The generation loop inside the exported graph: checks, sampling, stop strings, finish reasons and scores.

``sample_loop`` samples ``num_chars`` characters per row after the model has
fed its input. Rows are independent: each keys its randomness by (seed,
position), ends on its own (its ``num_chars`` reached, or a stop string
matched), and once ended neither samples nor feeds, so its states are those
after its input and every character it generated but the last, exactly as a
call that asked for that many characters would leave them.

Stop strings are matched on ids: each row keeps its last ``MAX_STOP_CHARS``
ids (the caller's ``stop_tail`` first, so a stop may begin in an earlier call)
and compares them with its stop strings, right-aligned.

The checks read the table of ``keras_charrnn.generation``: the graph refuses
what the server's NumPy checks refuse, with the same messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import tensorflow as tf

from keras_charrnn import decoding
from keras_charrnn.generation import (
    BIAS_BAN,
    BY_NAME,
    LOGPROBS_OFF,
    MAX_CHARS_PER_CALL,
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    inputs_of,
)

NO_ID = -2  # an empty place of a row's history: equal to no id


def graph_checks(signature: str, rows: Mapping[str, tf.Tensor], batch: tf.Tensor, vocab_size: int) -> list:
    """The assertions of a generate signature's inputs, from the table's rules (the server checks the same).

    Args:
        signature: the signature's name (its inputs come from ``inputs_of``).
        rows: its generation inputs by name (``stop`` as strings, unchecked here: see ``stop_ids``).
        batch: the number of rows.
        vocab_size: the model's ids.

    Returns:
        The assertion ops; nothing may run before them.
    """
    ctx = {
        "vocab_size": vocab_size,
        "max_chars_per_call": MAX_CHARS_PER_CALL,
        "max_stops": MAX_STOPS,
        "max_stop_chars": MAX_STOP_CHARS,
        "max_logprobs": min(MAX_LOGPROBS, vocab_size - 1),
    }
    same_batch = [
        tf.debugging.assert_equal(
            tf.shape(rows[i.name])[0], batch, message=f"{i.name} must have one row per row of the input"
        )
        for i in inputs_of(signature)
    ]
    checks = []
    with tf.control_dependencies(same_batch):
        checks.append(tf.debugging.assert_greater(batch, 0, message="the batch is empty"))
        for spec in inputs_of(signature):
            if spec.rule is None:
                continue
            if spec.row_shape == ("vocab",):
                width = tf.shape(rows[spec.name])[1]
                checks.append(
                    tf.debugging.assert_equal(
                        width, vocab_size, message=f"logit_bias must hold one value per vocabulary id ({vocab_size})"
                    )
                )
            ok = spec.rule(rows[spec.name], ctx)
            checks.append(tf.debugging.Assert(tf.reduce_all(ok), [spec.message_for(ctx)]))
        if "logit_bias" in rows:
            banned_all = tf.reduce_all(rows["logit_bias"][:, 1:] <= BIAS_BAN, axis=1)
            checks.append(
                tf.debugging.Assert(
                    ~tf.reduce_any(banned_all), ["logit_bias bans every character of a row: nothing could be sampled"]
                )
            )
        if "stop" in rows:
            checks.append(
                tf.debugging.assert_less_equal(
                    tf.shape(rows["stop"])[1], MAX_STOPS, message=BY_NAME["stop"].message_for(ctx)
                )
            )
    return checks


def stop_ids(stop: tf.Tensor, tail: tf.Tensor, encode: Callable, vocab_size: int) -> tuple[list, tf.Tensor, tf.Tensor]:
    """Stop strings and tails as ids, right-aligned in ``MAX_STOP_CHARS`` places; with their checks.

    Args:
        stop: string [B, S] (empty strings: unused places).
        tail: string [B], the last characters generated since the last feed.
        encode: the module's UTF-8 -> (ids [N, T], lengths [N]) (unknown characters -> 0).
        vocab_size: the model's ids.

    Returns:
        ``(checks, stops [B, S, L] int32 (-1 where a shorter string leaves the place free),
        history [B, L] int32 (``NO_ID`` where the tail leaves the place empty))``.
    """
    places = MAX_STOP_CHARS
    batch, count = tf.shape(stop)[0], tf.shape(stop)[1]
    ids, lengths = encode(tf.reshape(stop, [-1]))
    tail_ids, tail_lengths = encode(tail)
    message = f"stop: each stop string holds at most {MAX_STOP_CHARS} characters, all of the model's vocabulary"
    checks = [
        tf.debugging.Assert(tf.reduce_max(tf.concat([lengths, [0]], 0)) <= places, [message]),
        tf.debugging.Assert(~tf.reduce_any((ids == 0) & tf.sequence_mask(lengths, tf.shape(ids)[1])), [message]),
        tf.debugging.Assert(tf.reduce_max(tf.concat([tail_lengths, [0]], 0)) <= places, [BY_NAME["stop_tail"].message]),
    ]
    return (
        checks,
        _right_aligned(ids, lengths, -1, places, [batch, count]),
        _right_aligned(tail_ids, tail_lengths, NO_ID, places, [batch]),
    )


def _right_aligned(ids: tf.Tensor, lengths: tf.Tensor, fill: int, places: int, lead: list) -> tf.Tensor:
    """Each row's last ``places`` ids, right-aligned, ``fill`` before them: [*lead, places]."""
    width = tf.shape(ids)[1]
    source = tf.range(places)[None, :] - places + lengths[:, None]  # place j holds id number len - L + j
    valid = (source >= 0) & (source < width)
    picked = tf.gather(
        tf.concat([ids, tf.zeros([tf.shape(ids)[0], 1], ids.dtype)], 1),
        tf.where(valid, source, width),
        batch_dims=1,
    )
    return tf.reshape(tf.where(source >= 0, picked, fill), tf.concat([lead, [places]], 0))


def sample_loop(
    step_one: Callable,
    num_chars: tf.Tensor,
    last: tf.Tensor,
    states: list,
    rows: Mapping[str, tf.Tensor],
    controls: Mapping[str, tf.Tensor] | None,
    alternatives: int,
    skip_idle_controls: bool = False,
) -> dict:
    """Feeds each row's last input id, then samples up to ``num_chars[b]`` ids per row.

    Every id the loop feeds, the input's last one and each sampled one but a row's last, goes
    through the same ``step_one`` at the top of the loop's body: a call that continues from a
    row's last character computes bit for bit what one longer call computes, however a
    session's calls (or the server's segments) are cut, and under XLA as in the plain graph.

    Args:
        step_one: ``(ids [B], states) -> (logits [B, V], states)``, the model one character on.
        num_chars: int32 [B].
        last: int32 [B], each row's last input id (not fed yet).
        states: the states after each row's input but its last id.
        rows: ``temperature``, ``top_k``, ``top_p``, ``seed``, ``position`` [B].
        controls: None for 0.2's signatures (nothing else is traced); else ``min_p`` [B],
            ``bias`` [B, V], ``stops`` [B, S, L], ``history`` [B, L], ``min_chars`` [B],
            ``logprobs`` [B] (see ``stop_ids``).
        alternatives: how many alternatives the scores keep (static; ``top_ids`` width).
        skip_idle_controls: when no row of the batch uses a control (no stop, bias, min-p or
            scores), run the loop without them (the plain graph's per-step ops cost time; a row's
            bits are the same either way, so batch invariance holds).

    Returns:
        ``{"ids": [B, MAX_CHARS_PER_CALL] (0 past a row's end), "states", "num_generated" [B],
        "stop_index" [B] (-1: none)}`` and, with controls, ``"char_logprobs"`` [B, MAX],
        ``"top_ids"``/``"top_logprobs"`` [B, MAX, alternatives] (zeros unless asked).
    """
    if controls is not None and skip_idle_controls:
        used = (
            tf.reduce_any(controls["stops"] >= 0)
            | tf.reduce_any(controls["logprobs"] >= 0)
            | tf.reduce_any(controls["bias"] != 0.0)
            | tf.reduce_any(controls["min_p"] > 0.0)
        )

        def without():
            result = sample_loop(step_one, num_chars, last, states, rows, None, alternatives)
            shape = tf.stack([tf.shape(num_chars)[0], tf.reduce_max(num_chars)])
            scores = tf.concat([shape, [alternatives]], 0)
            return {
                **result,
                "char_logprobs": tf.zeros(shape),
                "top_ids": tf.zeros(scores, tf.int32),
                "top_logprobs": tf.zeros(scores),
            }

        return tf.cond(
            used, lambda: sample_loop(step_one, num_chars, last, states, rows, controls, alternatives), without
        )
    n = tf.reduce_max(num_chars)
    batch = tf.shape(num_chars)[0]
    sampling = (rows["temperature"], rows["top_k"], rows["top_p"], rows["seed"])
    extra = {}
    if controls is not None:  # what every step reads, worked out once
        extra = {"min_p": controls["min_p"], "bias": decoding.effective_bias(controls["bias"])}
        stops = tf.concat([controls["stops"], tf.fill([batch, 1, MAX_STOP_CHARS], -1)], 1)  # never S = 0
        free = stops == -1  # places a shorter stop leaves free
        real = tf.reduce_any(~free, -1)  # [B, S + 1]: the stop strings that are there
        lengths = tf.reduce_sum(tf.cast(~free, tf.int32), -1)
        rank = lengths * (MAX_STOPS + 2) - tf.range(tf.shape(stops)[1])[None, :]  # the longest, then the first listed
        wanted = controls["logprobs"] >= 0

    def pick(i, logits, carry):
        """Chooses row b's character i (if it is still going); matches its stops; scores it."""
        done, length, stop_index, history, out, scored = carry
        temperature, top_k, top_p, seed = sampling
        alive = ~done & (i < num_chars)
        chosen = decoding.choose(
            logits, temperature, top_k, top_p, seed, rows["position"] + tf.cast(i, tf.int64), **extra
        )
        chosen = tf.where(alive, chosen, 0)
        length = tf.where(alive, i + 1, length)
        matched = tf.zeros_like(alive)
        if controls is not None:
            history = tf.concat([history[:, 1:], chosen[:, None]], 1)
            hit = tf.reduce_all((stops == history[:, None, :]) | free, -1) & real  # [B, S]
            matched = alive & tf.reduce_any(hit, -1) & (i + 1 >= controls["min_chars"])
            stop_index = tf.where(matched, tf.argmax(tf.where(hit, rank, -1), -1, output_type=tf.int32), stop_index)
            scored = _write_scores(scored, i, logits, chosen, alive & wanted, alternatives)
        out = out.write(i, chosen)
        return chosen, alive & ~matched, (done | matched, length, stop_index, history, out, scored)

    def body(i, prev, states, carry):
        going = ~carry[0] & (i < num_chars)  # rows still sampling: they feed what came before
        logits, new_states = step_one(prev, states)
        states = [tf.where(going[:, None], new, old) for new, old in zip(new_states, states)]
        chosen, _, carry = pick(i, logits, carry)
        return i + 1, chosen, states, carry

    def more(i, prev, states, carry):
        return (i < n) & tf.reduce_any(~carry[0] & (i < num_chars))

    empty_scores = (
        tf.TensorArray(tf.float32, size=MAX_CHARS_PER_CALL),
        tf.TensorArray(tf.int32, size=MAX_CHARS_PER_CALL),
        tf.TensorArray(tf.float32, size=MAX_CHARS_PER_CALL),
    )
    history = controls["history"] if controls is not None else tf.zeros([batch, 0], tf.int32)
    carry = (
        tf.zeros([batch], tf.bool),
        tf.zeros([batch], tf.int32),
        tf.fill([batch], -1),
        history,
        tf.TensorArray(tf.int32, size=MAX_CHARS_PER_CALL),  # a fixed size: XLA compiles once
        empty_scores if controls is not None else (),
    )
    _, _, states, carry = tf.while_loop(more, body, (tf.constant(0), last, states, carry))
    _, length, stop_index, _, out, scored = carry
    result = {"ids": tf.transpose(out.stack()), "states": states, "num_generated": length, "stop_index": stop_index}
    if controls is not None:
        wanted = controls["logprobs"] >= 0
        result["char_logprobs"] = tf.where(wanted[:, None], tf.transpose(scored[0].stack()), 0.0)
        result["top_ids"] = tf.transpose(scored[1].stack(), [1, 0, 2])
        result["top_logprobs"] = tf.transpose(scored[2].stack(), [1, 0, 2])
    return result


def _write_scores(scored, i, logits, chosen, wanted, alternatives: int):
    """Writes character i's log-probability and its best alternatives (zeros when no row asks)."""
    batch = tf.shape(logits)[0]

    def compute():
        logp = tf.nn.log_softmax(logits, axis=-1)  # the model's distribution: temperature 1, before any filter
        own = tf.gather(logp, chosen, batch_dims=1)
        top_values, top_ids = tf.math.top_k(logp[:, 1:], k=alternatives)  # id 0 (unknown) is never an alternative
        return own, top_ids + 1, top_values

    def nothing():
        return tf.zeros([batch]), tf.zeros([batch, alternatives], tf.int32), tf.zeros([batch, alternatives])

    own, top_ids, top_values = tf.cond(tf.reduce_any(wanted), compute, nothing)
    # Zeros for a row that does not ask: its outputs must not depend on whether a neighbour in its batch asks.
    own = tf.where(wanted, own, 0.0)
    top_ids = tf.where(wanted[:, None], top_ids, 0)
    top_values = tf.where(wanted[:, None], top_values, 0.0)
    return (scored[0].write(i, own), scored[1].write(i, top_ids), scored[2].write(i, top_values))


def controls_of(
    rows: Mapping[str, tf.Tensor], encode: Callable, vocab_size: int
) -> tuple[list, dict[str, tf.Tensor] | None]:
    """The loop's ``controls`` from a controlled signature's inputs (None for 0.2's), and their checks."""
    if "stop" not in rows:
        return [], None
    checks, stops, history = stop_ids(rows["stop"], rows["stop_tail"], encode, vocab_size)
    return checks, {
        "min_p": rows["min_p"],
        "bias": rows["logit_bias"],
        "stops": stops,
        "history": history,
        "min_chars": rows["min_chars"],
        "logprobs": tf.maximum(rows["logprobs"], LOGPROBS_OFF),
    }
