"""The embedded model server: TensorFlow Serving's gRPC API over the same model folders.

Services: ``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata;
Classify, Regress and MultiInference answer UNIMPLEMENTED),
``tensorflow.serving.ModelService`` (GetModelStatus, HandleReloadConfigRequest), the standard gRPC health
service and server reflection. Messages and stubs are the tensorflow-serving-api
package's own. Start it with ``charrnn serve`` (the flags of
``tensorflow_model_server``) or ``ModelServer(...).start()``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
import weakref
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow.python.eager import context as tf_context
from tensorflow.python.framework import ops as tf_ops
from tensorflow_serving.apis import model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

from keras_charrnn import warmup
from keras_charrnn.errors import ConfigError, ServingError, graph_error_message
from keras_charrnn.serving import limits as request_limits
from keras_charrnn.serving import monitoring, wire
from keras_charrnn.serving.limits import ServingLimits
from keras_charrnn.serving.manager import LoadedVersion, ModelManager, single_model_config
from keras_charrnn.serving.options import MAX_MESSAGE_BYTES, ServerOptions  # re-exported: the server's settings
from keras_charrnn.serving.protos import BatchingParameters, SSLConfig, read_text_proto
from keras_charrnn.serving.request_batcher import Batcher, BatchingOptions, release_freed_memory
from keras_charrnn.serving.rest import RestApi, RestServer

log = logging.getLogger("charrnn.serve")

SEGMENT_CHARS = 256  # a long generate call runs in segments of this many characters, its caller checked between
HEALTH_SERVICES = (prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
                   model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name)


def serving_limits(options: ServerOptions) -> ServingLimits:
    """The request budget the options set (see ``keras_charrnn.serving.limits``).

    Raises:
        ConfigError: a limit is not a positive integer.
    """
    return ServingLimits(max_prime_chars=options.max_prime_chars, max_ids_length=options.max_ids_length,
                         max_rows_per_call=options.max_rows_per_call, max_chars_per_call=options.max_chars_per_call,
                         max_request_elements=options.max_request_elements)


HEALTH_THREADS = 8  # gRPC threads that Predict calls never take: health, status and metadata always find one
IDLE_TRIM_SECONDS = 1.0  # after this long with no model call, the heap the calls freed goes back to the system


def concurrency_cap(options: ServerOptions, batching: BatchingOptions | None = None) -> int:
    """How many Predict calls may be in flight at once (beyond it: RESOURCE_EXHAUSTED at once).

    Automatic (``max_concurrent_requests`` 0): ``grpc_max_threads - 8``, so that health,
    status and metadata calls always find a thread; with batching, at least enough calls
    to fill a batch on every batch thread and one more batch forming
    (``max_batch_size x (num_batch_threads + 1)``): a call waiting in the batching queue
    holds its gRPC thread, so a lower cap would keep every batch below ``max_batch_size``
    (``grpc_threads`` then adds the threads). A cap given is kept, and must stay below
    ``grpc_max_threads``.

    Args:
        options: the server's options.
        batching: the batching parameters when batching is on.

    Raises:
        ConfigError: ``max_concurrent_requests`` is negative or leaves no thread for them.
    """
    cap = options.max_concurrent_requests
    if cap < 0:
        raise ConfigError(f"max_concurrent_requests must be 0 (automatic) or positive, got {cap}")
    if cap == 0:
        fill = batching.max_batch_size * (batching.num_batch_threads + 1) if batching is not None else 0
        return max(1, options.grpc_max_threads - HEALTH_THREADS, fill)
    if cap >= options.grpc_max_threads:
        raise ConfigError(f"max_concurrent_requests ({cap}) must be less than grpc_max_threads "
                          f"({options.grpc_max_threads}), so health and status calls always find a thread")
    return cap


def grpc_threads(options: ServerOptions, cap: int) -> int:
    """The gRPC server's threads: ``grpc_max_threads``, or more where the Predict cap needs them (see ``concurrency_cap``)."""
    return max(options.grpc_max_threads, cap + HEALTH_THREADS)


