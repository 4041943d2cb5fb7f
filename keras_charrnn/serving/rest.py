"""TensorFlow Serving's REST API for the embedded model server, plus the playground page and metrics.

``charrnn serve --rest_api_port 8501`` answers, as ``tensorflow_model_server`` does:

``GET /v1/models/NAME[/versions/N | /labels/L]``
    the model's version states (``GetModelStatusResponse`` as JSON).
``GET /v1/models/NAME[/versions/N | /labels/L]/metadata``
    its signatures (``GetModelMetadataResponse`` as JSON).
``POST /v1/models/NAME[/versions/N | /labels/L]:predict``
    ``{"signature_name": ..., "instances": [...]}`` (row format: one object per
    batch row, answered with ``"predictions"``) or ``{"inputs": {...}}``
    (columnar: one value per input, answered with ``"outputs"``). Binary
    strings travel as ``{"b64": "..."}``; string outputs whose name ends in
    ``_bytes`` (and any that are not UTF-8) come back that way.

A request is turned into the gRPC ``PredictRequest`` it stands for and runs
through the gRPC service's own ``predict``, so the checks, limits, batching
and error messages are the same. Failures answer ``{"error": "..."}`` with
TF Serving's HTTP status for the code (400 INVALID_ARGUMENT and
FAILED_PRECONDITION, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE,
504 DEADLINE_EXCEEDED, 501 UNIMPLEMENTED, 500 otherwise). Bodies over
``max_body_bytes`` (the gRPC message limit) are refused with 413 before
they are read; bodies without a Content-Length (chunked) with 411.

Also on this port: ``GET /playground`` (a page to continue a text call by
call, keeping the hidden state in the browser) and, when a monitoring config
enables Prometheus, the metrics (see ``monitoring``).

The HTTP layer is the standard library's ``http.server``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote, urlsplit

import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from keras_charrnn import sampling
from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.serving import monitoring, wire
from keras_charrnn.serving.options import (DEFAULT_HOST, DEFAULT_REST_NUM_THREADS, DEFAULT_REST_PORT,
                                           DEFAULT_REST_TIMEOUT_MS, MAX_MESSAGE_BYTES)
from keras_charrnn.serving.wire import DT_BOOL, DT_FLOAT, DT_INT32, DT_INT64, DT_STRING

log = logging.getLogger("charrnn.serve")

MAX_JSON_DEPTH = 32  # deeper JSON is refused before it is walked
DEFAULT_TIMEOUT_MS = DEFAULT_REST_TIMEOUT_MS  # tensorflow_model_server's --rest_api_timeout_in_ms
DEFAULT_NUM_THREADS = DEFAULT_REST_NUM_THREADS
PLAYGROUND_PATH = "/playground"

# TF Serving's status code -> HTTP status (tensorflow_serving/model_servers/http_server.cc).
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}

# The URL patterns of TF Serving's REST API (tensorflow_serving/model_servers/http_rest_api_util.cc).
# ASCII digits only (``\d`` also takes "²" and other Unicode digits), at most 18 so the number fits an int64.
_VERSION_OR_LABEL = r"(?:(?:/versions/([0-9]{1,18}))|(?:/labels/([^/:]+)))?"
PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)" + _VERSION_OR_LABEL + r":(classify|regress|predict)", re.I)
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?" + _VERSION_OR_LABEL + r"(?:/(metadata))?", re.I)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")

_NUMPY = {DT_FLOAT: np.float32, DT_INT32: np.int32, DT_INT64: np.int64, DT_BOOL: np.bool_, DT_STRING: object}
_DTYPE_NAME = {DT_FLOAT: "float", DT_INT32: "int32", DT_STRING: "string", DT_INT64: "int64", DT_BOOL: "bool"}
_INT_RANGE = {DT_INT32: (-2 ** 31, 2 ** 31 - 1), DT_INT64: (-2 ** 63, 2 ** 63 - 1)}


def _invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----- JSON -> NumPy, typed by the signature -------------------------------------------------

def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _json_depth_ok(document, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (list, dict)))
        elif isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (list, dict)))
    return True


def _scalar(value, dtype: int, name: str):
    if dtype == DT_STRING:
        if isinstance(value, str):
            return value.encode("utf-8")
        if _is_b64(value):
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise _invalid(f"input {name!r}: unable to base64 decode {_short(value)}") from None
        if isinstance(value, dict):
            raise _invalid(f"input {name!r}: JSON value {_short(value)} not formatted correctly for base64 data")
    elif dtype == DT_FLOAT:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif dtype in _INT_RANGE:
        low, high = _INT_RANGE[dtype]
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
    elif dtype == DT_BOOL:
        if isinstance(value, bool):
            return value
    raise _invalid(f"input {name!r}: JSON value {_short(value)} is not of expected type {_DTYPE_NAME[dtype]}")


def json_to_array(value, dtype: int, name: str) -> np.ndarray:
    """One tensor in TF Serving's JSON form (a value or dense nested lists) as a NumPy array.

    Args:
        value: the parsed JSON.
        dtype: the signature input's ``DataType`` enum value.
        name: the input's name (for messages).

    Returns:
        The array (strings as ``bytes`` objects).

    Raises:
        ServingError: INVALID_ARGUMENT for a ragged list, a value of the wrong type, bad base64,
            or a dtype this server does not take over REST.

    Example:

    >>> json_to_array([[1, 2], [3, 4]], DT_INT32, "ids").shape
    (2, 2)
    """
    if dtype not in _NUMPY:
        raise _invalid(f"input {name!r}: its dtype (DataType {dtype}) is not supported by this server's REST API")
    shape, probe = [], value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    flat = []

    def fill(item, level):
        if isinstance(item, list):
            if level >= len(shape) or len(item) != shape[level]:
                raise _invalid(f"input {name!r}: the nested lists are not a dense tensor of shape {shape}")
            for element in item:
                fill(element, level + 1)
        elif level != len(shape):
            raise _invalid(f"input {name!r}: the nested lists are not a dense tensor of shape {shape}")
        else:
            flat.append(_scalar(item, dtype, name))

    fill(value, 0)
    array = np.empty(len(flat), dtype=object) if dtype == DT_STRING else np.array(flat, dtype=_NUMPY[dtype])
    if dtype == DT_STRING:
        array[:] = flat
    return array.reshape(shape)


def request_arrays(body: dict, input_infos) -> tuple[dict[str, np.ndarray], str]:
    """The input tensors of a ``:predict`` body, in either of TF Serving's formats.

    Args:
        body: the parsed request: ``instances`` (row format) or ``inputs`` (columnar).
        input_infos: the signature's inputs (name -> ``TensorInfo``).

    Returns:
        The arrays by input name, and the format: ``"row"`` or ``"columnar"``.

    Raises:
        ServingError: INVALID_ARGUMENT for a body that does not fit the signature.
    """
    names = sorted(input_infos)
    if ("instances" in body) == ("inputs" in body):
        raise _invalid("the request must hold exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    if "inputs" in body:
        value = body["inputs"]
        if not isinstance(value, dict) or _is_b64(value):
            if len(names) != 1:
                raise _invalid(f"inputs is a plain value/list, but the signature takes {len(names)} named inputs "
                               f"{names}: give an object")
            value = {names[0]: value}
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise _invalid(f"unexpected input(s) {unknown} in 'inputs'; the signature takes {names}")
        missing = [n for n in names if n not in value]
        if missing:
            raise _invalid(f"missing named input(s) {missing} in 'inputs' object")
        return {n: json_to_array(value[n], input_infos[n].dtype, n) for n in names}, "columnar"

    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise _invalid("'instances' must be a non-empty list")
    if not names:
        raise _invalid("the signature takes no inputs: use the columnar format, {\"inputs\": {}}")
    as_objects = isinstance(rows[0], dict) and not _is_b64(rows[0])
    if not as_objects and len(names) > 1:
        raise _invalid(f"instances is a plain list, but the signature takes {len(names)} named inputs {names}: "
                       f"give a list of objects")
    columns: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i, row in enumerate(rows):
        if as_objects:
            if not isinstance(row, dict) or _is_b64(row):
                raise _invalid(f"expecting an object but got {_short(row)} at item {i} of 'instances'")
            if set(row) != set(names):
                raise _invalid(f"item {i} of 'instances' has keys {sorted(row)}; they must be {names}")
        elif isinstance(row, dict) and not _is_b64(row):
            raise _invalid(f"expecting a value/list but got an object at item {i} of 'instances'")
        for n in names:
            array = json_to_array(row[n] if as_objects else row, input_infos[n].dtype, n)
            if columns[n] and array.shape != columns[n][0].shape:
                raise _invalid(f"input {n!r}: item {i} of 'instances' has shape {list(array.shape)}, "
                               f"item 0 has {list(columns[n][0].shape)}")
            columns[n].append(array)
    return {n: np.stack(columns[n]) for n in names}, "row"


# ----- NumPy -> JSON ------------------------------------------------------------------------

def _jsonable(array: np.ndarray, name: str):
    if array.dtype != object:
        return array.tolist()
    as_b64 = name.endswith("_bytes")

    def convert(item):
        if isinstance(item, list):
            return [convert(x) for x in item]
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        if not as_b64:
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                pass  # not text: binary, as TF Serving writes a *_bytes output
        return {"b64": base64.b64encode(data).decode("ascii")}

    return convert(array.tolist())


def response_json(outputs: dict[str, np.ndarray], form: str) -> dict:
    """A predict answer in TF Serving's JSON: ``predictions`` (row format) or ``outputs`` (columnar).

    One output is given bare; several by name (a list of objects in the row format).

    Args:
        outputs: the output arrays by name.
        form: ``"row"`` or ``"columnar"``, the request's format.

    Returns:
        The JSON-ready answer.

    Raises:
        ServingError: INVALID_ARGUMENT when row format meets outputs of different batch sizes.
    """
    names = sorted(outputs)
    if form == "columnar":
        if len(names) == 1:
            return {"outputs": _jsonable(outputs[names[0]], names[0])}
        return {"outputs": {n: _jsonable(outputs[n], n) for n in names}}
    sizes = {outputs[n].shape[0] if outputs[n].ndim else None for n in names}
    if len(sizes) != 1 or None in sizes:
        raise _invalid("the outputs do not share one batch size; use the columnar format ('inputs')")
    columns = {n: _jsonable(outputs[n], n) for n in names}
    if len(names) == 1:
        return {"predictions": columns[names[0]]}
    return {"predictions": [{n: columns[n][i] for n in names} for i in range(sizes.pop())]}


# ----- the API, transport aside -------------------------------------------------------------

@dataclass
class Reply:
    """An HTTP answer: status, content type and body."""

    status: int
    content_type: str
    body: bytes


def _json_reply(status: int, document, pretty: bool = True) -> Reply:
    text = json.dumps(document, indent=1) if pretty else json.dumps(document, separators=(",", ":"))
    return Reply(status, "application/json", text.encode("utf-8") + b"\n")


def error_reply(error: ServingError) -> Reply:
    """``{"error": message}`` with the HTTP status TF Serving gives the error's code."""
    return _json_reply(HTTP_STATUS.get(error.code, 500), {"error": error.message})


