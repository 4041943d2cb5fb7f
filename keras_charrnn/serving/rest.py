"""The REST handlers: TensorFlow Serving's REST API over the gRPC servicers, plus the playground page and metrics.

``charrnn serve --rest_api_port 8501`` answers, as ``tensorflow_model_server`` does:

``GET /v1/models/NAME[/versions/N | /labels/L]``
    the model's version states (``GetModelStatusResponse`` as JSON).
``GET /v1/models/NAME[/versions/N | /labels/L]/metadata``
    its signatures (``GetModelMetadataResponse`` as JSON).
``POST /v1/models/NAME[/versions/N | /labels/L]:predict``
    ``{"signature_name": ..., "instances": [...]}`` (row format: one object per
    batch row, answered with ``"predictions"``) or ``{"inputs": {...}}``
    (columnar: one value per input, answered with ``"outputs"``); the JSON tensors
    are ``json_codec``'s.

A predict resolves its model once, decodes the body into the signature's arrays
and runs them through the gRPC service's ``predict_arrays``, so the checks,
limits, batching and error messages are the gRPC ones. Failures answer ``{"error": "..."}`` with
TF Serving's HTTP status for the code (400 INVALID_ARGUMENT and
FAILED_PRECONDITION, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE,
504 DEADLINE_EXCEEDED, 501 UNIMPLEMENTED, 500 otherwise). Bodies over
``max_body_bytes`` (the gRPC message limit) are refused with 413 before
they are read; bodies without a Content-Length (chunked) with 411.

``POST /v1/models/NAME[/versions/N | /labels/L]:stream``
    the body a ``:predict`` takes, for a generate signature, answered as Server-Sent
    Events: one per segment as the text is produced, then ``done`` (see ``sse``).

Also on this port: ``GET /playground`` (a page to continue a text call by
call, keeping the hidden state in the browser), when a monitoring config
enables Prometheus, the metrics (see ``monitoring``), and the OpenAI-compatible
routes (``openai_api``). With ``--api_key_file`` every route but the model status
one needs ``Authorization: Bearer KEY`` (``api_keys``); with ``--ssl_config_file``
the port serves TLS (``rest_tls``).

The HTTP layer is the standard library's ``http.server``.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote, urlsplit

from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from keras_charrnn import generation, sampling
from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.serving import monitoring, sse
from keras_charrnn.serving.api_keys import REALM, ApiKeys
from keras_charrnn.serving.json_codec import parse_json, request_arrays, response_json
from keras_charrnn.serving.options import (
    DEFAULT_HOST,
    DEFAULT_REST_NUM_THREADS,
    DEFAULT_REST_PORT,
    DEFAULT_REST_TIMEOUT_MS,
    MAX_MESSAGE_BYTES,
)
from keras_charrnn.serving.streaming import DEFAULT_STREAM_SEGMENT, stream_outputs
from keras_charrnn.serving.servicers import ModelStatusServicer, PredictionServicer, SettingNamer, error_text

log = logging.getLogger("charrnn.serve")

DEFAULT_TIMEOUT_MS = DEFAULT_REST_TIMEOUT_MS  # tensorflow_model_server's --rest_api_timeout_in_ms
DEFAULT_NUM_THREADS = DEFAULT_REST_NUM_THREADS
PLAYGROUND_PATH = "/playground"

# TF Serving's status code -> HTTP status (tensorflow_serving/model_servers/http_server.cc).
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}

# The URL patterns of TF Serving's REST API (tensorflow_serving/model_servers/http_rest_api_util.cc).
# ASCII digits only (``\d`` also takes "²" and other Unicode digits), at most 18 so the number fits an int64.
_VERSION_OR_LABEL = r"(?:(?:/versions/([0-9]{1,18}))|(?:/labels/([^/:]+)))?"
PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)" + _VERSION_OR_LABEL + r":(classify|regress|predict|stream)", re.I)
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?" + _VERSION_OR_LABEL + r"(?:/(metadata))?", re.I)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}")


def _invalid(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


# ----- the API, transport aside -------------------------------------------------------------


@dataclass
class Reply:
    """An HTTP answer: status, content type and body; ``chunks`` (a stream, sent chunked) in place of the body."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    chunks: Iterable[bytes] | None = None


ExtraRoutes = Callable[[str, str, bytes], "Reply | None"]  # (method, path, body) -> a reply, None: not its route


def is_probe_route(method: str, path: str) -> bool:
    """Whether a request is the model status route that probes use (open without an API key).

    Args:
        method: the HTTP method.
        path: the URL path.

    Returns:
        True for ``GET``/``HEAD /v1/models/NAME[/versions/N | /labels/L]`` (not ``/metadata``).
    """
    match = STATUS_PATH.fullmatch(path)
    return method in ("GET", "HEAD") and match is not None and bool(match.group(1)) and not match.group(4)