def model_server_config(options: ServerOptions) -> model_server_config_pb2.ModelServerConfig:
    """The models to serve: ``options.model_config_file``, or ``model_name`` at ``model_base_path``.

    Args:
        options: the server's settings.

    Returns:
        TF Serving's ``ModelServerConfig``.

    Raises:
        ConfigError: neither or both ways are given, or the config file is invalid.
    """
    if options.model_config_file:
        if options.model_base_path:
            raise ConfigError("give model_config_file or model_base_path, not both")
        return read_text_proto(options.model_config_file, model_server_config_pb2.ModelServerConfig())
    if not options.model_base_path:
        raise ConfigError("give model_base_path (with model_name) or model_config_file")
    return single_model_config(options.model_name or "default", options.model_base_path)


def batching_options(path: str | Path | None) -> BatchingOptions:
    """The batching parameters of a ``BatchingParameters`` text file; the defaults for what it leaves out.

    Args:
        path: the file (TF Serving's ``--batching_parameters_file``), or None for the defaults.

    Returns:
        The options.

    Raises:
        ConfigError: the file is unreadable or invalid.
    """
    if not path:
        return BatchingOptions()
    parsed = read_text_proto(path, BatchingParameters())
    given = {f.name: getattr(parsed, f.name).value for f in dataclasses.fields(BatchingOptions)
             if f.name != "allowed_batch_sizes" and parsed.HasField(f.name)}
    return BatchingOptions(**given, allowed_batch_sizes=tuple(parsed.allowed_batch_sizes))


# ----- tensors <-> NumPy, checked against the signature ----------------------------------------

class _SignatureFacts:
    """What every Predict call reads from one signature of one loaded version, worked out once.

    Reading a SignatureDef (its input names, dtypes and dims, its outputs) and
    binding keyword arguments to the function's structured signature cost more,
    per call, than the checks themselves; these facts are kept per loaded
    function (weakly: an unloaded version's facts go with it).

    Args:
        loaded: the version.
        signature: the requested signature name.
        fn: the function that answers it (``loaded.signature(signature)``: the XLA twin when XLA is on).
    """

    __slots__ = ("inputs", "expected", "outputs", "output_names", "vocab_size", "flat_order")

    def __init__(self, loaded: LoadedVersion, signature: str, fn):
        sig_def = loaded.signature_defs[signature]
        self.inputs = tuple((key, sig_def.inputs[key].dtype, tuple(d.size for d in sig_def.inputs[key].tensor_shape.dim))
                            for key in sorted(sig_def.inputs))
        self.expected = frozenset(sig_def.inputs)
        self.outputs = tuple((name, tuple(d.size for d in info.tensor_shape.dim), info.dtype)
                             for name, info in sig_def.outputs.items())
        self.output_names = frozenset(sig_def.outputs)
        self.vocab_size = vocab_size(loaded)
        self.flat_order = _flat_order(fn, self.expected)


def _flat_order(fn, expected: frozenset) -> tuple[str, ...] | None:
    """The order in which ``fn`` takes its inputs as flat tensors, or None to call it by keywords.

    The flat call skips TensorFlow's per-call binding of keyword arguments to the
    structured signature (the inputs were already checked against the SignatureDef);
    any function whose parameters are not exactly the signature's inputs is called by keywords.
    """
    try:
        order = tuple(fn.function_type.parameters)
        callable(fn._call_flat) and fn.captured_inputs  # noqa: B018  (both exist on this TensorFlow)
    except Exception:  # another TensorFlow: the public structured call
        return None
    return order if set(order) == expected and len(order) == len(expected) else None


_FACTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # loaded function -> {signature: facts}
_FACTS_LOCK = threading.Lock()


def _signature_facts(loaded: LoadedVersion, signature: str, fn=None) -> _SignatureFacts:
    """The cached ``_SignatureFacts`` of ``signature`` (``fn``: ``loaded.signature(signature)``, if known)."""
    fn = loaded.signature(signature) if fn is None else fn
    per_fn = _FACTS.get(fn)
    facts = None if per_fn is None else per_fn.get(signature)
    if facts is None:
        facts = _SignatureFacts(loaded, signature, fn)
        with _FACTS_LOCK:
            _FACTS.setdefault(fn, {})[signature] = facts
    return facts


