"""TF Serving's REST API and the playground page, against a real ``charrnn serve`` subprocess over HTTP."""

from __future__ import annotations

import base64
import html
import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from conftest import loaded, write_models_config
from keras_charrnn.errors import ServingError
from keras_charrnn.serving.limits import ServingLimits
from keras_charrnn.serving.rest import error_reply
from keras_charrnn.serving.streaming import DEFAULT_STREAM_SEGMENT
from servers import ServerProcess, free_ports, http_call

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SAMPLING = {"temperature": 0.8, "top_k": 0, "top_p": 1.0}


@pytest.fixture(scope="module")
def rest(model_base, tmp_path_factory):
    """A server for the lstm and gru models with the REST API on; yields its base URL and gRPC port."""
    config = write_models_config(tmp_path_factory.mktemp("rest") / "models.config", model_base, ["lstm", "gru"])
    (port,) = free_ports(1)
    with ServerProcess(["--model_config_file", config, "--rest_api_port", port, "--max_chars_per_call", 500]) as server:
        yield f"http://127.0.0.1:{port}", server.port


@pytest.fixture(scope="module")
def lstm(model_base):
    return loaded(model_base / "lstm")


def generate_inputs(model, prime: str, n: int, seed: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {
        "prime": np.array([prime.encode()] * rows, dtype=object),
        **model.zero_state(rows),
        "num_chars": np.full([rows], n, np.int32),
        "temperature": np.full([rows], 0.8, np.float32),
        "top_k": np.zeros([rows], np.int32),
        "top_p": np.ones([rows], np.float32),
        "seed": np.arange(seed, seed + rows, dtype=np.int64),
        "position": np.zeros([rows], np.int64),
    }


def as_json(arrays: dict[str, np.ndarray]) -> dict:
    """NumPy inputs as TF Serving's columnar JSON (strings as text)."""
    return {k: [x.decode() if isinstance(x, bytes) else x for x in v.tolist()] for k, v in arrays.items()}


def in_process(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    outputs = model.signatures["generate_text"](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def test_model_status_answers_tf_serving_json(rest):
    url, _ = rest
    expected = {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert http_call(f"{url}/v1/models/lstm") == (200, expected)
    assert http_call(f"{url}/v1/models/lstm/versions/1") == (200, expected)
    status, answer = http_call(f"{url}/v1/models/lstm/versions/7")
    assert status == 404 and "version 7" in answer["error"]
    status, answer = http_call(f"{url}/v1/models/nosuchmodel")
    assert status == 404 and "nosuchmodel" in answer["error"]
    status, answer = http_call(f"{url}/v1/models")  # TF Serving answers 400; here it is the OpenAI list (openai_api)
    assert status == 200 and answer["object"] == "list"


def test_model_metadata_lists_the_signatures_with_their_tensors(rest, lstm):
    url, _ = rest
    status, answer = http_call(f"{url}/v1/models/lstm/versions/1/metadata")
    assert status == 200
    assert answer["model_spec"] == {"name": "lstm", "version": "1", "signature_name": ""}
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    assert {"generate_text", "generate", "step", "metadata", "serving_default"} <= set(signatures)
    inputs = signatures["generate_text"]["inputs"]
    assert inputs["prime"]["dtype"] == "DT_STRING" and inputs["seed"]["dtype"] == "DT_INT64"
    assert [d["size"] for d in inputs["h_0"]["tensor_shape"]["dim"]] == ["-1", str(lstm.info.state_size)]
    assert signatures["generate_text"]["outputs"]["text"]["dtype"] == "DT_STRING"


def test_predict_row_and_columnar_formats_equal_the_in_process_model(rest, lstm):
    url, _ = rest
    inputs = generate_inputs(lstm, "the ", 30, seed=11, rows=2)
    expected = in_process(lstm, inputs)
    columns = as_json(inputs)

    instances = [{k: v[i] for k, v in columns.items()} for i in range(2)]
    status, answer = http_call(
        f"{url}/v1/models/lstm:predict", {"signature_name": "generate_text", "instances": instances}
    )
    assert status == 200, answer
    rows = answer["predictions"]
    assert [r["text"] for r in rows] == [t.decode() for t in expected["text"]]
    for name in lstm.info.state_names:
        # the server may run the XLA-compiled twin: the same text, states equal to float32 rounding
        np.testing.assert_allclose(np.array([r[name] for r in rows], np.float32), expected[name], atol=1e-5)

    status, answer = http_call(
        f"{url}/v1/models/lstm/versions/1:predict", {"signature_name": "generate_text", "inputs": columns}
    )
    assert status == 200, answer
    assert answer["outputs"]["text"] == [t.decode() for t in expected["text"]]
    for name in lstm.info.state_names:
        np.testing.assert_allclose(np.array(answer["outputs"][name], np.float32), expected[name], atol=1e-5)


def test_binary_strings_travel_as_b64_objects(rest, lstm):
    url, _ = rest
    arrays = generate_inputs(lstm, "a lazy ", 20, seed=4)
    inputs = {**as_json(arrays), "prime": [{"b64": base64.b64encode(b"a lazy ").decode()}]}
    status, answer = http_call(f"{url}/v1/models/lstm:predict", {"signature_name": "generate_text", "inputs": inputs})
    assert status == 200, answer
    assert answer["outputs"]["text"] == [in_process(lstm, arrays)["text"][0].decode()]
    inputs["prime"] = [{"b64": "not base64!"}]
    status, answer = http_call(f"{url}/v1/models/lstm:predict", {"signature_name": "generate_text", "inputs": inputs})
    assert status == 400 and "base64" in answer["error"]


def test_metadata_signature_answers_the_vocabulary_in_columnar_format(rest, lstm):
    url, _ = rest
    status, answer = http_call(f"{url}/v1/models/lstm:predict", {"signature_name": "metadata", "inputs": {}})
    assert status == 200, answer
    expected = {k: v.numpy() for k, v in lstm.signatures["metadata"]().items()}
    assert answer["outputs"]["vocabulary"] == [c.decode() for c in expected["vocabulary"]]
    assert answer["outputs"]["config"] == expected["config"].decode()


def test_a_text_continued_over_rest_by_passing_the_states_back_equals_the_in_process_session(rest, lstm):
    url, _ = rest
    prime, n, seed = "the quick ", 25, 7
    states = {name: [[0.0] * lstm.info.state_size] for name in lstm.info.state_names}
    pending, position, text = prime, 0, ""
    for _ in range(3):  # what the README's curl example does
        body = {
            "signature_name": "generate_text",
            "inputs": {
                "prime": [pending],
                **states,
                "num_chars": [n],
                "temperature": [SAMPLING["temperature"]],
                "top_k": [SAMPLING["top_k"]],
                "top_p": [SAMPLING["top_p"]],
                "seed": [seed],
                "position": [position],
            },
        }
        status, answer = http_call(f"{url}/v1/models/lstm/versions/1:predict", body)
        assert status == 200, answer
        chunk = answer["outputs"]["text"][0]
        states = {name: answer["outputs"][name] for name in lstm.info.state_names}
        pending, position, text = chunk[-1], position + n, text + chunk
    session = lstm.session(prime, seed=seed, **SAMPLING)
    assert text == "".join(session.generate(n) for _ in range(3))


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
def test_readme_curl_example_continues_the_text_as_the_in_process_session_does(rest, lstm, tmp_path):
    url, _ = rest
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## REST API, playground and metrics\n", 1)[1].split("\n## ", 1)[0]
    script = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "for call" in b)
    script = (
        script.replace("localhost:8501", url.removeprefix("http://"))
        .replace("shakespeare", "lstm")
        .replace("range(512)", f"range({lstm.info.state_size})")
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    session = lstm.session("ROMEO:", seed=1, **SAMPLING)
    assert result.stdout == "".join(session.generate(100) for _ in range(3))


def test_rest_and_grpc_refuse_a_request_with_the_same_message(rest, lstm):
    url, grpc_port = rest
    inputs = generate_inputs(lstm, "the ", 501, seed=1)  # over --max_chars_per_call 500
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "lstm", "generate_text"
    for k, v in inputs.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body = {"signature_name": "generate_text", "inputs": as_json(inputs)}
    assert http_call(f"{url}/v1/models/lstm:predict", body) == (400, {"error": caught.value.details()})


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("lstm:predict", b"{not json", 400, "JSON Parse error"),
        ("lstm:predict", [1, 2], 400, "Is not object"),
        ("lstm:predict", {"instances": [{"ids": [[1]]}], "inputs": {}}, 400, "exactly one of"),
        ("lstm:predict", {"signature_name": "nope", "inputs": {}}, 400, 'signature name: "nope" not found'),
        ("lstm:predict", {"signature_name": "step", "inputs": {"ids": [[1]]}}, 400, "missing named input"),
        ("lstm:predict", {"signature_name": "step", "inputs": {"ids": [[1]], "idz": [1]}}, 400, "unexpected input"),
        ("lstm:predict", {"signature_name": "step", "instances": [[1]]}, 400, "give a list of objects"),
        (
            "lstm:predict",
            b'{"signature_name": "step", "inputs": {"ids": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}}",
            400,
            "nested deeper",
        ),
        ("nosuchmodel:predict", {"inputs": {}}, 404, "nosuchmodel"),
        ("lstm/versions/9:predict", {"inputs": {}}, 404, "lstm"),
        ("lstm:classify", {"examples": []}, 501, "classify"),
        ("lstm:explain", {"inputs": {}}, 400, "Malformed request"),
    ],
)
def test_bad_requests_get_a_json_error_with_tf_serving_http_status(rest, path, body, status, message):
    url, _ = rest
    got_status, answer = http_call(f"{url}/v1/models/{path}", body, method="POST")
    assert got_status == status and message in answer["error"], answer


def test_tensor_values_are_checked_against_the_signature(rest, lstm):
    url, _ = rest
    zero = {name: [[0.0] * lstm.info.state_size] for name in lstm.info.state_names}
    cases = [
        ({"ids": [[1.5]]}, "not of expected type int32"),
        ({"ids": [[True]]}, "not of expected type int32"),
        ({"ids": [[2**40]]}, "not of expected type int32"),
        ({"ids": [[1, 2], [3]]}, "not a dense tensor"),
        ({"ids": [1, [2]]}, "not a dense tensor"),
        ({"ids": [[1]], "h_0": [[0.0]]}, "expects shape"),
    ]
    for change, message in cases:
        status, answer = http_call(
            f"{url}/v1/models/lstm:predict", {"signature_name": "step", "inputs": {**zero, **change}}
        )
        assert status == 400 and message in answer["error"], (change, answer)
    status, answer = http_call(
        f"{url}/v1/models/lstm:predict", {"signature_name": "step", "inputs": {**zero, "ids": [[1, 2]]}}
    )
    assert status == 200 and np.array(answer["outputs"]["logits"]).shape == (1, 2, lstm.vocab.size)


def test_oversized_deeply_nested_and_chunked_bodies_are_refused_before_reading(rest):
    url, _ = rest
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/models/lstm:predict")
    connection.putheader("Content-Length", str(10**9))  # and no body follows
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    connection.close()

    # Sent in one piece: http.client sends a chunked body's last chunk after the server may have answered
    # 411 and closed the connection (a broken pipe in the client, not a wrong answer).
    status, answer = raw_http(
        url,
        b"POST /v1/models/lstm:predict HTTP/1.1\r\nHost: x\r\n"
        b'Transfer-Encoding: chunked\r\n\r\ne\r\n{"inputs": {}}\r\n0\r\n\r\n',
    )
    assert status == 411 and "Content-Length" in answer["error"]

    deep = b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    status, answer = http_call(f"{url}/v1/models/lstm:predict", deep)
    assert status == 400 and "JSON" in answer["error"]


def raw_http(url: str, request: bytes) -> tuple[int, dict]:
    """Sends ``request`` byte for byte on a fresh socket; returns the status and the JSON answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), reply  # an answer, not a dropped connection
    return int(head.split()[1]), json.loads(body)


def test_a_content_length_of_unicode_digits_is_refused_with_400(rest):
    url, _ = rest
    status, answer = raw_http(
        url, b"POST /v1/models/lstm:predict HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\nConnection: close\r\n\r\n{}"
    )  # latin-1 "²"
    assert status == 400 and "Content-Length" in answer["error"], answer


@pytest.mark.parametrize("version", [b"\xb2", b"\xb9", b"9" * 20])  # latin-1 "²" and "¹"; over int64
def test_a_version_that_is_not_an_int64_of_ascii_digits_is_a_malformed_request(rest, version):
    url, _ = rest
    status, answer = raw_http(
        url, b"GET /v1/models/lstm/versions/" + version + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 400 and "Malformed request" in answer["error"], answer


def test_unknown_pages_answer_404_and_metrics_are_off_without_a_monitoring_config(rest):
    url, _ = rest
    assert http_call(f"{url}/nothing/here")[0] == 404
    assert http_call(f"{url}/monitoring/prometheus/metrics")[0] == 404


@pytest.mark.parametrize(
    "code, status",
    [
        ("INVALID_ARGUMENT", 400),
        ("FAILED_PRECONDITION", 400),
        ("NOT_FOUND", 404),
        ("RESOURCE_EXHAUSTED", 429),
        ("UNAVAILABLE", 503),
        ("DEADLINE_EXCEEDED", 504),
        ("INTERNAL", 500),
        ("DATA_LOSS", 500),
    ],
)
def test_each_error_code_maps_to_tf_serving_http_status(code, status):
    reply = error_reply(ServingError(code, "why"))
    assert reply.status == status and json.loads(reply.body) == {"error": "why"}


# ----- the playground ---------------------------------------------------------------------


def _playground_dom(url: str, tmp_path, query: str, timeout: float = 180.0) -> str:
    """The playground's DOM once its ``auto=N`` presses are done: headless Chromium driven over
    ``--remote-debugging-pipe`` (``--virtual-time-budget`` does not wait for a streamed body: its clock runs on
    once a reply's headers are in, so a ``:stream`` answer would be dumped unread)."""
    chrome_reads, to_chrome = os.pipe()
    from_chrome, chrome_writes = os.pipe()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--remote-debugging-pipe",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ]
    proc = subprocess.Popen(  # the DevTools pipe is fd 3 (commands in) and fd 4 (answers out) of Chromium
        ["bash", "-c", f'exec "$0" "$@" 3<&{chrome_reads} 4>&{chrome_writes}', CHROMIUM, *flags, "about:blank"],
        pass_fds=(chrome_reads, chrome_writes),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(chrome_reads)
    os.close(chrome_writes)
    received = b""
    counter = iter(range(1, 1 << 30))

    def command(method: str, session: str | None = None, **params):
        nonlocal received
        message = {
            "id": next(counter),
            "method": method,
            "params": params,
            **({"sessionId": session} if session else {}),
        }
        os.write(to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in received:
                chunk = os.read(from_chrome, 1 << 16)
                assert chunk, "Chromium closed its DevTools pipe"
                received += chunk
            raw, received = received.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == message["id"]:
                assert "error" not in answer, answer
                return answer["result"]

    def evaluate(session: str, expression: str):
        return command("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    try:
        target = command("Target.createTarget", url=f"{url}/playground?{query}")["targetId"]
        session = command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        presses = re.search(r"(?:^|&)auto=(\d+)", query).group(1)
        deadline = time.monotonic() + timeout
        while evaluate(session, "document.body ? document.body.dataset.autoDone || '' : ''") != presses:
            assert time.monotonic() < deadline, f"the playground did not finish its {presses} presses"
            time.sleep(0.1)
        return evaluate(session, "document.documentElement.outerHTML")
    finally:
        try:
            command("Browser.close")
        except (AssertionError, OSError):
            pass
        os.close(to_chrome)
        os.close(from_chrome)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _element_text(dom: str, element_id: str) -> str:
    match = re.search(rf'<(\w+) id="{element_id}"[^>]*>(.*?)</\1>', dom, re.S)
    assert match, f"no #{element_id} in the page"
    return html.unescape(match.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_playground_continue_grows_the_text_as_the_in_process_session_does(rest, lstm, tmp_path):
    url, _ = rest
    n = 150  # three segments of a :stream call (32 + 64 + 54 characters), each shown as it arrives
    query = f"model=lstm&prime=the%20lazy%20&seed=5&temperature=0.8&top_k=0&top_p=1&num_chars={n}"
    once = _playground_dom(url, tmp_path, query + "&auto=1")
    twice = _playground_dom(url, tmp_path, query + "&auto=2")
    assert 'data-auto-done="2"' in twice and _element_text(twice, "error") == ""
    first, second = _element_text(once, "generated"), _element_text(twice, "generated")
    assert len(first) == n and len(second) == 2 * n and second.startswith(first)
    session = lstm.session("the lazy ", seed=5, **SAMPLING)
    calls = [session.complete(n), session.complete(n)]  # the second call continues the first's states
    assert second == calls[0].text + calls[1].text
    segments, done = 0, 0  # the stream's segments: DEFAULT_STREAM_SEGMENT characters, then twice the last ... 256
    while done < n:
        done, segments = done + min(DEFAULT_STREAM_SEGMENT << segments, 256), segments + 1
    assert _calls(twice) == [(c.finish_reason, "stream", segments) for c in calls]
    assert _element_text(twice, "prime-text") == "the lazy "
    info = _element_text(twice, "info")
    assert "lstm version 1" in info and f"position {2 * n}" in info and "seed 5" in info
    assert "http://" not in twice and "https://" not in twice  # the page loads nothing from elsewhere


def _calls(dom: str) -> list[tuple[str, str, int]]:
    """The playground's list of calls: (finish reason, transport, segments) of each."""
    found = re.findall(r'<li data-finish-reason="(\w+)" data-transport="(\w+)" data-segments="(\d+)"', dom)
    return [(reason, transport, int(segments)) for reason, transport, segments in found]


class _Proxy(ThreadingHTTPServer):
    """An HTTP front for the REST port that has no ``:stream`` (answers ``missing``, 404 or 501) or, with
    ``missing=None``, breaks the first stream after its first event."""

    daemon_threads = True

    def __init__(self, upstream: str, missing: int | None):
        self.upstream = upstream.removeprefix("http://")
        self.missing = missing
        self.streams = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Proxy

    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        pass

    def do_GET(self):  # noqa: N802  (the base class's name)
        self._forward()

    def do_POST(self):  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        stream = self.path.endswith(":stream")
        if stream and self.server.missing:
            self._reply(self.server.missing, "application/json", b'{"error": "no :stream here"}')
            return
        connection = http.client.HTTPConnection(self.server.upstream, timeout=120)
        connection.request(self.command, self.path, body or None, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        data = reply.read()
        connection.close()
        self.server.streams += stream
        if stream and self.server.streams == 1:  # the first stream breaks after one segment: no done event
            self.close_connection = True
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.getheader("Content-Type"))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data.split(b"\n\n", 1)[0] + b"\n\n")
            return
        self._reply(reply.status, reply.getheader("Content-Type"), data)

    def _reply(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def proxy(rest, request):
    url, _ = rest
    server = _Proxy(url, request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
@pytest.mark.parametrize("proxy", [404, 501], indirect=True)
def test_playground_without_a_stream_continues_over_predict_with_the_same_text(proxy, lstm, tmp_path):
    query = "model=lstm&prime=the%20lazy%20&seed=5&temperature=0.8&top_k=0&top_p=1&num_chars=100&auto=2"
    dom = _playground_dom(proxy[0], tmp_path, query)
    assert _element_text(dom, "error") == ""
    session = lstm.session("the lazy ", seed=5, **SAMPLING)
    calls = [session.complete(100), session.complete(100)]
    assert _element_text(dom, "generated") == calls[0].text + calls[1].text
    assert _calls(dom) == [(c.finish_reason, "predict", 1) for c in calls]  # the second call asks :predict alone


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
@pytest.mark.parametrize("proxy", [None], indirect=True)
def test_playground_resumes_a_broken_stream_from_its_last_segment(proxy, lstm, tmp_path):
    url, server = proxy
    n = 150
    query = f"model=lstm&prime=the%20lazy%20&seed=5&temperature=0.8&top_k=0&top_p=1&num_chars={n}"
    broken = _playground_dom(url, tmp_path, query + "&auto=1")  # the stream ends after its first segment
    assert _element_text(broken, "error") == "the stream ended before its last event"
    assert _calls(broken) == [("interrupted", "stream", 1)]
    server.streams = 0
    resumed = _playground_dom(url, tmp_path, query + "&auto=2")  # broken, then continued from its last segment
    assert _element_text(resumed, "error") == ""
    session = lstm.session("the lazy ", seed=5, **SAMPLING)
    calls = [session.complete(DEFAULT_STREAM_SEGMENT), session.complete(n)]
    assert _element_text(broken, "generated") == calls[0].text
    assert _element_text(resumed, "generated") == calls[0].text + calls[1].text
    assert _calls(resumed) == [("interrupted", "stream", 1), (calls[1].finish_reason, "stream", 3)]
    assert f"position {DEFAULT_STREAM_SEGMENT + n}" in _element_text(resumed, "info")


def test_the_playground_reads_its_inputs_from_the_generation_table_not_from_a_list_of_its_own():
    from keras_charrnn import generation
    from keras_charrnn.serving.rest import playground_page

    page = playground_page(["lstm"], 500).decode("utf-8")
    settings = json.loads(re.search(r"const SETTINGS = (\{.*?\});\n", page).group(1))
    assert settings["schema"] == json.loads(generation.schema_json()) and settings["maxCharsPerCall"] == 500
    assert "SAMPLING_INPUTS" not in page and "config.state_names" in page  # states by name, never by exclusion
    script = page.split("const SCHEMA", 1)[1]
    for name in ("temperature", "top_k", "top_p", "min_p", "min_chars", "position", "stop_tail"):
        assert name not in script  # fields, defaults and carry rules of these come from the table alone


def _marks(dom: str) -> list[tuple[str, float, str]]:
    """The scored characters of the playground's text: (character, its data-logprob, its title)."""
    marks = []
    for attributes, char in re.findall(r"<mark([^>]*)>(.*?)</mark>", dom, re.S):
        logprob = float(re.search(r'data-logprob="([^"]+)"', attributes).group(1))
        marks.append((html.unescape(char), logprob, html.unescape(re.search(r'title="([^"]*)"', attributes).group(1))))
    return marks


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_playground_stops_shows_finish_reasons_and_shades_characters_by_their_scores(rest, lstm, tmp_path):
    url, _ = rest
    stops = [" a", "s\n"]  # typed one per line, the newline as the escape \n
    query = "model=lstm&prime=the%20&seed=7&num_chars=120&stop=%20a%0As%5Cn&logprobs=2&auto=2"
    dom = _playground_dom(url, tmp_path, query)
    assert 'data-auto-done="2"' in dom and _element_text(dom, "error") == ""
    session = lstm.session("the ", seed=7, stop=stops, **SAMPLING)
    calls = [session.complete(120, logprobs=2), session.complete(120, logprobs=2)]
    assert calls[0].finish_reason == "stop"  # the stops occur: each call ends at one
    reasons = re.findall(r'<li data-finish-reason="(\w+)"[^>]*>(.*?)</li>', dom)
    assert [r for r, _ in reasons] == [c.finish_reason for c in calls]
    assert reasons[0][1] == f"stop at {json.dumps(calls[0].stop)} after {calls[0].num_chars} characters"
    marks = _marks(dom)
    assert "".join(char for char, _, _ in marks) == calls[0].text + calls[1].text
    assert [lp for _, lp, _ in marks] == pytest.approx(calls[0].logprobs + calls[1].logprobs, abs=1e-5)
    top = calls[0].top_logprobs[0]
    likeliest = ", ".join(f"{json.dumps(c)} {math.exp(v):.3f}" for c, v in top.items())
    assert marks[0][2].endswith(f"likeliest: {likeliest}")  # the alternatives on hover
    assert "generate_text_v2" in _element_text(dom, "info")
    assert [transport for _, transport, _ in _calls(dom)] == ["stream", "stream"]  # marks came segment by segment


@pytest.fixture(scope="module")
def in_process_api(model_base):
    """The REST API and the gRPC servicer over one manager in this process (no HTTP, no subprocess)."""
    from keras_charrnn.serving.config_files import single_model_config
    from keras_charrnn.serving.manager import ModelManager
    from keras_charrnn.serving.rest import RestApi
    from keras_charrnn.serving.servicers import ModelStatusServicer, PredictionServicer

    manager = ModelManager(single_model_config("lstm", str(model_base / "lstm")), poll_seconds=0)
    manager.start()
    prediction = PredictionServicer(manager, None, ServingLimits(max_rows_per_call=2))
    yield RestApi(prediction, ModelStatusServicer(manager)), prediction
    manager.stop()


def test_rest_predict_resolves_once_and_runs_on_arrays_without_tensor_protos(in_process_api, lstm, monitor_calls):
    api, prediction = in_process_api
    inputs = generate_inputs(lstm, "the ", 20, seed=3)
    resolves, lookups = monitor_calls
    reply = api.handle(
        "POST",
        "/v1/models/lstm:predict",
        json.dumps({"signature_name": "generate_text", "inputs": as_json(inputs)}).encode(),
    )
    assert reply.status == 200, reply.body
    assert (len(resolves), len(lookups)) == (1, 1)  # one resolve, one signature lookup per call
    assert json.loads(reply.body)["outputs"]["text"] == [in_process(lstm, inputs)["text"][0].decode()]


@pytest.fixture
def monitor_calls(in_process_api, monkeypatch):
    """Records the manager's resolves and the signature lookups; TensorProto conversions fail the test."""
    from keras_charrnn.serving import servicers, signature_runner
    from keras_charrnn.serving.version_loader import LoadedVersion

    _, prediction = in_process_api
    resolves, lookups = [], []
    resolve, lookup = prediction.manager.resolve, LoadedVersion.signature
    monkeypatch.setattr(prediction.manager, "resolve", lambda *a: resolves.append(a) or resolve(*a))
    monkeypatch.setattr(LoadedVersion, "signature", lambda self, name: lookups.append(name) or lookup(self, name))

    def no_protos(*args, **kwargs):
        raise AssertionError("a REST call went through a TensorProto")

    for module in (servicers.wire, signature_runner.wire):
        monkeypatch.setattr(module, "to_tensor_proto", no_protos)
        monkeypatch.setattr(module, "from_tensor_proto", no_protos)
    return resolves, lookups


def test_grpc_predict_looks_the_signature_up_once_per_call(in_process_api, lstm, monkeypatch):
    from keras_charrnn.serving.version_loader import LoadedVersion

    _, prediction = in_process_api
    lookups = []
    lookup = LoadedVersion.signature
    monkeypatch.setattr(LoadedVersion, "signature", lambda self, name: lookups.append(name) or lookup(self, name))
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "lstm", "generate_text"
    for key, value in generate_inputs(lstm, "the ", 300, seed=3).items():  # over SEGMENT_CHARS: two segments
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    prediction.predict(request)
    assert lookups == ["generate_text"]


def test_rest_and_grpc_predicts_refuse_with_one_message_naming_the_setting_not_a_flag(in_process_api, lstm):
    api, prediction = in_process_api
    inputs = generate_inputs(lstm, "the ", 5, seed=1, rows=3)  # over max_rows_per_call=2
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "lstm", "generate_text"
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    with pytest.raises(ServingError) as grpc_refusal:
        prediction.predict(request)
    reply = api.handle(
        "POST",
        "/v1/models/lstm:predict",
        json.dumps({"signature_name": "generate_text", "inputs": as_json(inputs)}).encode(),
    )
    assert reply.status == 400 and json.loads(reply.body)["error"] == grpc_refusal.value.message
    assert grpc_refusal.value.setting == "max_rows_per_call" and "max_rows_per_call=2" in grpc_refusal.value.message
    assert "charrnn" not in grpc_refusal.value.message and "--" not in grpc_refusal.value.message
    body = json.dumps({"signature_name": "generate_text", "inputs": as_json(inputs)}).encode()
    named = _api_naming_flags(prediction).handle("POST", "/v1/models/lstm:predict", body)
    assert json.loads(named.body)["error"].endswith("(set by charrnn serve --max_rows_per_call)")


def _api_naming_flags(prediction):
    """The REST API as ``charrnn serve`` runs it: errors caused by a setting name its flag."""
    from keras_charrnn.serving.rest import RestApi
    from keras_charrnn.serving.servicers import ModelStatusServicer

    return RestApi(prediction, ModelStatusServicer(prediction.manager), name_setting=lambda s: f"charrnn serve --{s}")