def _json_reply(status: int, document, pretty: bool = True) -> Reply:
    text = json.dumps(document, indent=1) if pretty else json.dumps(document, separators=(",", ":"))
    return Reply(status, "application/json", text.encode("utf-8") + b"\n")


def error_reply(error: ServingError, name_setting: SettingNamer | None = None) -> Reply:
    """``{"error": message}`` with the HTTP status TF Serving gives the error's code.

    Args:
        error: the error.
        name_setting: how the server's operator sets a setting (see ``servicers.error_text``).

    Returns:
        The reply.
    """
    return _json_reply(HTTP_STATUS.get(error.code, 500), {"error": error_text(error, name_setting)})


class RestApi:
    """TF Serving's REST API over the gRPC services' transport-neutral methods.

    Args:
        prediction: the ``PredictionServicer`` (its ``signature_call``, ``predict_arrays`` and ``metadata``).
        model_status: the ``ModelStatusServicer`` (its ``status``).
        timeout_s: the longest a predict call may wait (``rest_api_timeout_in_ms``).
        name_setting: how the server's operator sets a setting, added to the errors a setting causes.
    """

    def __init__(
        self,
        prediction: PredictionServicer,
        model_status: ModelStatusServicer,
        timeout_s: float | None = DEFAULT_TIMEOUT_MS / 1000,
        name_setting: SettingNamer | None = None,
    ):
        self.prediction = prediction
        self.model_status = model_status
        self.timeout_s = timeout_s
        self.name_setting = name_setting

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
                if api not in ("predict", "stream"):
                    raise ServingError("UNIMPLEMENTED", f"{api} is not served for these models; use predict")
                reply = self._predict(spec, body) if api == "predict" else self._stream(spec, body)
            elif match.group(4):
                reply = self._metadata(spec)
            else:
                reply = self._status(spec)
            status = "OK"
            return reply
        except ServingError as exc:
            status = exc.code
            return error_reply(exc, self.name_setting)
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
        return _json_reply(
            200,
            {
                "model_spec": json_format.MessageToDict(response.model_spec, **options),
                "metadata": {"signature_def": json_format.MessageToDict(sig_map, **options)},
            },
        )

    def _arrays(self, spec, body: bytes):
        """A predict body's signature call, checked arrays and JSON format (the one resolve of the request)."""
        document = parse_json(body)
        signature = document.get("signature_name", "serving_default")
        if not isinstance(signature, str):
            raise _invalid("'signature_name' must be a string")
        call = self.prediction.signature_call(spec, signature)  # FAILED_PRECONDITION as over gRPC
        arrays, form = request_arrays(document, call.loaded.signature_defs[call.name].inputs)
        return call, arrays, form

    def _predict(self, spec, body: bytes) -> Reply:
        call, arrays, form = self._arrays(spec, body)
        outputs = self.prediction.predict_arrays(call, arrays, timeout=self.timeout_s)
        return _json_reply(200, response_json(outputs, form), pretty=False)  # states: thousands of numbers

    def _stream(self, spec, body: bytes) -> Reply:
        """``:stream``: the call's segments as Server-Sent Events (``sse``); its first segment runs here, so
        an error before it is an ordinary error reply."""
        call, arrays, form = self._arrays(spec, body)
        inputs = call.check_arrays(arrays, self.prediction.limits)
        outputs = stream_outputs(self.prediction, call, inputs, set(), None, None, DEFAULT_STREAM_SEGMENT)
        first = next(outputs)
        events = sse.segment_events(
            inputs, itertools.chain([first], outputs), form, lambda exc: error_text(exc, self.name_setting)
        )
        return Reply(200, sse.CONTENT_TYPE, b"", chunks=events)


# ----- the playground page ------------------------------------------------------------------


def playground_page(model_names: list[str], max_chars_per_call: int, api_key: bool = False) -> bytes:
    """The playground HTML with this server's models and the table of generation inputs filled in.

    Args:
        model_names: the models the page offers.
        max_chars_per_call: the server's cap on characters per call.
        api_key: the server needs an API key: the page names no model, asks for the key and
            lists the models with it (``GET /v1/models``).

    Returns:
        The page, UTF-8.
    """
    settings = {
        "models": [] if api_key else model_names,
        "apiKey": api_key,
        "maxCharsPerCall": max_chars_per_call,
        "prime": sampling.DEFAULT_PRIME,
        "schema": json.loads(generation.schema_json()),  # the generation inputs: fields, defaults, carry rules
    }
    template = resources.files("keras_charrnn.serving").joinpath("playground.html").read_text(encoding="utf-8")
    script_safe = json.dumps(settings).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return template.replace("/*SETTINGS*/null", script_safe).encode("utf-8")


