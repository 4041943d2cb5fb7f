"""A generate call on the server: its stops padded to one width, a batch's outputs cut back, long calls in segments.

Calls of a generate signature share batches when their inputs share every dimension
but the batch one: ``pad_stops`` gives every call's ``stop`` the models' width (empty
strings never match), so calls with any number of stop strings share batches and the
XLA twin compiles one shape. A batch answers with its widest rows; ``own_outputs``
cuts a call's rows back to the widths it would get alone (its largest ``num_chars``,
its largest ``logprobs``), so a row's outputs do not depend on its neighbours.

A call over ``SEGMENT_CHARS`` characters runs in segments (``segments``): each
segment continues the last by ``generation.continue_rows`` (the rule a session
follows between its calls), so the text is the one a single call would give; rows
that end by a stop drop out. ``segments`` yields each segment's outputs (a stream can
send each as it comes); ``join`` makes them one answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from keras_charrnn.generation import MAX_STOPS, continue_rows, next_segment_size

__all__ = ["SEGMENT_CHARS", "Segment", "join", "own_outputs", "pad_stops", "segments"]

SEGMENT_CHARS = 256  # a long generate call runs in segments of this many characters, its caller checked between
_PER_CHAR = ("ids", "char_logprobs", "top_ids", "top_logprobs")  # outputs with one entry per generated character
_ALTERNATIVES = ("top_ids", "top_logprobs")  # ... and one per alternative (axis 2)


def pad_stops(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``inputs`` with ``stop`` [B, S] widened to the models' ``MAX_STOPS`` columns by empty strings (no match).

    Args:
        inputs: a checked call's inputs (S at most ``MAX_STOPS``).

    Returns:
        The inputs (the same dict when there is nothing to pad).
    """
    stop = inputs.get("stop")
    if stop is None or stop.ndim != 2 or stop.shape[1] >= MAX_STOPS:
        return inputs
    padded = np.full([stop.shape[0], MAX_STOPS], b"", dtype=object)
    padded[:, : stop.shape[1]] = stop
    return {**inputs, "stop": padded}


def _alternatives(inputs: Mapping[str, np.ndarray], width: int) -> int:
    """The alternatives per character a call gets alone: its largest ``logprobs`` (at least 0, at most ``width``)."""
    asked = inputs.get("logprobs")
    return 0 if asked is None or not asked.size else min(max(int(asked.max()), 0), width)