def _check_inputs(loaded: LoadedVersion, signature: str, request_inputs,
                  limits: ServingLimits | None = None, facts: _SignatureFacts | None = None) -> dict[str, np.ndarray]:
    """The request's tensors as arrays, checked against the limits (before expanding) and the signature."""
    limits = limits or ServingLimits()
    request_limits.check_request_tensors(request_inputs, limits)
    facts = facts or _signature_facts(loaded, signature)
    expected = facts.expected
    given = set(request_inputs)
    if given != expected:
        if given - expected:
            raise ServingError("INVALID_ARGUMENT", f"unexpected input(s) {sorted(given - expected)} for signature "
                                                   f"{signature!r}; it takes {sorted(expected)}")
        raise ServingError("INVALID_ARGUMENT", f"missing input(s) {sorted(expected - given)} for signature {signature!r}")
    protos = []
    for key, dtype, dims in facts.inputs:  # dtypes and claimed shapes first: nothing is expanded yet
        proto = request_inputs[key]
        if proto.dtype != dtype:
            raise ServingError("INVALID_ARGUMENT", f"input {key!r}: expects dtype "
                                                   f"{tf.dtypes.as_dtype(dtype).name}, got "
                                                   f"{_dtype_name(proto.dtype)}")
        shape = [d.size for d in proto.tensor_shape.dim]
        if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
            want = "[" + ", ".join("?" if d == -1 else str(d) for d in dims) + "]"
            raise ServingError("INVALID_ARGUMENT", f"input {key!r}: expects shape {want}, got {shape}")
        protos.append((key, proto))
    arrays = {}
    for key, proto in protos:
        try:
            arrays[key] = wire.from_tensor_proto(proto, max_elements=limits.max_request_elements)
        except (ValueError, TypeError) as exc:  # malformed tensor content (a bug elsewhere stays INTERNAL)
            raise ServingError("INVALID_ARGUMENT", f"input {key!r}: malformed tensor ({exc})") from None
    return arrays


def vocab_size(loaded: LoadedVersion) -> int | None:
    """The model's number of ids, from its SignatureDefs (None if they do not say)."""
    for signature, output, axis in (("step", "logits", 2), ("metadata", "vocabulary", 0)):
        sig_def = loaded.signature_defs.get(signature)
        if sig_def is not None and output in sig_def.outputs:
            dims = sig_def.outputs[output].tensor_shape.dim
            if len(dims) > axis and dims[axis].size > 0:
                return int(dims[axis].size)
    return None


def response_bytes(loaded: LoadedVersion, signature: str, inputs: dict[str, np.ndarray],
                   output_filter=()) -> int:
    """About how many bytes the call's response will take, from the signature's output shapes.

    An unknown first dimension is the call's rows; an unknown second one is its ids per row
    (``step``, ``inspect``) or its largest ``num_chars`` (``generate``); strings count 4 bytes
    a character. ``output_filter``: only these outputs (empty: all).
    """
    return _response_bytes(_signature_facts(loaded, signature), inputs, output_filter)


def _response_bytes(facts: _SignatureFacts, inputs: dict[str, np.ndarray], output_filter=()) -> int:
    """``response_bytes`` from a signature's cached facts."""
    if not inputs:
        return 0
    rows = next(iter(inputs.values())).shape[0]
    chars = int(inputs["num_chars"].max()) if "num_chars" in inputs and inputs["num_chars"].size else 1
    length = inputs["ids"].shape[1] if "ids" in inputs and inputs["ids"].ndim == 2 and "num_chars" not in inputs else chars
    total = 0
    for name, sizes, dtype in facts.outputs:
        if output_filter and name not in output_filter:
            continue
        count = 1
        for axis, size in enumerate(sizes):
            count *= size if size >= 0 else rows if axis == 0 else length if axis == 1 else 1
        total += count * (4 * chars if dtype == wire.DT_STRING else request_limits.ITEM_BYTES.get(dtype, 4))
    return total


def _dtype_name(enum_value: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum_value).name
    except TypeError:
        return f"invalid dtype {enum_value}"