# ----- HTTP ---------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body go out at once, not 40 ms apart (delayed ACK)
    server_version = "charrnn-rest"
    timeout = 30  # seconds a connection may sit idle or trickle its request
    server: _HTTPServer

    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        log.debug("REST %s: " + format, self.client_address[0], *args)

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.chunks is not None:
            self._send_chunks(reply.chunks)
            return
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _send_chunks(self, chunks: Iterable[bytes]) -> None:
        """A streamed body (HTTP/1.1 chunked), each chunk flushed as it comes; a caller gone ends the stream."""
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        iterator = iter(chunks)
        try:
            for chunk in iterator:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the caller went away: the generator's finally blocks stop its work
            log.debug("REST %s: the caller left a streamed answer", self.client_address[0])
            self.close_connection = True
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

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
            self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body ({length} bytes) is over this server's limit of {self.server.max_body_bytes} bytes",
            )
            return None
        return self.rfile.read(int(length))

    def _authorized(self, path: str) -> bool:
        """Whether the request may go on; answers 401 (and closes: the body is not read) when it may not."""
        keys = self.server.api_keys
        if keys is None or is_probe_route(self.command, path) or keys.allows(self.headers.get("Authorization")):
            return True
        self.close_connection = True
        message = "a valid API key is required: send 'Authorization: Bearer KEY'"
        openai_route = not path.lower().startswith("/v1/models/") or path.endswith("/vocabulary")  # else TF's shape
        document = (
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
            if openai_route
            else {"error": message}
        )
        challenge = f'Bearer realm="{REALM}"'
        self._send(
            Reply(401, "application/json", json.dumps(document).encode() + b"\n", (("WWW-Authenticate", challenge),))
        )
        return False

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        if not self._authorized(path):
            return
        body = self._read_body()
        if body is None:
            return
        server = self.server
        with server.tracker:
            extra = server.extra(self.command, path, body) if server.extra is not None else None
            if extra is not None:
                if extra.chunks is not None:  # a stream runs while it is sent: it counts as in flight
                    self._send(extra)
                    return
                reply = extra
            elif path.lower().startswith("/v1/"):
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

    def __init__(
        self, address, api: RestApi, max_body_bytes: int, metrics_path: str | None, playground, num_threads: int
    ):
        super().__init__(address, _Handler)
        self.api = api
        self.max_body_bytes = max_body_bytes
        self.metrics_path = metrics_path
        self.playground = playground
        self.tracker = _InFlight(num_threads)
        self.extra: ExtraRoutes | None = None
        self.api_keys: ApiKeys | None = None
        self.ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request, client_address) -> None:
        """Answers one connection (in its own thread); with TLS, its handshake first, bounded by the idle timeout."""
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            request.settimeout(_Handler.timeout)
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:  # a plaintext caller, an unknown client certificate, a timeout
            log.debug("REST: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            try:
                tls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            tls.close()


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
        extra_routes: more routes, tried first (``openai_api.OpenAIApi.handle``): a reply, or None.
        api_keys: the keys every route but the status one needs (None: no key needed).
        ssl_context: serve TLS with this context (``rest_tls.rest_ssl_context``; None: plaintext).

    Example:

    >>> rest = RestServer(RestApi(prediction, model_status), port=8501)  # doctest: +SKIP
    >>> rest.start(); rest.stop(grace=5)                                 # doctest: +SKIP
    """

    def __init__(
        self,
        api: RestApi,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_REST_PORT,
        max_body_bytes: int = MAX_MESSAGE_BYTES,
        metrics_path: str | None = None,
        model_names: Sequence[str] = (),
        max_chars_per_call: int = generation.MAX_CHARS_PER_CALL,
        num_threads: int = DEFAULT_NUM_THREADS,
        extra_routes: ExtraRoutes | None = None,
        api_keys: ApiKeys | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if num_threads < 1:
            raise ConfigError(f"rest_api_num_threads must be at least 1, got {num_threads}")
        page = playground_page(list(model_names), max_chars_per_call, api_key=api_keys is not None)
        try:
            self._http = _HTTPServer((host, port), api, max_body_bytes, metrics_path, lambda: page, num_threads)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for the REST API ({exc.strerror})") from None
        self._http.extra, self._http.api_keys, self._http.ssl_context = extra_routes, api_keys, ssl_context
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