class RestApi:
    """TF Serving's REST API over the gRPC services' transport-neutral methods.

    Args:
        prediction: the ``PredictionServicer`` (its ``predict`` and ``metadata``).
        model_status: the ``ModelStatusServicer`` (its ``status``).
        timeout_s: the longest a predict call may wait (``--rest_api_timeout_in_ms``).
    """

    def __init__(self, prediction, model_status, timeout_s: float | None = DEFAULT_TIMEOUT_MS / 1000):
        self.prediction = prediction
        self.model_status = model_status
        self.timeout_s = timeout_s

    def handle(self, method: str, path: str, body: bytes) -> Reply:
        """Answers one ``/v1/...`` request; counts it in the metrics as TF Serving does.

        Args:
            method: ``GET`` or ``POST``.
            path: the URL path (without the query).
            body: the request body.

        Returns:
            The reply (errors included).
        """
        start = time.perf_counter()
        model_name, api, status = "", "", "INTERNAL"
        try:
            match = (PREDICT_PATH if method == "POST" else STATUS_PATH).fullmatch(path)
            if method not in ("GET", "POST") or match is None:
                raise _invalid(f"Malformed request: {method} {path}")
            model_name = unquote(match.group(1) or "")
            version = int(match.group(2)) if match.group(2) else None
            label = unquote(match.group(3)) if match.group(3) else None
            if not model_name:
                raise _invalid("Missing model name in request.")
            spec = predict_pb2.PredictRequest().model_spec
            spec.name = model_name
            if version is not None:
                spec.version.value = version
            if label is not None:
                spec.version_label = label
            if method == "POST":
                api = match.group(4).lower()
                if api != "predict":
                    raise ServingError("UNIMPLEMENTED", f"{api} is not served for these models; use predict")
                reply = self._predict(spec, body)
            elif match.group(4):
                reply = self._metadata(spec)
            else:
                reply = self._status(spec)
            status = "OK"
            return reply
        except ServingError as exc:
            status = exc.code
            return error_reply(exc)
        except Exception as exc:  # never a traceback to the caller
            log.exception("internal error in REST %s %s", method, path)
            return error_reply(ServingError("INTERNAL", f"internal error: {type(exc).__name__}"))
        finally:
            monitoring.record_request(model_name, api, "REST", status, time.perf_counter() - start)

    def _status(self, spec) -> Reply:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.CopyFrom(spec)
        response = self.model_status.status(request)
        for entry in response.model_version_status:
            entry.status.SetInParent()  # TF Serving always writes the status, {"error_code": "OK"} included
        return _json_reply(200, json_format.MessageToDict(response, always_print_fields_with_no_presence=True))

    def _metadata(self, spec) -> Reply:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.CopyFrom(spec)
        response = self.prediction.metadata(request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        options = dict(always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
        return _json_reply(200, {"model_spec": json_format.MessageToDict(response.model_spec, **options),
                                 "metadata": {"signature_def": json_format.MessageToDict(sig_map, **options)}})

    def _predict(self, spec, body: bytes) -> Reply:
        document = parse_json(body)
        signature = document.get("signature_name", "serving_default")
        if not isinstance(signature, str):
            raise _invalid("'signature_name' must be a string")
        signature = signature or "serving_default"
        version = spec.version.value if spec.HasField("version") else None
        loaded = self.prediction.manager.resolve(spec.name, version, spec.version_label or None)
        loaded.signature(signature)  # FAILED_PRECONDITION when it is not there, as over gRPC
        arrays, form = request_arrays(document, loaded.signature_defs[signature].inputs)
        request = predict_pb2.PredictRequest()
        request.model_spec.CopyFrom(spec)
        request.model_spec.signature_name = signature
        for name, array in arrays.items():
            wire.to_tensor_proto(array, request.inputs[name])
        response = self.prediction.predict(request, timeout=self.timeout_s)
        outputs = {name: wire.from_tensor_proto(proto) for name, proto in response.outputs.items()}
        return _json_reply(200, response_json(outputs, form), pretty=False)  # states: thousands of numbers


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object (NaN and Infinity allowed, as TF Serving does).

    Raises:
        ServingError: INVALID_ARGUMENT for an empty, malformed, too deeply nested or non-object body.
    """
    if not body:
        raise _invalid("JSON Parse error: The document is empty")
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise _invalid("JSON Parse error: the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _invalid(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
    except RecursionError:
        raise _invalid(f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(document, dict):
        raise _invalid(f"JSON Value: {_short(document)} Is not object")
    if not _json_depth_ok(document):
        raise _invalid(f"JSON Parse error: nested deeper than {MAX_JSON_DEPTH} levels")
    return document


# ----- the playground page ------------------------------------------------------------------

def playground_page(model_names: list[str], max_chars_per_call: int) -> bytes:
    """The playground HTML with this server's models and the sampling defaults filled in.

    Args:
        model_names: the models the page offers.
        max_chars_per_call: the server's cap on characters per call.

    Returns:
        The page, UTF-8.
    """
    settings = {"models": model_names, "maxCharsPerCall": max_chars_per_call,
                "defaults": {"temperature": sampling.DEFAULT_TEMPERATURE, "top_k": sampling.DEFAULT_TOP_K,
                             "top_p": sampling.DEFAULT_TOP_P, "prime": sampling.DEFAULT_PRIME,
                             "num_chars": sampling.DEFAULT_CHUNK}}
    template = resources.files("keras_charrnn.serving").joinpath("playground.html").read_text(encoding="utf-8")
    script_safe = json.dumps(settings).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return template.replace("/*SETTINGS*/null", script_safe).encode("utf-8")


# ----- HTTP ---------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length
    server_version = "charrnn-rest"
    timeout = 30  # seconds a connection may sit idle or trickle its request
    server: "_HTTPServer"

    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        log.debug("REST %s: " + format, self.client_address[0], *args)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True  # the body was not read: the connection cannot carry another request
        self._send(Reply(status, "application/json", json.dumps({"error": message}).encode("utf-8") + b"\n"))

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command == "POST":
                self._refuse(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length header")
                return None
            return b""
        if not _CONTENT_LENGTH.fullmatch(length):  # not str.isdigit: it takes "²", which int() refuses
            self._refuse(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length!r}")
            return None
        if int(length) > self.server.max_body_bytes:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body ({length} bytes) is over this server's "
                                                              f"limit of {self.server.max_body_bytes} bytes")
            return None
        return self.rfile.read(int(length))

    def _dispatch(self) -> None:
        body = self._read_body()
        if body is None:
            return
        path = urlsplit(self.path).path
        server = self.server
        with server.tracker:
            if path.lower().startswith("/v1/"):
                reply = server.api.handle(self.command, path, body)
            elif self.command in ("GET", "HEAD") and server.metrics_path and path == server.metrics_path:
                reply = Reply(200, monitoring.CONTENT_TYPE, monitoring.METRICS.exposition())
            elif self.command in ("GET", "HEAD") and path in (PLAYGROUND_PATH, PLAYGROUND_PATH + "/"):
                reply = Reply(200, "text/html; charset=utf-8", server.playground())
            else:
                reply = error_reply(ServingError("NOT_FOUND", f"no such resource: {self.command} {path}"))
        self._send(reply)

    do_GET = do_POST = do_HEAD = _dispatch


class _InFlight:
    """Counts the requests being answered and bounds them; ``wait_idle`` drains them."""

    def __init__(self, limit: int):
        self._slots = threading.BoundedSemaphore(limit)
        self._cond = threading.Condition()
        self.count = 0

    def __enter__(self):
        self._slots.acquire()
        with self._cond:
            self.count += 1

    def __exit__(self, *exc):
        with self._cond:
            self.count -= 1
            self._cond.notify_all()
        self._slots.release()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count == 0, timeout)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections do not hold up shutdown
    allow_reuse_address = True

    def __init__(self, address, api: RestApi, max_body_bytes: int, metrics_path: str | None, playground,
                 num_threads: int):
        super().__init__(address, _Handler)
        self.api = api
        self.max_body_bytes = max_body_bytes
        self.metrics_path = metrics_path
        self.playground = playground
        self.tracker = _InFlight(num_threads)


class RestServer:
    """The HTTP server on ``--rest_api_port``: the REST API, ``/playground`` and the metrics.

    Args:
        api: answers the ``/v1/`` requests.
        host: the address to listen on.
        port: the port (0: a free one).
        max_body_bytes: the largest request body read (larger: 413).
        metrics_path: where the Prometheus metrics are served (None: not served).
        model_names: the models the playground offers.
        max_chars_per_call: the server's cap, shown by the playground.
        num_threads: requests answered at once (more wait).

    Example:

    >>> rest = RestServer(RestApi(prediction, model_status), port=8501)  # doctest: +SKIP
    >>> rest.start(); rest.stop(grace=5)                                 # doctest: +SKIP
    """

    def __init__(self, api: RestApi, host: str = DEFAULT_HOST, port: int = DEFAULT_REST_PORT,
                 max_body_bytes: int = MAX_MESSAGE_BYTES,
                 metrics_path: str | None = None, model_names: list[str] = (),
                 max_chars_per_call: int = sampling.MAX_CHARS_PER_CALL, num_threads: int = DEFAULT_NUM_THREADS):
        if num_threads < 1:
            raise ConfigError(f"rest_api_num_threads must be at least 1, got {num_threads}")
        page = playground_page(list(model_names), max_chars_per_call)
        try:
            self._http = _HTTPServer((host, port), api, max_body_bytes, metrics_path, lambda: page, num_threads)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for the REST API ({exc.strerror})") from None
        self.port: int = self._http.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Serves in a background thread; returns the port."""
        self._thread = threading.Thread(target=self._http.serve_forever, name="rest-api", daemon=True)
        self._thread.start()
        return self.port

    def stop(self, grace: float = 30.0) -> None:
        """Stops accepting requests, lets those being answered finish (up to ``grace`` seconds), closes."""
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
            self._thread = None
        if not self._http.tracker.wait_idle(grace):
            log.warning("REST: requests still running after %.0f s; closing anyway", grace)
        self._http.server_close()