def _eager(value: np.ndarray):
    """A NumPy array as an eager tensor on this thread's device (what ``tf.constant`` makes, without its checks)."""
    try:
        return tf_ops.EagerTensor(value, tf_context.context().device_name, None)
    except (TypeError, ValueError):
        return tf.constant(value)


def run_signature(loaded: LoadedVersion, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calls one signature on NumPy inputs; a model-side check failing becomes INVALID_ARGUMENT.

    Inputs that are exactly the signature's (the server's checked calls and batches) go to
    the function as flat tensors; anything else takes TensorFlow's structured call, which checks them.
    """
    fn = loaded.signature(signature)
    order = _signature_facts(loaded, signature, fn).flat_order
    try:
        if order is not None and len(inputs) == len(order):
            outputs = fn._call_flat([_eager(inputs[key]) for key in order], fn.captured_inputs)
        else:
            outputs = fn(**{k: tf.constant(v) for k, v in inputs.items()})
    except KeyError as exc:  # an input the signature takes is missing
        raise ServingError("INVALID_ARGUMENT", f"missing input {exc} for signature {signature!r}") from None
    except tf.errors.InvalidArgumentError as exc:
        raise ServingError("INVALID_ARGUMENT", graph_error_message(exc.message)) from None
    except (ValueError, TypeError) as exc:
        raise ServingError("INVALID_ARGUMENT", str(exc).strip().splitlines()[0]) from None
    return {k: v.numpy() for k, v in outputs.items()}


# ----- the services ---------------------------------------------------------------------------

def _abort(context: grpc.ServicerContext, error: ServingError):
    context.abort(grpc.StatusCode[error.code], error.message)


def _guarded(method):
    """Turns ServingError into its gRPC status and anything unexpected into INTERNAL, without a traceback."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ServingError as exc:
            _abort(context, exc)
        except Exception as exc:  # never crash, never leak a traceback
            if isinstance(exc, grpc.RpcError) or context.code() is not None:
                raise
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    wrapper.__name__ = method.__name__
    return wrapper


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over the manager's versions.

    Args:
        manager: the loaded model versions.
        batcher: merges concurrent calls (None: every call runs alone).
        limits: the request budget (an int is read as ``max_chars_per_call``, the older form).
        max_concurrent_requests: Predict calls in flight at once (0: no cap); beyond it RESOURCE_EXHAUSTED.
        max_message_bytes: the largest response gRPC sends; a call whose answer would be larger is refused.
    """

    def __init__(self, manager: ModelManager, batcher: Batcher | None, limits: ServingLimits | int | None = None,
                 max_concurrent_requests: int = 0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.manager = manager
        self.batcher = batcher
        if isinstance(limits, int):
            limits = ServingLimits(max_chars_per_call=limits)
        self.limits = limits or ServingLimits()
        self.max_chars_per_call = self.limits.max_chars_per_call
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_requests = max_concurrent_requests
        self._slots = threading.BoundedSemaphore(max_concurrent_requests) if max_concurrent_requests else None
        self.ran_at = 0.0  # time.monotonic() when a model call last started or ended (see ModelServer._trim_when_idle)

    def _resolve(self, spec) -> LoadedVersion:
        version = spec.version.value if spec.HasField("version") else None
        return self.manager.resolve(spec.name, version, spec.version_label or None)

    @_guarded
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        if self._slots is not None and not self._slots.acquire(blocking=False):
            raise ServingError("RESOURCE_EXHAUSTED", f"this server is answering {self.max_concurrent_requests} "
                                                     f"Predict calls already (limit max_concurrent_requests, "
                                                     f"charrnn serve --max_concurrent_requests); retry later")
        try:
            remaining = context.time_remaining()  # huge when the client set no deadline
            with monitoring.track_request(request.model_spec.name, "Predict", "GRPC"):
                return self.predict(request, None if remaining is None or remaining > 86400 else remaining,
                                    alive=context.is_active)
        finally:
            if self._slots is not None:
                self._slots.release()

    def predict(self, request: predict_pb2.PredictRequest, timeout: float | None = None,
                alive=None) -> predict_pb2.PredictResponse:
        """Predict, transport aside: the gRPC method and the REST API both call it.

        The request is checked against the limits and the signature, and each call
        is checked on its own (as the model's graph would) before it runs or joins
        a batch. Long ``generate`` calls run in segments of ``SEGMENT_CHARS``
        characters; the work stops between segments once the caller has gone.

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
        loaded = self._resolve(request.model_spec)
        signature = request.model_spec.signature_name or "serving_default"
        facts = _signature_facts(loaded, signature)  # raises FAILED_PRECONDITION for an unknown signature
        inputs = _check_inputs(loaded, signature, request.inputs, self.limits, facts)
        request_limits.check_call(inputs, facts.vocab_size, self.limits)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Predict: model %s version %d signature %s", loaded.name, loaded.version, signature)
        output_filter = set(request.output_filter)
        unknown = output_filter - facts.output_names
        if unknown:
            raise ServingError("INVALID_ARGUMENT", f"output_filter names unknown output(s) {sorted(unknown)}")
        size = _response_bytes(facts, inputs, output_filter)
        if size > self.max_message_bytes:
            raise ServingError("RESOURCE_EXHAUSTED", f"the response would take about {size} bytes, over this "
                                                     f"server's limit max_message_bytes={self.max_message_bytes} "
                                                     f"(charrnn serve --max_message_bytes); ask for fewer rows, "
                                                     f"ids or characters per call")
        if "num_chars" in inputs and int(inputs["num_chars"].max()) > SEGMENT_CHARS:
            outputs = self._run_in_segments(loaded, signature, inputs, deadline, alive)
        else:
            outputs = self._run(loaded, signature, inputs, deadline, alive)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = loaded.name
        response.model_spec.version.value = loaded.version
        response.model_spec.signature_name = signature
        response_outputs = response.outputs
        for key, value in outputs.items():
            if not output_filter or key in output_filter:
                wire.to_tensor_proto(value, response_outputs[key])
        return response

    def _run(self, loaded: LoadedVersion, signature: str, inputs: dict[str, np.ndarray], deadline: float | None,
             alive) -> dict[str, np.ndarray]:
        """Runs one checked call, alone or in a batch; ``ids`` out of ``generate`` keep the call's own length."""
        def caller_waits() -> bool:
            return (alive is None or alive()) and (deadline is None or time.monotonic() < deadline)

        self.ran_at = time.monotonic()
        try:
            if self.batcher is not None and inputs:
                future = self.batcher.submit(loaded, signature, inputs, alive=caller_waits)
                try:
                    outputs = future.result(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
                except futures.TimeoutError:
                    future.cancel()
                    raise ServingError("DEADLINE_EXCEEDED",
                                       "deadline exceeded while waiting in the batching queue") from None
                except futures.CancelledError:
                    log.debug("stopped a call before its batch ran: its caller went away")
                    raise ServingError("CANCELLED", "the call was cancelled before its batch ran") from None
            else:
                outputs = run_signature(loaded, signature, inputs)
        finally:
            self.ran_at = time.monotonic()
        if "num_chars" in inputs and "ids" in outputs and outputs["ids"].ndim == 2:
            outputs["ids"] = outputs["ids"][:, :int(inputs["num_chars"].max())]  # a batch pads to its longest row
        return outputs

    def _run_in_segments(self, loaded: LoadedVersion, signature: str, inputs: dict[str, np.ndarray],
                         deadline: float | None, alive) -> dict[str, np.ndarray]:
        """A long generate call as segments of at most ``SEGMENT_CHARS`` characters per row.

        Each segment feeds the last character sampled (its states and position carried
        over), as a session's next call would; the seeded text does not depend on how a
        call is cut. Between segments the caller is checked: gone, the work stops.
        """
        remaining = inputs["num_chars"].astype(np.int64)
        current = {k: v.copy() for k, v in inputs.items()}
        rows = remaining.shape[0]
        pieces: list[list] = [[] for _ in range(rows)]
        text_out = "text" in loaded.signature_defs[signature].outputs
        state_keys = [k for k in inputs if k not in request_limits.SAMPLING_ROWS and k not in ("prime", "ids")]
        while remaining.max() > 0:
            if alive is not None and not alive():
                log.debug("stopped a generate call between segments: its caller went away")
                raise ServingError("CANCELLED", "the caller went away")
            if deadline is not None and time.monotonic() >= deadline:
                raise ServingError("DEADLINE_EXCEEDED", "deadline exceeded between segments of a long call")
            active = np.nonzero(remaining > 0)[0]
            segment = {k: v[active] for k, v in current.items()}
            take = np.minimum(remaining[active], SEGMENT_CHARS).astype(np.int32)
            segment["num_chars"] = take
            outputs = self._run(loaded, signature, segment, deadline, alive)
            last_ids = np.zeros([len(active), 1], np.int32)
            for j, row in enumerate(active):
                if text_out:
                    text = outputs["text"][j]
                    pieces[row].append(text)
                    chars = text.decode("utf-8", errors="replace")
                    if chars:
                        current["prime"][row] = chars[-1].encode("utf-8")
                else:
                    pieces[row].append(outputs["ids"][j, :take[j]])
                    last_ids[j, 0] = outputs["ids"][j, take[j] - 1]
                for key in state_keys:
                    current[key][row] = outputs[key][j]
            current["position"][active] += take
            if not text_out:
                ids = current["ids"] if current["ids"].shape[1] == 1 else np.zeros([rows, 1], np.int32)
                ids[active] = last_ids
                current["ids"] = ids
            remaining[active] -= take
        result = {key: current[key] for key in state_keys}
        if text_out:
            result["text"] = np.array([b"".join(p) for p in pieces], dtype=object)
        else:
            width = int(inputs["num_chars"].max())
            result["ids"] = np.stack([np.pad(np.concatenate(p), (0, width - sum(map(len, p)))) for p in pieces])
        return result

    @_guarded
    def GetModelMetadata(self, request, context):
        return self.metadata(request)

    def metadata(self, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """GetModelMetadata, transport aside (gRPC and REST); raises ServingError."""
        loaded = self._resolve(request.model_spec)
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
            ``max_concurrent_requests`` (0: no cap) and ``segment_chars``.
        """
        limits = struct_pb2.Struct()
        limits.update({**self.limits.advertised(), "max_message_bytes": self.max_message_bytes,
                       "max_concurrent_requests": self.max_concurrent_requests, "segment_chars": SEGMENT_CHARS})
        return limits

    def _unimplemented(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "only Predict and GetModelMetadata are served for these models")

    Classify = Regress = MultiInference = _unimplemented


class ModelStatusServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    @_guarded
    def GetModelStatus(self, request, context):
        return self.status(request)

    def status(self, request) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatus, transport aside (gRPC and REST); raises ServingError."""
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        if version is None and spec.version_label:
            version = self.manager.resolve(spec.name, None, spec.version_label).version
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, status in self.manager.statuses(spec.name, version):
            entry = response.model_version_status.add(version=v, state=status.state)
            if status.error:
                entry.status.error_code = error_codes_pb2.Code.Value(status.error_code)
                entry.status.error_message = status.error
        return response

    @_guarded
    def HandleReloadConfigRequest(self, request, context):
        return self.reload_config(request)

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


# ----- the server -----------------------------------------------------------------------------

class ModelServer:
    """A TF Serving-compatible gRPC server for keras-charrnn SavedModels.

    Args:
        options: where to listen and what to serve.

    Example:

    >>> server = ModelServer(ServerOptions(port=0, model_name="shakespeare",
    ...                                    model_base_path="saved_models/shakespeare"))  # doctest: +SKIP
    >>> server.start(); print(server.port)                                            # doctest: +SKIP
    """

    def __init__(self, options: ServerOptions):
        self.options = options
        self.manager = ModelManager(model_server_config(options), options.file_system_poll_wait_seconds)
        self.manager.xla = options.xla_cpu_compilation_enabled
        self.manager.allow_version_labels_for_unavailable_models = options.allow_version_labels_for_unavailable_models
        self.limits = serving_limits(options)
        batching = batching_options(options.batching_parameters_file) if options.enable_batching else None
        self.max_concurrent_requests = concurrency_cap(options, batching)
        self.grpc_threads = grpc_threads(options, self.max_concurrent_requests)
        self.batcher = None
        if batching is not None:
            self.batcher = Batcher(run_signature, batching)
            log.info("batching on: %s", ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(batching).items()))
            if self.grpc_threads > options.grpc_max_threads:
                log.info("gRPC threads raised to %d (max_concurrent_requests %d + %d): batches of max_batch_size "
                         "need that many calls waiting", self.grpc_threads, self.max_concurrent_requests,
                         HEALTH_THREADS)
        self.health = health.HealthServicer()
        self._warmed: dict[tuple[str, int], weakref.ref] = {}  # versions whose batch sizes are compiled
        self.manager.on_change = self._after_poll  # every poll: new versions warmed, health follows what is loaded
        self.port: int | None = None
        self.rest_port: int | None = None
        self._rest: RestServer | None = None
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    def _after_poll(self) -> None:
        if self.batcher is not None:
            self._warm_batch_sizes()
        self._update_health()

    def _warm_batch_sizes(self) -> None:
        """Compiles each newly loaded version's XLA twins for every batch size the batcher pads to.

        A version's warm-up records cover the sizes given at export (1, 2, 4 and 8 by
        default); a batched call of another size would otherwise XLA-compile (about a
        second for a 2x512 LSTM) while its batch, and every call behind it, waits.
        """
        current = {(name, version): loaded for name, model in self.manager.models.items()
                   for version, loaded in list(model.loaded.items())}
        self._warmed = {key: ref for key, ref in self._warmed.items() if current.get(key) is ref()}
        compiled = False
        for key, loaded in current.items():
            if key in self._warmed:
                continue
            self._warmed[key] = weakref.ref(loaded)  # weakly: an unloaded version's memory is not held
            requests = warmup.warmup_requests(loaded.signature_defs, self.batcher.allowed_batch_sizes)
            if not loaded.xla or not requests:  # the plain signatures run any batch size without compiling
                continue
            started = time.monotonic()
            try:
                for request in requests:
                    run_signature(loaded, request.model_spec.signature_name, warmup.request_arrays(request))
            except Exception as exc:  # a call of that size will compile (or fail) then, as before
                log.warning("model %s version %d: warming the batch sizes failed: %s", *key, exc)
                continue
            compiled = True
            log.info("model %s version %d: ran %d call(s) to compile batch sizes %s (%.1f s)", *key, len(requests),
                     self.batcher.allowed_batch_sizes, time.monotonic() - started)
        if compiled:
            release_freed_memory()  # the compiler's freed heap goes back to the system

    def _update_health(self) -> None:
        """Health: SERVING while every model has a version AVAILABLE ("" and the service names), per model too."""
        serving = self.manager.serving()
        status = health_pb2.HealthCheckResponse
        overall = status.SERVING if serving and all(serving.values()) else status.NOT_SERVING
        for name in ("", *HEALTH_SERVICES):
            self.health.set(name, overall)
        for name, ready in serving.items():
            self.health.set(name, status.SERVING if ready else status.NOT_SERVING)

    def _credentials(self):
        if not self.options.ssl_config_file:
            return None
        ssl = read_text_proto(self.options.ssl_config_file, SSLConfig())
        if not ssl.server_key or not ssl.server_cert:
            raise ConfigError(f"{self.options.ssl_config_file}: server_key and server_cert are required")
        if ssl.client_verify and not ssl.custom_ca:
            raise ConfigError(f"{self.options.ssl_config_file}: client_verify needs custom_ca")
        return grpc.ssl_server_credentials([(ssl.server_key.encode(), ssl.server_cert.encode())],
                                           root_certificates=ssl.custom_ca.encode() if ssl.custom_ca else None,
                                           require_client_auth=ssl.client_verify)

    def start(self) -> int:
        """Loads the models, then listens; returns the port (useful with port 0)."""
        credentials = self._credentials()
        self.manager.start()
        release_freed_memory()  # loading and XLA compiling at warm-up leave much freed heap behind
        self._watch_model_config()
        limit = self.options.max_message_bytes
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.grpc_threads),
                             options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit),
                                      ("grpc.so_reuseport", 0)])
        prediction = PredictionServicer(self.manager, self.batcher, self.limits, self.max_concurrent_requests,
                                        self.options.max_message_bytes)
        model_status = ModelStatusServicer(self.manager)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(model_status, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (*HEALTH_SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{self.options.host}:{self.options.port}"
        try:
            self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:  # grpc's "failed to bind": the port is taken or the host is not this machine's
            self.port = 0
        if not self.port:
            self.manager.stop()
            raise ConfigError(f"cannot listen on {address} (is the port in use, and is host an address of this "
                              f"machine?)")
        if self.options.rest_api_port:
            self._start_rest(prediction, model_status)
        server.start()
        self._server = server
        self._update_health()
        threading.Thread(target=self._trim_when_idle, args=(prediction,), name="charrnn-idle-trim",
                         daemon=True).start()
        log.info("listening on %s:%d (%s)", self.options.host, self.port, "TLS" if credentials else "plaintext")
        return self.port

    def _trim_when_idle(self, prediction: PredictionServicer) -> None:
        """Once the model calls stop for ``IDLE_TRIM_SECONDS``, gives the heap they freed back (``malloc_trim``).

        A load of many concurrent calls (batches, their requests and responses, the gRPC
        threads) leaves freed heap that glibc's malloc keeps; trimmed once per busy spell,
        when no call has run for a second, so no call pays for it.
        """
        trimmed_at = time.monotonic()
        while not self._stopped.wait(IDLE_TRIM_SECONDS):
            ran_at = prediction.ran_at
            if ran_at > trimmed_at and time.monotonic() - ran_at >= IDLE_TRIM_SECONDS:
                trimmed_at = time.monotonic()
                release_freed_memory()

    def _start_rest(self, prediction: PredictionServicer, model_status: ModelStatusServicer) -> None:
        """Starts the REST API (with the playground, and the metrics if the monitoring config enables them)."""
        timeout_ms = self.options.rest_api_timeout_in_ms
        api = RestApi(prediction, model_status, timeout_ms / 1000 if timeout_ms > 0 else None)
        try:
            prometheus = monitoring.read_monitoring_config(self.options.monitoring_config_file)
            self._rest = RestServer(api, self.options.host, self.options.rest_api_port,
                                    self.options.max_message_bytes, prometheus.path if prometheus.enable else None,
                                    list(self.manager.models), self.options.max_chars_per_call,
                                    self.options.rest_api_num_threads)
        except BaseException:
            self.manager.stop()
            raise
        self.rest_port = self._rest.start()
        log.info("REST API on %s:%d%s", self.options.host, self.rest_port,
                 f", Prometheus metrics at {prometheus.path}" if prometheus.enable else "")

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets the calls in flight finish (up to ``grace`` seconds), then stops."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.options.shutdown_grace_seconds if grace is None else grace
        if self._rest is not None:
            self._rest.stop(grace)
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.close()
        self.manager.stop()
        log.info("stopped")

    def wait(self) -> None:
        """Blocks until ``stop``."""
        self._stopped.wait()

    def serve_until_signal(self) -> None:
        """Runs until SIGTERM or SIGINT, then drains the calls in flight and returns."""
        received = threading.Event()

        def on_signal(signum, frame):
            log.info("received %s: draining", signal.Signals(signum).name)
            received.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not received.wait(0.5) and not self._stopped.is_set():
            pass
        self.stop()

    def _watch_model_config(self) -> None:
        """Rereads ``model_config_file`` every ``model_config_file_poll_wait_seconds`` (models added, removed,
        relabelled live); a removed model's health turns NOT_SERVING."""
        self.manager.on_remove = self._models_removed
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            self.manager.watch_config_file(self.options.model_config_file,
                                           self.options.model_config_file_poll_wait_seconds)

    def _models_removed(self, names: list[str]) -> None:
        """Health of models a config reload removed: NOT_SERVING."""
        for name in names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
