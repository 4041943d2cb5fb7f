"""Streaming generation: a generate call answered segment by segment, over gRPC (``GenerationStream``) and SSE.

``stream.proto`` (shipped beside this module) describes the service: its
``StreamPredict`` takes TF Serving's ``PredictRequest`` for any generate
signature and answers with one ``PredictResponse`` per segment. Each segment is
one model run (batched with unary calls) through ``PredictionServicer``'s own
checks and segments, so a stream and a unary call give the same text, scores,
finish reasons and states. Every response carries, for the rows of its segment,
the states and position after it: a session that keeps the last one of each row
continues exactly where the stream stopped, on any replica, should it break.

Flow control: a segment is produced only after the previous one was handed to
gRPC's transport, which accepts no more than HTTP/2's flow-control window for a
reader that stops reading; the generation then waits (holding one thread) until
the reader reads, cancels, or the call's deadline passes. A caller that cancels
or disconnects stops the work before the next segment. At most
``max_concurrent_streams`` streams run at once (advertised in the metadata);
beyond it a stream is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from importlib import resources

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool
from tensorflow_serving.apis import predict_pb2

from keras_charrnn.errors import ServingError
from keras_charrnn.serving import monitoring, wire
from keras_charrnn.serving.segments import SEGMENT_CHARS
from keras_charrnn.serving.servicers import PredictionServicer, SignatureCall, _guarded

log = logging.getLogger("charrnn.serve")

SERVICE = "keras_charrnn.serving.GenerationStream"
METHOD = "StreamPredict"
PATH = f"/{SERVICE}/{METHOD}"
PROTO_FILE = "keras_charrnn/serving/stream.proto"
SEGMENT_HEADER = "charrnn-segment-chars"  # request metadata: characters per segment (1..SEGMENT_CHARS)
DEFAULT_STREAM_SEGMENT = 32  # characters of a stream's first segment when the caller does not say (then 64, 128, 256)
DEFAULT_MAX_STREAMS = 16  # each open stream holds a gRPC thread


def proto_text() -> str:
    """The shipped ``stream.proto``."""
    return resources.files("keras_charrnn.serving").joinpath("stream.proto").read_text(encoding="utf-8")


def register_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> None:
    """Adds the service's file descriptor (``stream.proto``) to ``pool`` (protobuf's default one), for reflection.

    Args:
        pool: the pool; its ``tensorflow_serving/apis/predict.proto`` must be there (imported by
            ``tensorflow_serving.apis.predict_pb2`` in the default pool).
    """
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindFileByName(PROTO_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto(
        name=PROTO_FILE,
        package=SERVICE.rsplit(".", 1)[0],
        syntax="proto3",
        dependency=["tensorflow_serving/apis/predict.proto"],
    )
    service = proto.service.add(name=SERVICE.rsplit(".", 1)[1])
    service.method.add(
        name=METHOD,
        input_type=".tensorflow.serving.PredictRequest",
        output_type=".tensorflow.serving.PredictResponse",
        server_streaming=True,
    )
    pool.Add(proto)


def segment_size(metadata) -> int:
    """The segment size a caller asked for in its metadata (``charrnn-segment-chars``), or the default.

    Raises:
        ServingError: INVALID_ARGUMENT for a value that is not an integer in 1..``SEGMENT_CHARS``.
    """
    for key, value in metadata or ():
        if key == SEGMENT_HEADER:
            if not value.isdigit() or not 1 <= int(value) <= SEGMENT_CHARS:
                raise ServingError(
                    "INVALID_ARGUMENT", f"{SEGMENT_HEADER} must be an integer in 1..{SEGMENT_CHARS}, got {value!r}"
                )
            return int(value)
    return DEFAULT_STREAM_SEGMENT


def stream_outputs(
    prediction: PredictionServicer,
    call: SignatureCall,
    inputs: dict[str, np.ndarray],
    output_filter: set[str],
    deadline: float | None,
    alive: Callable[[], bool] | None,
    size: int = DEFAULT_STREAM_SEGMENT,
) -> Iterator[dict[str, np.ndarray]]:
    """A checked call's outputs, segment by segment (transport aside: gRPC and SSE).

    Args:
        prediction: the Predict service (its checks, batching and segments).
        call: the version and signature.
        inputs: the inputs, checked against the signature's dtypes and shapes.
        output_filter: the outputs asked for (empty: all); ``row_index`` and ``position`` always come.
        deadline: ``time.monotonic()`` by which the call must end (None: none).
        alive: tells whether the caller still waits.
        size: characters of the first segment; each next one is twice the last, up to ``SEGMENT_CHARS``
            (the first characters come within one small segment's time; a long call pays few model runs).

    Yields:
        Each segment's outputs for its rows, with ``row_index`` (int32) and ``position`` (int64, the
        rows' next position). A signature that does not generate answers once.

    Raises:
        ServingError: as Predict (before the first segment, or between segments).
    """
    prediction.admit(call, inputs, output_filter, chars_per_answer=SEGMENT_CHARS)  # each message is one segment
    if "num_chars" not in inputs or not call.state_names:
        outputs = prediction._run(call, inputs, deadline, alive)
        yield {k: v for k, v in outputs.items() if not output_filter or k in output_filter}
        return
    position = inputs["position"].astype(np.int64).copy()
    for segment in prediction.generate_segments(call, inputs, deadline, alive, size, grow=True):
        outputs = segment.outputs
        position[segment.rows] += segment.counts()
        chosen = {k: v for k, v in outputs.items() if not output_filter or k in output_filter}
        chosen["row_index"] = segment.rows.astype(np.int32)
        chosen["position"] = position[segment.rows]
        yield chosen


class StreamServicer:
    """``GenerationStream.StreamPredict`` over a ``PredictionServicer``.

    Args:
        prediction: the Predict service whose checks, limits, batching and segments a stream uses.
        max_streams: streams open at once (0: no cap); beyond it RESOURCE_EXHAUSTED.
    """

    def __init__(self, prediction: PredictionServicer, max_streams: int = DEFAULT_MAX_STREAMS):
        self.prediction = prediction
        self.name_setting = prediction.name_setting
        self.max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams) if max_streams else None
        prediction.max_concurrent_streams = max_streams

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC handler to add to a server (``server.add_generic_rpc_handlers``)."""
        method = grpc.unary_stream_rpc_method_handler(
            self.StreamPredict,
            request_deserializer=predict_pb2.PredictRequest.FromString,
            response_serializer=predict_pb2.PredictResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})

    def StreamPredict(self, request: predict_pb2.PredictRequest, context) -> Iterator[predict_pb2.PredictResponse]:
        """Answers a PredictRequest of a generate signature with one PredictResponse per segment."""
        responses = self._responses(request, context)
        finished = False
        try:
            while True:
                response = self._next(responses, context)
                if response is None:
                    finished = True
                    return
                yield response
        finally:
            if not finished and not context.is_active():
                log.debug("stream of model %s: stopped, its caller went away", request.model_spec.name)
            responses.close()  # a cancelled stream frees its slot now, not when collected

    @_guarded
    def _next(self, responses, context):
        """The next response, errors turned into the stream's status (see ``servicers._guarded``)."""
        return next(responses, None)

    def _responses(self, request, context) -> Generator[predict_pb2.PredictResponse, None, None]:
        if self._slots is not None and not self._slots.acquire(blocking=False):
            raise ServingError(
                "RESOURCE_EXHAUSTED",
                f"this server has {self.max_streams} streams open already (limit max_concurrent_streams); retry later",
                setting="max_concurrent_streams",
            )
        try:
            remaining = context.time_remaining()
            deadline = None if remaining is None or remaining > 86400 else time.monotonic() + remaining
            size = segment_size(context.invocation_metadata())
            call = self.prediction.signature_call(request.model_spec)
            inputs = call.check_tensors(request.inputs, self.prediction.limits)
            with monitoring.track_request(request.model_spec.name, "StreamPredict", "GRPC"):
                for outputs in stream_outputs(
                    self.prediction, call, inputs, set(request.output_filter), deadline, context.is_active, size
                ):
                    response = predict_pb2.PredictResponse()
                    response.model_spec.name = call.loaded.name
                    response.model_spec.version.value = call.loaded.version
                    response.model_spec.signature_name = call.name
                    for key, value in outputs.items():
                        wire.to_tensor_proto(value, response.outputs[key])
                    log.debug("stream of model %s: segment of rows %s ready", call.loaded.name, outputs["row_index"])
                    yield response
        finally:
            if self._slots is not None:
                self._slots.release()
