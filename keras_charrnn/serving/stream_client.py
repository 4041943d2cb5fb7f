"""The client's side of ``GenerationStream``: a generate call's segments as they arrive, TensorFlow-free.

``stream_predict`` sends the PredictRequest a unary call would send to
``/keras_charrnn.serving.GenerationStream/StreamPredict`` and yields each
segment's outputs. Sessions use it through their runner (``Session.stream``)
when the server advertises ``max_concurrent_streams`` in its metadata (a stock
``tensorflow_model_server`` advertises nothing, and sessions chain Predict calls).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np

from keras_charrnn.serving import wire
from keras_charrnn.serving.client_errors import ServerError
from keras_charrnn.xla import is_xla_unavailable, xla_twin

PATH = "/keras_charrnn.serving.GenerationStream/StreamPredict"  # streaming.PATH, without importing the server
SEGMENT_HEADER = "charrnn-segment-chars"


def stream_predict(
    client, model: str, signature: str, inputs: dict[str, np.ndarray], version: int | None, size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Streams a generate call: each segment's outputs, and the version that answered.

    The signature's XLA twin is asked first where the model has one and the server has XLA (as
    ``SamplingClient.predict_preferring_xla`` does); a server without it answers before the first
    segment, and the plain signature is streamed instead.

    Args:
        client: the ``SamplingClient`` (its channels, replica choice and timeout).
        model: the model's name.
        signature: a generate signature, e.g. ``"generate_text_v2"``.
        inputs: its inputs (one unary call's).
        version: the version (None: the newest).
        size: characters per segment (1..the server's ``segment_chars``).

    Yields:
        ``(outputs, version)`` per segment: the signature's outputs for the segment's rows, with
        ``row_index`` and ``position``.

    Raises:
        ServerError: the stream's error status (before or after some segments).
    """
    names = client._signature_names.get(model, ())
    use_twin = xla_twin(signature) in names and model not in client._without_xla
    try:
        yield from _stream(client, model, xla_twin(signature) if use_twin else signature, inputs, version, size)
    except _XlaUnavailable:
        client._without_xla.add(model)
        yield from _stream(client, model, signature, inputs, version, size)


class _XlaUnavailable(Exception):
    """The server answered the twin's stream "XLA compilation disabled" before any segment."""


def _stream(client, model, signature, inputs, version, size) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    request = wire.predict_request(model, signature, inputs, version)
    index = client._pick(set(), None if version is None else (model, version))
    stub = client._channels[index].unary_stream(
        PATH,
        request_serializer=wire.PredictRequest.SerializeToString,
        response_deserializer=wire.PredictResponse.FromString,
    )
    received = False
    try:
        for response in stub(request, timeout=client.timeout, metadata=((SEGMENT_HEADER, str(size)),)):
            received = True
            yield {k: wire.from_tensor_proto(v) for k, v in response.outputs.items()}, response.model_spec.version.value
    except grpc.RpcError as exc:
        client._mark(index, exc.code())
        if not received and is_xla_unavailable(exc.details() or ""):
            raise _XlaUnavailable() from None
        raise ServerError(exc.code(), exc.details() or "", client.targets[index]) from None
    client._mark(index, None)
