"""The gRPC services: TF Serving's PredictionService and ModelService over the manager's loaded versions.

``PredictionServicer`` answers Predict and GetModelMetadata (Classify, Regress and
MultiInference answer UNIMPLEMENTED); ``ModelStatusServicer`` answers GetModelStatus
and HandleReloadConfigRequest. Each gRPC method has a transport-neutral twin
(``predict``, ``metadata``, ``status``, ``reload_config``) that the REST API calls too;
``predict_arrays`` is Predict on NumPy arrays, through the same checks.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from collections.abc import Callable, Iterator, Set as AbstractSet

import grpc
import numpy as np
from google.protobuf import struct_pb2
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from keras_charrnn.errors import ServingError
from keras_charrnn.serving import limits as request_limits
from keras_charrnn.serving import monitoring, wire
from keras_charrnn.serving.limits import ServingLimits
from keras_charrnn.serving.manager import ModelManager
from keras_charrnn.serving.options import MAX_MESSAGE_BYTES
from keras_charrnn.serving.request_batcher import Batcher
from keras_charrnn.serving.segments import SEGMENT_CHARS, Segment, join, own_outputs, pad_stops, segments
from keras_charrnn.serving.signature_runner import SignatureCall

__all__ = ["SEGMENT_CHARS", "ModelStatusServicer", "PredictionServicer", "SettingNamer", "error_text"]

log = logging.getLogger("charrnn.serve")

SettingNamer = Callable[[str], str]  # a server setting's name -> how whoever runs the server sets it


def error_text(error: ServingError, name_setting: SettingNamer | None = None) -> str:
    """What the caller reads of an error: its message, and how to change the setting that refused the call.

    Args:
        error: the error.
        name_setting: how the server's operator sets a setting (``charrnn serve`` gives its flag);
            None: the message alone, which names the setting.

    Returns:
        The text.

    Example:

    >>> error_text(ServingError("INVALID_ARGUMENT", "over max_rows_per_call=64", "max_rows_per_call"),
    ...            lambda name: f"--{name}")
    'over max_rows_per_call=64 (set by --max_rows_per_call)'
    """
    if error.setting and name_setting is not None:
        return f"{error.message} (set by {name_setting(error.setting)})"
    return error.message


def _guarded(method):
    """Turns ServingError into its gRPC status and anything unexpected into INTERNAL, without a traceback."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as exc:
            context.abort(grpc.StatusCode[exc.code], error_text(exc, self.name_setting))
        except Exception as exc:  # never crash, never leak a traceback
            if isinstance(exc, grpc.RpcError) or context.code() is not None:
                raise
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    wrapper.__name__ = method.__name__
    return wrapper


def _grpc_method(answer):
    """The gRPC method that answers with ``answer(self, request)``, its transport-neutral twin (see ``_guarded``)."""

    @_guarded
    def method(self, request, context):
        return answer(self, request)

    method.__name__ = answer.__name__
    return method