def own_outputs(inputs: Mapping[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A call's rows of a batch's outputs cut to the widths the call gets alone.

    Args:
        inputs: the call's inputs (``num_chars``, ``logprobs``).
        outputs: its rows of the batch's outputs.

    Returns:
        ``outputs``, with ``ids`` and the scores cut to the call's largest ``num_chars`` and
        ``top_ids``/``top_logprobs`` to its largest ``logprobs``.
    """
    if "num_chars" not in inputs:
        return outputs
    chars = int(inputs["num_chars"].max())
    for name in _PER_CHAR:
        value = outputs.get(name)
        if value is None or value.ndim < 2:
            continue
        value = value[:, :chars]
        if name in _ALTERNATIVES and value.ndim == 3:
            value = value[:, :, : _alternatives(inputs, value.shape[2])]
        outputs[name] = value
    return outputs


@dataclass
class Segment:
    """One segment of a long call: the call's rows it ran (``rows``) and its outputs for them, in that order;
    ``num_chars``: the characters each of those rows asked for in it (None: not known, e.g. a streamed message)."""

    rows: np.ndarray
    outputs: dict[str, np.ndarray]
    num_chars: np.ndarray | None = None

    def counts(self, call_num_chars: np.ndarray | None = None) -> np.ndarray:
        """Characters each row generated: ``num_generated``, or for 0.2's signatures all it asked for (in this
        segment; ``call_num_chars[rows]``, the whole call's, when the segment does not say)."""
        asked = self.num_chars if self.num_chars is not None else np.asarray(call_num_chars)[self.rows]
        return np.asarray(self.outputs.get("num_generated", asked)).reshape(-1).astype(np.int64)


def segments(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: dict[str, np.ndarray],
    state_names: Sequence[str],
    vocabulary: Sequence[str] | None = None,
    between: Callable[[], None] | None = None,
    size: int = SEGMENT_CHARS,
    grow: bool = False,
) -> Iterator[Segment]:
    """Runs a generate call as segments of at most ``size`` characters per row, continuing each from the last.

    Args:
        run: runs one checked call (alone or in a batch) and returns its outputs.
        inputs: the call's checked inputs.
        state_names: the model's state tensors (its exported config's).
        vocabulary: the model's characters in id order (a ``generate`` call's stops match across segments by it).
        between: called before every segment; raises to stop the work (the caller has gone, the deadline passed).
        size: the most characters of a row per segment (the first segment's, with ``grow``).
        grow: double the segment size after each segment, up to ``SEGMENT_CHARS`` (a stream: its first
            characters come soon, and a long call pays few model runs).

    Yields:
        One ``Segment`` per model call, its rows in increasing order.
    """
    remaining = inputs["num_chars"].astype(np.int64)
    rows = remaining.shape[0]
    current = {k: v.copy() for k, v in inputs.items()}
    while remaining.max() > 0:
        if between is not None:
            between()
        active = np.nonzero(remaining > 0)[0]
        segment = {k: v[active] for k, v in current.items()}
        segment["num_chars"] = np.minimum(remaining[active], size).astype(np.int32)
        if grow:
            size = next_segment_size(size, SEGMENT_CHARS)
        outputs = run(segment)
        done = Segment(active, outputs, segment["num_chars"])
        counts = done.counts()
        stopped = np.asarray(outputs.get("stop_index", np.full(len(active), -1))).reshape(-1) >= 0
        for key, value in continue_rows(segment, outputs, state_names, vocabulary).items():
            if key == "num_chars":
                continue
            if current[key].shape[1:] != value.shape[1:]:  # ``ids`` [B, T] -> the last id [B, 1]
                current[key] = np.zeros((rows, *value.shape[1:]), value.dtype)
            current[key][active] = value
        remaining[active] = np.where(stopped, 0, remaining[active] - counts)
        yield done


def join(inputs: Mapping[str, np.ndarray], pieces: Iterable[Segment]) -> dict[str, np.ndarray]:
    """The outputs of a call run in segments, as one call would give them.

    Args:
        inputs: the call's inputs.
        pieces: its segments (``segments``).

    Returns:
        Per row: ``text`` (or ``ids``) and the scores concatenated (padded to the call's largest
        ``num_chars`` and ``logprobs``), ``num_generated`` summed, ``finish_reason`` and
        ``stop_index`` and the states from the row's last segment.
    """
    rows = inputs["num_chars"].shape[0]
    width = int(inputs["num_chars"].max())
    last: dict[str, np.ndarray] = {}  # per output, each row's value in its last segment
    parts: dict[str, list[list[np.ndarray]]] = {}  # per character (and text): each row's pieces, in order
    generated = np.zeros(rows, np.int64)
    alternatives = None  # the call's width of top_ids (the first segment holds every row)
    for piece in pieces:
        outputs = piece.outputs
        counts = piece.counts(inputs["num_chars"])
        if alternatives is None and "top_ids" in outputs:
            alternatives = outputs["top_ids"].shape[2]
        generated[piece.rows] += counts
        for name, value in outputs.items():
            if name == "text" or name in _PER_CHAR:
                row_parts = parts.setdefault(name, [[] for _ in range(rows)])
                for j, row in enumerate(piece.rows):
                    row_parts[row].append(value[j] if name == "text" else value[j, : counts[j]])
            else:
                if name not in last:
                    last[name] = np.zeros((rows, *value.shape[1:]), value.dtype)
                last[name][piece.rows] = value
    result = dict(last)
    if "num_generated" in result:
        result["num_generated"] = generated.astype(result["num_generated"].dtype)
    for name, row_parts in parts.items():
        if name == "text":
            result[name] = np.array([b"".join(bytes(t) for t in p) for p in row_parts], dtype=object)
            continue
        first = row_parts[0][0]
        joined = np.zeros((rows, width, *((alternatives or 0,) if name in _ALTERNATIVES else ())), first.dtype)
        for row, pieces_of_row in enumerate(row_parts):
            at = 0
            for part in pieces_of_row:
                if part.ndim == 2:  # alternatives: a later segment's rows may ask for fewer
                    joined[row, at : at + len(part), : part.shape[1]] = part
                else:
                    joined[row, at : at + len(part)] = part
                at += len(part)
        result[name] = joined
    return result
