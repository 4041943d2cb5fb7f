"""Server-Sent Events on the REST port: a streamed generate call as ``text/event-stream`` events.

``POST /v1/models/NAME[/versions/N | /labels/L]:stream`` takes the body a
``:predict`` takes (row or columnar format, any generate signature) and answers
with one ``segment`` event per segment (its outputs in the request's JSON
format, as ``:predict`` gives them, plus ``row_index`` and ``position``), then a
``done`` event with each row's final states, position, ``num_generated``,
``finish_reason`` and ``stop_index``. An error before the first event is an
ordinary JSON error reply with its HTTP status; after it (the status line is
sent), an ``error`` event ``{"error": message, "code": status}`` ends the stream.
The connection closes after the last event; a client that disconnects stops the
generation before its next segment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np

from keras_charrnn.errors import ServingError
from keras_charrnn.serving.json_codec import response_json
from keras_charrnn.serving.segments import Segment, join

CONTENT_TYPE = "text/event-stream"
_PER_CHAR = ("text", "ids", "char_logprobs", "top_ids", "top_logprobs")  # left out of ``done``: the segments had them


def event(name: str, data) -> bytes:
    """One SSE event: ``event: NAME`` and its JSON ``data`` (one line), then the blank line that ends it."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def segment_events(
    inputs: dict[str, np.ndarray],
    outputs: Iterator[dict[str, np.ndarray]],
    form: str,
    error_text: Callable[[ServingError], str],
) -> Iterator[bytes]:
    """The events of a streamed call: each segment's, then ``done`` (or ``error`` if the work fails mid-way).

    Args:
        inputs: the call's inputs (for the final summary).
        outputs: ``streaming.stream_outputs``' segments; its first one already produced (so errors before
            it were answered as plain errors).
        form: ``"row"`` or ``"columnar"``, the request's JSON format.
        error_text: the caller-facing message of an error.

    Yields:
        The events' bytes.
    """
    pieces = []
    try:
        for segment in outputs:
            pieces.append(Segment(segment["row_index"], {k: v for k, v in segment.items() if k != "row_index"}))
            yield event("segment", response_json(segment, form))
    except ServingError as exc:
        yield event("error", {"error": error_text(exc), "code": exc.code})
        return
    if "num_chars" not in inputs:
        yield event("done", {})
        return
    final = {k: v for k, v in join(inputs, pieces).items() if k not in _PER_CHAR}
    yield event("done", response_json(final, form))
