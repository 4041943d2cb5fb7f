"""Streaming generation over gRPC (``GenerationStream``) and SSE: equal to unary calls, resumable, cancellable,
bounded; against real server processes."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from servers import ServerProcess, free_ports

from keras_charrnn.serving import stream_client, streaming, wire
from keras_charrnn.serving.client import SamplingClient

MODEL = "lstm"
PRIME = "the "


@pytest.fixture(scope="module")
def stream_server(model_base):
    """A server with batching, the REST port and at most two streams open at once; debug logs."""
    (rest,) = free_ports(1)
    args = ["--model_name", MODEL, "--model_base_path", model_base / MODEL, "--enable_batching"]
    with ServerProcess([*args, "--rest_api_port", rest, "--max_concurrent_streams", 2], debug=True) as process:
        process.rest_port = rest
        yield process


def _columnar(row: dict) -> dict:
    """A session's request row as a ``:predict``/``:stream`` JSON body (columnar format)."""

    def jsonable(value):
        return value.astype(str).tolist() if value.dtype == object else value.tolist()

    decoded = {
        k: np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(v) if v.dtype == object and v.size else v
        for k, v in row.items()
    }
    return {"signature_name": "generate_text_v2", "inputs": {k: jsonable(v) for k, v in decoded.items()}}


def _session(client, **params):
    return client.session(MODEL, PRIME, seed=3, temperature=1.0, **params)


def _states(session):
    return {k: v.copy() for k, v in session.states.items()}


@pytest.mark.parametrize("batching", [True, False])
def test_a_stream_equals_the_unary_call_byte_for_byte_and_its_segments_grow_from_the_chunk(
    request, stream_server, server, batching
):
    port = stream_server.port if batching else server
    with SamplingClient(f"127.0.0.1:{port}") as client:
        assert client.model_info(MODEL).limits.get("max_concurrent_streams", 0) > 0
        free = _session(client).generate(900)
        stop = free[700:703]
        unary = _session(client, stop=stop)
        whole = unary.complete(900, logprobs=2)  # one call: the server runs it in segments of 256
        assert whole.finish_reason == "stop" and free.startswith(whole.text) and len(whole.text) > 600
        for chunk in (1, 7, 64):
            streamed = _session(client, stop=stop)
            pieces = list(streamed.stream_completions(900, chunk, logprobs=2))
            sizes = [min(chunk << k, max(256, chunk)) for k in range(len(pieces))]  # chunk, twice the last, ... 256
            assert [p.num_chars for p in pieces[:-1]] == sizes[:-1] and pieces[-1].num_chars <= sizes[-1]
            assert "".join(p.text for p in pieces) == whole.text
            assert (streamed.last.finish_reason, streamed.last.stop) == ("stop", stop)
            assert [v for p in pieces for v in p.logprobs] == whole.logprobs
            assert [v for p in pieces for v in p.top_logprobs] == whole.top_logprobs
            assert (streamed.position, streamed.pending, streamed.tail) == (unary.position, unary.pending, unary.tail)
            for name, value in _states(unary).items():
                assert np.array_equal(streamed.states[name], value), (chunk, name)