def _version_of(spec) -> int | None:
    return spec.version.value if spec.HasField("version") else None


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over the manager's versions.

    Args:
        manager: the loaded model versions.
        batcher: merges concurrent calls (None: every call runs alone).
        limits: the request budget.
        max_concurrent_requests: Predict calls in flight at once (0: no cap); beyond it RESOURCE_EXHAUSTED.
        max_message_bytes: the largest response gRPC sends; a call whose answer would be larger is refused.
        name_setting: how the server's operator sets a setting, added to the errors a setting causes
            (None: the errors name the setting alone).
    """

    def __init__(
        self,
        manager: ModelManager,
        batcher: Batcher | None,
        limits: ServingLimits | None = None,
        max_concurrent_requests: int = 0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        name_setting: SettingNamer | None = None,
    ):
        self.manager = manager
        self.batcher = batcher
        self.limits = limits or ServingLimits()
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_requests = max_concurrent_requests
        self.name_setting = name_setting
        self._slots = threading.BoundedSemaphore(max_concurrent_requests) if max_concurrent_requests else None
        self.max_concurrent_streams = 0  # set by the streaming service when the server offers it (advertised)
        self.ran_at = 0.0  # time.monotonic() when a model call last started or ended (see ModelServer._trim_when_idle)

    def signature_call(self, spec, signature: str | None = None) -> SignatureCall:
        """The version a ``ModelSpec`` names, and its signature, looked up once for the call.

        Args:
            spec: the request's ``model_spec`` (name, and a version or a version label).
            signature: the signature's name (None: the spec's ``signature_name``); empty: ``serving_default``.

        Returns:
            The signature call.

        Raises:
            ServingError: NOT_FOUND for a model or version not served, INVALID_ARGUMENT for an unknown label,
                FAILED_PRECONDITION for a signature the version lacks.
        """
        loaded = self.manager.resolve(spec.name, _version_of(spec), spec.version_label or None)
        name = spec.signature_name if signature is None else signature
        return SignatureCall.of(loaded, name or "serving_default")

    @_guarded
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        if self._slots is not None and not self._slots.acquire(blocking=False):
            raise ServingError(
                "RESOURCE_EXHAUSTED",
                f"this server is answering {self.max_concurrent_requests} "
                f"Predict calls already (limit max_concurrent_requests); "
                f"retry later",
                setting="max_concurrent_requests",
            )
        try:
            remaining = context.time_remaining()  # huge when the client set no deadline
            with monitoring.track_request(request.model_spec.name, "Predict", "GRPC"):
                return self.predict(
                    request, None if remaining is None or remaining > 86400 else remaining, alive=context.is_active
                )
        finally:
            if self._slots is not None:
                self._slots.release()

    def predict(
        self, request: predict_pb2.PredictRequest, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> predict_pb2.PredictResponse:
        """Predict, transport aside: a PredictRequest answered with a PredictResponse.

        Args:
            request: the PredictRequest.
            timeout: the most seconds the call may take (None: no limit).
            alive: tells whether the caller still waits (e.g. ``grpc.ServicerContext.is_active``).

        Returns:
            The PredictResponse.

        Raises:
            ServingError: the request cannot be served (its code is the gRPC status).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        call = self.signature_call(request.model_spec)
        inputs = call.check_tensors(request.inputs, self.limits)
        outputs = self._serve(call, inputs, set(request.output_filter), deadline, alive)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = call.loaded.name
        response.model_spec.version.value = call.loaded.version
        response.model_spec.signature_name = call.name
        response_outputs = response.outputs
        for key, value in outputs.items():
            wire.to_tensor_proto(value, response_outputs[key])
        return response

    def predict_arrays(
        self,
        call: SignatureCall,
        inputs: dict[str, np.ndarray],
        output_filter=(),
        timeout: float | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """Predict on NumPy arrays (the REST API's): the same checks, batching and segments as ``predict``.

        Args:
            call: the version and signature (``signature_call``).
            inputs: the inputs by name.
            output_filter: only these outputs (empty: all).
            timeout: the most seconds the call may take (None: no limit).
            alive: tells whether the caller still waits.

        Returns:
            The outputs by name.

        Raises:
            ServingError: the request cannot be served (its code is the gRPC status).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._serve(call, call.check_arrays(inputs, self.limits), set(output_filter), deadline, alive)

    def _serve(
        self, call: SignatureCall, inputs: dict[str, np.ndarray], output_filter: set[str], deadline: float | None, alive
    ) -> dict[str, np.ndarray]:
        """Runs inputs checked against the signature (``admit``); long ``generate`` calls run in segments of
        ``SEGMENT_CHARS`` characters; the work stops between segments once the caller has gone."""
        self.admit(call, inputs, output_filter)
        if "num_chars" in inputs and int(inputs["num_chars"].max()) > SEGMENT_CHARS and call.state_names:
            outputs = join(inputs, self.generate_segments(call, inputs, deadline, alive))
        else:
            outputs = self._run(call, inputs, deadline, alive)
        return {k: v for k, v in outputs.items() if not output_filter or k in output_filter}

    def admit(
        self,
        call: SignatureCall,
        inputs: dict[str, np.ndarray],
        output_filter: AbstractSet[str] = frozenset(),
        chars_per_answer: int | None = None,
    ) -> None:
        """The checks a call passes before it runs or joins a batch: the model graph's own (in NumPy), each call
        on its own, its output filter, and the size of its answer.

        Args:
            call: the version and signature.
            inputs: the inputs, already checked against the signature's dtypes and shapes.
            output_filter: the outputs asked for (empty: all).
            chars_per_answer: the most characters of a row one message answers (a stream's segment);
                None: the whole call in one answer.

        Raises:
            ServingError: INVALID_ARGUMENT naming the input and the rule or limit; RESOURCE_EXHAUSTED for an
                answer over ``max_message_bytes``.
        """
        request_limits.check_call(inputs, call.vocab_size, self.limits, call.vocabulary)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Predict: model %s version %d signature %s", call.loaded.name, call.loaded.version, call.name)
        unknown = output_filter - call.output_names
        if unknown:
            raise ServingError("INVALID_ARGUMENT", f"output_filter names unknown output(s) {sorted(unknown)}")
        if chars_per_answer is not None and "num_chars" in inputs:
            inputs = {**inputs, "num_chars": np.minimum(inputs["num_chars"], chars_per_answer)}
        size = call.response_bytes(inputs, output_filter)
        if size > self.max_message_bytes:
            raise ServingError(
                "RESOURCE_EXHAUSTED",
                f"the response would take about {size} bytes, over this "
                f"server's limit max_message_bytes={self.max_message_bytes}; "
                f"ask for fewer rows, ids or characters per call",
                setting="max_message_bytes",
            )

    def _run(
        self, call: SignatureCall, inputs: dict[str, np.ndarray], deadline: float | None, alive
    ) -> dict[str, np.ndarray]:
        """Runs one checked call, alone or in a batch; its outputs cut to the widths it gets alone."""

        def caller_waits() -> bool:
            return (alive is None or alive()) and (deadline is None or time.monotonic() < deadline)

        self.ran_at = time.monotonic()
        try:
            if self.batcher is not None and inputs:
                future = self.batcher.submit(call.loaded, call, pad_stops(inputs), alive=caller_waits)
                try:
                    outputs = future.result(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
                except futures.TimeoutError:
                    future.cancel()
                    raise ServingError(
                        "DEADLINE_EXCEEDED", "deadline exceeded while waiting in the batching queue"
                    ) from None
                except futures.CancelledError:
                    log.debug("stopped a call before its batch ran: its caller went away")
                    raise ServingError("CANCELLED", "the call was cancelled before its batch ran") from None
            else:
                outputs = call.run(pad_stops(inputs))
        finally:
            self.ran_at = time.monotonic()
        return own_outputs(inputs, outputs)  # a batch pads to its longest row and its most alternatives

    def generate_segments(
        self,
        call: SignatureCall,
        inputs: dict[str, np.ndarray],
        deadline: float | None = None,
        alive=None,
        size: int = SEGMENT_CHARS,
        grow: bool = False,
    ) -> Iterator[Segment]:
        """A long generate call as segments of at most ``SEGMENT_CHARS`` characters per row (``segments.segments``).

        Each segment continues the last by the session's rule; rows that end by a stop drop
        out. Between segments the caller is checked: gone, or past its deadline, the work stops.

        Args:
            call: the version and signature.
            inputs: the call's checked inputs.
            deadline: ``time.monotonic()`` by which the call must end (None: none).
            alive: tells whether the caller still waits.
            size: the most characters of a row per segment (the first one's, with ``grow``).
            grow: double the size after each segment, up to ``SEGMENT_CHARS`` (see ``segments.segments``).

        Yields:
            Each segment's rows and outputs.

        Raises:
            ServingError: CANCELLED or DEADLINE_EXCEEDED between segments; the model's errors.
        """

        def between() -> None:
            if alive is not None and not alive():
                log.debug("stopped a generate call between segments: its caller went away")
                raise ServingError("CANCELLED", "the caller went away")
            if deadline is not None and time.monotonic() >= deadline:
                raise ServingError("DEADLINE_EXCEEDED", "deadline exceeded between segments of a long call")

        assert call.state_names is not None  # only a keras-charrnn model's calls run in segments
        yield from segments(
            lambda segment: self._run(call, segment, deadline, alive),
            inputs,
            call.state_names,
            call.vocabulary,
            between,
            size,
            grow,
        )

    def metadata(self, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """GetModelMetadata, transport aside (gRPC and REST).

        Args:
            request: a ``GetModelMetadataRequest`` asking for ``signature_def``.

        Returns:
            The SignatureDefs of the version, and this server's limits (``metadata["limits"]``).

        Raises:
            ServingError: NOT_FOUND for a model or version not served; INVALID_ARGUMENT for other fields.
        """
        spec = request.model_spec
        loaded = self.manager.resolve(spec.name, _version_of(spec), spec.version_label or None)
        fields = list(request.metadata_field)
        if fields != ["signature_def"]:
            raise ServingError("INVALID_ARGUMENT", f"metadata_field must be ['signature_def'], got {fields}")
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for name, sig_def in loaded.signature_defs.items():
            sig_map.signature_def[name].CopyFrom(sig_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = loaded.name
        response.model_spec.version.value = loaded.version
        response.metadata["signature_def"].Pack(sig_map)
        response.metadata["limits"].Pack(self.advertised_limits())
        return response

    def advertised_limits(self) -> struct_pb2.Struct:
        """This server's request limits, as GetModelMetadata advertises them (``metadata["limits"]``).

        Returns:
            A ``google.protobuf.Struct`` of numbers: the ``ServingLimits`` fields, ``max_message_bytes``,
            ``max_concurrent_requests`` (0: no cap), ``max_concurrent_streams`` and ``segment_chars``.
        """
        limits = struct_pb2.Struct()
        limits.update(
            {
                **self.limits.advertised(),
                "max_message_bytes": self.max_message_bytes,
                "max_concurrent_requests": self.max_concurrent_requests,
                "max_concurrent_streams": self.max_concurrent_streams,
                "segment_chars": SEGMENT_CHARS,
            }
        )
        return limits

    GetModelMetadata = _grpc_method(metadata)

    def _unimplemented(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "only Predict and GetModelMetadata are served for these models")

    Classify = Regress = MultiInference = _unimplemented


class ModelStatusServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest over the manager.

    Args:
        manager: the model versions and the live config.
        name_setting: how the server's operator sets a setting (see ``PredictionServicer``).
    """

    def __init__(self, manager: ModelManager, name_setting: SettingNamer | None = None):
        self.manager = manager
        self.name_setting = name_setting

    def status(self, request) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatus, transport aside (gRPC and REST).

        Args:
            request: a ``GetModelStatusRequest`` (a model, and a version or label, or neither: all versions).

        Returns:
            The versions' states, newest first, with the error of a failed load.

        Raises:
            ServingError: NOT_FOUND for an unknown model or version; INVALID_ARGUMENT for an unknown label.
        """
        spec = request.model_spec
        version = _version_of(spec)
        if version is None and spec.version_label:
            version = self.manager.resolve(spec.name, None, spec.version_label).version
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, status in self.manager.statuses(spec.name, version):
            entry = response.model_version_status.add(version=v, state=status.state)
            if status.error:
                entry.status.error_code = error_codes_pb2.Code.Value(status.error_code)
                entry.status.error_message = status.error
        return response

    def reload_config(self, request) -> model_management_pb2.ReloadConfigResponse:
        """HandleReloadConfigRequest, transport aside: applies ``request.config`` (see ``ModelManager.reload_config``).

        Args:
            request: a ``ReloadConfigRequest``.

        Returns:
            A ``ReloadConfigResponse`` with an OK status (metric increases are not reported).

        Raises:
            ServingError: INVALID_ARGUMENT or FAILED_PRECONDITION; the config in force stays.
        """
        try:
            self.manager.reload_config(request.config)
        except ServingError as exc:
            log.error("ReloadConfig failed: %s", exc.message)
            raise
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = error_codes_pb2.OK
        return response

    GetModelStatus = _grpc_method(status)
    HandleReloadConfigRequest = _grpc_method(reload_config)