def test_sse_streams_the_segments_and_a_done_event_equal_to_the_grpc_stream(stream_server):
    with SamplingClient(f"127.0.0.1:{stream_server.port}") as client:
        session = _session(client, stop="zq")
        row = session._row(300, 1)
        grpc_segments = list(
            stream_client.stream_predict(client, MODEL, "generate_text_v2", row, None, streaming.DEFAULT_STREAM_SEGMENT)
        )
    body = _columnar(row)
    connection = http.client.HTTPConnection("127.0.0.1", stream_server.rest_port, timeout=60)
    connection.request("POST", f"/v1/models/{MODEL}:stream", json.dumps(body), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.getheader("Content-Type") == "text/event-stream"
    events = re.findall(r"event: (\w+)\ndata: (.*)\n\n", reply.read().decode("utf-8"))
    assert [e for e, _ in events] == ["segment"] * len(grpc_segments) + ["done"]
    for (_, data), (outputs, _) in zip(events, grpc_segments):
        got = json.loads(data)["outputs"]
        assert got["text"] == [t.decode() for t in outputs["text"]]
        assert got["char_logprobs"] == outputs["char_logprobs"].tolist()
        assert got["position"] == outputs["position"].tolist()
    done = json.loads(events[-1][1])["outputs"]
    last = grpc_segments[-1][0]
    assert done["finish_reason"] == ["length"] and done["num_generated"] == [300] and done["position"] == [300]
    for name in ("h_0", "c_0", "h_1", "c_1"):
        assert np.array_equal(np.array(done[name], np.float32), last[name]), name


def test_sse_errors_before_the_first_event_are_plain_replies_with_their_status(stream_server):
    connection = http.client.HTTPConnection("127.0.0.1", stream_server.rest_port, timeout=60)
    body = {"signature_name": "generate_text_v2", "instances": [{"prime": "x", "num_chars": 5}]}
    connection.request("POST", f"/v1/models/{MODEL}:stream", json.dumps(body), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 400 and "error" in json.loads(reply.read())


def test_a_replica_killed_mid_stream_and_the_session_finishing_on_another_gives_the_same_text(model_base, caplog):
    args = ["--model_name", MODEL, "--model_base_path", model_base / MODEL]
    with ServerProcess(args) as a, ServerProcess(args) as b:
        with SamplingClient(f"127.0.0.1:{b.port}") as one:
            expected = _session(one).generate(3000)
        with SamplingClient([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], retries=8) as client:
            session = _session(client)
            client._next = 0  # the stream's replica is the first (a), the one killed
            pieces = []
            for piece in session.stream(3000, chunk=16):
                pieces.append(piece)
                if len(pieces) == 3:
                    a.proc.send_signal(signal.SIGKILL)
            assert "".join(pieces) == expected
    assert any("the stream broke" in r.getMessage() for r in caplog.records)


def _raw_stream(port, row, segment, signature="generate_text_v2"):
    request = wire.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    for key, value in row.items():
        wire.to_tensor_proto(value, request.inputs[key])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = channel.unary_stream(
        streaming.PATH,
        request_serializer=wire.PredictRequest.SerializeToString,
        response_deserializer=wire.PredictResponse.FromString,
    )
    return channel, stub(request, metadata=((streaming.SEGMENT_HEADER, str(segment)),), timeout=120)


def _segments_logged(server):
    return len(server.log_matches(r"stream of model lstm: segment"))


def test_a_cancelled_stream_stops_the_server_work_and_a_slow_reader_holds_it_bounded(stream_server):
    with SamplingClient(f"127.0.0.1:{stream_server.port}") as client:
        rows = [_session(client)._row(4096, 10) for _ in range(64)]  # ten alternatives a character: ~30 MB in all
    row = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    segments, done = 0, 0  # the stream's segments: 1, 2, 4, ... 256, 256, ... characters
    while done < 4096:
        done, segments = done + min(1 << segments, 256), segments + 1
    before = _segments_logged(stream_server)
    channel, call = _raw_stream(stream_server.port, row, 1)
    next(call)
    time.sleep(4)
    held = _segments_logged(stream_server) - before
    time.sleep(2)
    assert _segments_logged(stream_server) - before == held < segments, "a reader that stops reading stops the work"
    call.cancel()
    stream_server.wait_for_log(r"stream of model lstm: stopped, its caller went away", timeout=30)
    channel.close()


def test_a_disconnected_sse_client_stops_the_server_work(stream_server):
    with SamplingClient(f"127.0.0.1:{stream_server.port}") as client:
        row = _session(client)._row(4096, -1)
    body = _columnar(row)
    before = len(stream_server.log_matches(r"caller went away"))
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", stream_server.rest_port), timeout=60) as sock:
        sock.sendall(
            f"POST /v1/models/{MODEL}:stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert b"event: segment" in sock.recv(65536) + sock.recv(65536)  # the work is under way
    deadline = time.monotonic() + 30
    while len(stream_server.log_matches(r"caller went away|left a stream")) <= before:
        assert time.monotonic() < deadline, "the server went on generating for a client that left"
        time.sleep(0.2)


def test_streams_over_the_cap_are_refused_with_resource_exhausted_and_the_cap_is_advertised(stream_server):
    with SamplingClient(f"127.0.0.1:{stream_server.port}") as client:
        assert client.model_info(MODEL).limits["max_concurrent_streams"] == 2
        row = _session(client)._row(4096, -1)
    opened = [_raw_stream(stream_server.port, row, 1) for _ in range(2)]
    for _, call in opened:
        next(call)
    channel, third = _raw_stream(stream_server.port, row, 1)
    with pytest.raises(grpc.RpcError) as caught:
        next(third)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_streams" in caught.value.details()
    for channel_, call in opened + [(channel, third)]:
        call.cancel()
        channel_.close()


def test_sigterm_ends_open_streams_within_the_drain_period_and_exits_zero(model_base):
    args = ["--model_name", MODEL, "--model_base_path", model_base / MODEL, "--shutdown_grace_seconds", "3"]
    with ServerProcess(args) as server:
        with SamplingClient(f"127.0.0.1:{server.port}") as client:
            row = _session(client)._row(4096, -1)
        channel, call = _raw_stream(server.port, row, 1)
        next(call)
        ended = threading.Event()

        def drain():
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass
            ended.set()

        threading.Thread(target=drain, daemon=True).start()
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        assert ended.wait(10) and time.monotonic() - start < 15
        channel.close()


def test_the_shipped_proto_describes_the_service_the_server_and_the_light_client_use():
    text = streaming.proto_text()
    assert "package keras_charrnn.serving;" in text
    match = re.search(r"service (\w+) \{\s*rpc (\w+)\(([\w.]+)\) returns \(stream ([\w.]+)\);", text)
    assert match and match.groups() == (
        "GenerationStream",
        "StreamPredict",
        "tensorflow.serving.PredictRequest",
        "tensorflow.serving.PredictResponse",
    )
    assert streaming.PATH == stream_client.PATH == "/keras_charrnn.serving.GenerationStream/StreamPredict"
    from google.protobuf import descriptor_pool

    streaming.register_descriptor()
    method = descriptor_pool.Default().FindServiceByName(streaming.SERVICE).methods_by_name["StreamPredict"]
    assert method.server_streaming and not method.client_streaming
    assert method.input_type.full_name == "tensorflow.serving.PredictRequest"
