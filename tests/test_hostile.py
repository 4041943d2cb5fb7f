"""The model server under hostile and unlucky traffic: real gRPC, real server processes.

One shared server (batching on, a long batch timeout so concurrent calls really
share batches, a small cap on concurrent calls) takes every request-level
attack; a second one, started on an empty base path, shows the lifecycle.
"""

import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from keras_charrnn.errors import ServingError
from keras_charrnn.serving import wire
from keras_charrnn.serving.limits import ServingLimits
from keras_charrnn.serving.version_loader import LoadedVersion
from keras_charrnn.serving.request_batcher import Batcher, BatchingOptions
from servers import ServerProcess, poll

BATCH_TIMEOUT_S = 0.3
MAX_CONCURRENT = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained_runs) -> Path:
    """The session's tiny LSTM, exported as BASE/m/1 (warm-up records for batch size 1 only); returns BASE/m/1."""
    from keras_charrnn.export import export_run

    base = tmp_path_factory.mktemp("hostile_models")
    return export_run(trained_runs["lstm"], "m", base, warmup_batch_sizes=(1,))


@pytest.fixture(scope="module")
def model(model_dir):
    from keras_charrnn.inprocess import load

    return load(model_dir)


@pytest.fixture(scope="module")
def hostile(model_dir, tmp_path_factory):
    params = tmp_path_factory.mktemp("batching") / "batching.txt"
    params.write_text(
        f"max_batch_size {{ value: 8 }}\nbatch_timeout_micros {{ value: {int(BATCH_TIMEOUT_S * 1e6)} }}\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 8 }\n"
    )
    with ServerProcess(
        [
            "--model_name",
            "m",
            "--model_base_path",
            model_dir.parent,
            "--enable_batching",
            "--batching_parameters_file",
            params,
            "--grpc_max_threads",
            "8",
            "--max_concurrent_requests",
            str(MAX_CONCURRENT),
        ],
        debug=True,
    ) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        server.stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        server.health = health_pb2_grpc.HealthStub(channel)
        yield server
        channel.close()


def _request(inputs: dict, signature: str = "generate_text") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def _gen(model, prime="the ", n=40, seed=3, temperature=1.0) -> dict:
    return {
        "prime": np.array([prime.encode()], dtype=object),
        **model.zero_state(1),
        "num_chars": np.array([n], np.int32),
        "temperature": np.array([temperature], np.float32),
        "top_k": np.zeros([1], np.int32),
        "top_p": np.ones([1], np.float32),
        "seed": np.array([seed], np.int64),
        "position": np.zeros([1], np.int64),
    }


def _text(response) -> bytes:
    return tf.make_ndarray(response.outputs["text"])[0]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _refused(server, request, timeout=10.0):
    """(code, details, seconds, RSS growth in MB) of a call that must fail."""
    before = _rss_kb(server.proc.pid)
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as raised:
        server.stub.Predict(request, timeout=timeout)
    seconds = time.perf_counter() - started
    return raised.value.code(), raised.value.details(), seconds, (_rss_kb(server.proc.pid) - before) / 1024


def _batches(server) -> list[tuple[int, int]]:
    return [
        (int(m.group(1)), int(m.group(2)))
        for m in server.log_matches(r"ran a batch of (\d+) rows from (\d+) calls .* generate_text")
    ]


def test_a_tiny_request_claiming_a_huge_tensor_is_refused_fast_and_costs_no_memory(hostile, model):
    step = {"ids": np.array([[1, 2]], np.int32), **model.zero_state(1)}
    for claimed in ([1, 300_000_000], [2**40, 2**40], [1, 20_000]):
        request = _request(step, "step")
        ids = request.inputs["ids"]
        ids.ClearField("tensor_content")
        ids.int_val[:] = [5]  # one value "fills" the claimed shape
        del ids.tensor_shape.dim[:]
        for size in claimed:
            ids.tensor_shape.dim.add(size=size)
        assert request.ByteSize() < 1000
        code, details, seconds, grown_mb = _refused(hostile, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert ("max_request_elements" in details or "max_ids_length" in details) and "charrnn serve --" in details
        assert seconds < 1.0 and grown_mb < 20, (seconds, grown_mb)


def test_a_3mb_prime_is_refused_naming_the_limit_and_its_flag(hostile, model):
    request = _request(_gen(model, prime="x" * (3 * 1024 * 1024)))
    code, details, seconds, grown_mb = _refused(hostile, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_prime_chars" in details and "--max_prime_chars" in details, details
    assert seconds < 1.0 and grown_mb < 20, (seconds, grown_mb)


def test_a_negative_dimension_is_invalid_argument(hostile, model):
    request = _request(_gen(model))
    request.inputs["temperature"].tensor_shape.dim[0].size = -1
    code, details, _, _ = _refused(hostile, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "negative" in details, details


def test_a_call_whose_answer_would_be_over_the_message_limit_is_refused_before_it_runs(hostile, model):
    ids = np.ones([1, 16000], np.int32)  # within max_ids_length, but inspect answers ~16000 x (V + 2 x 24) floats x 3
    request = _request({"ids": ids, **model.zero_state(1)}, "inspect")
    code, details, seconds, grown_mb = _refused(hostile, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max_message_bytes" in details, details
    assert seconds < 1.0 and grown_mb < 20


def _alone_and_together(server, honest, hostile_calls):
    """Each honest request's text alone, then all together with the hostile calls (futures)."""
    alone = [_text(server.stub.Predict(r, timeout=30)) for r in honest]
    before = len(_batches(server))
    futures = [server.stub.Predict.future(r, timeout=30) for r in honest]
    bad = [make() for make in hostile_calls]
    together = [_text(f.result()) for f in futures]
    _read_log_so_far(server)
    return alone, together, bad, _batches(server)[before:]


def _read_log_so_far(server) -> None:
    """Waits until the test has read every line the server logged before this call.

    A batch is logged before its callers get their answers, and the log is one pipe:
    once a later call's own log line has arrived, every earlier line has too.
    """
    marker = r"Predict: model m version \d+ signature metadata"
    seen = len(server.log_matches(marker))
    server.stub.Predict(_request({}, "metadata"), timeout=30)
    poll(lambda: len(server.log_matches(marker)) > seen, every=0.02)


def test_a_bad_call_batched_with_honest_ones_leaves_their_text_exactly_as_alone(hostile, model):
    honest = [
        _request(_gen(model, prime=p, seed=s, n=n))
        for s, (p, n) in enumerate([("the ", 40), ("a lazy", 12), ("(", 300)])
    ]
    bad_requests = [
        _request(_gen(model, temperature=-1.0)),
        _request({**_gen(model), "top_p": np.zeros([1], np.float32)}),
    ]
    alone, together, bad, batches = _alone_and_together(
        hostile, honest, [lambda r=r: hostile.stub.Predict.future(r, timeout=30) for r in bad_requests]
    )
    assert together == alone
    for future, fragment in zip(bad, ["temperature", "top_p"]):
        assert future.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in future.exception().details()
    assert max(calls for _, calls in batches) == 3, batches  # the honest calls shared a batch, the bad ones never ran
    # 300 characters ran as two segments, and equal one call of the model in this process.
    local = model.signatures["generate_text"](
        **{k: tf.constant(v) for k, v in _gen(model, prime="(", seed=2, n=300).items()}
    )
    assert alone[2] == local["text"].numpy()[0] and len(alone[2].decode()) == 300


def test_callers_that_give_up_in_the_queue_are_dropped_and_their_neighbours_get_their_text(hostile, model):
    honest = [_request(_gen(model, prime=p, seed=10 + s)) for s, p in enumerate(["seven ", "cats"])]
    quitter = _request(_gen(model, seed=99))
    cancelled = []

    def cancel_soon():
        future = hostile.stub.Predict.future(quitter, timeout=30)
        threading.Timer(0.05, future.cancel).start()
        cancelled.append(future)
        return future

    alone, together, bad, batches = _alone_and_together(
        hostile, honest, [lambda: hostile.stub.Predict.future(quitter, timeout=0.1), cancel_soon]
    )
    assert together == alone
    assert bad[0].exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert bad[1].cancelled()
    assert batches == [(2, 2)], batches  # the two that gave up never ran
    hostile.wait_for_log(r"dropped a call of 1 row\(s\) whose caller had gone", timeout=5)


def test_calls_over_the_concurrency_cap_are_refused_at_once_while_health_and_metadata_answer(hostile, model):
    received = len(hostile.log_matches(r"Predict: model m version 1 signature generate_text"))
    long_calls = [
        hostile.stub.Predict.future(_request(_gen(model, n=4000, seed=s)), timeout=120) for s in range(MAX_CONCURRENT)
    ]
    try:  # all of them are in flight: checked, and generating segment after segment for seconds
        poll(
            lambda: (
                len(hostile.log_matches(r"Predict: model m version 1 signature generate_text"))
                == received + MAX_CONCURRENT
            )
        )
        code, details, seconds, _ = _refused(hostile, _request(_gen(model)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_requests" in details, details
        assert seconds < 1.0
        started = time.perf_counter()
        check = hostile.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING and time.perf_counter() - started < 1.0
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "m"
        metadata = hostile.stub.GetModelMetadata(request, timeout=5)
        limits = struct_pb2.Struct()
        assert metadata.metadata["limits"].Unpack(limits)
        assert dict(limits) == {
            **{k: float(v) for k, v in ServingLimits().advertised().items()},
            "max_message_bytes": 4194304.0,
            "max_concurrent_requests": float(MAX_CONCURRENT),
            "max_concurrent_streams": 16.0,
            "segment_chars": 256.0,
        }
        assert all(not f.done() for f in long_calls)
    finally:
        for future in long_calls:
            future.cancel()
    # Their work stops at the next segment, and the cap frees up.
    poll(lambda: len(hostile.log_matches(r"stopped a .*caller went away")) >= MAX_CONCURRENT, timeout=10)
    poll(lambda: _try_predict(hostile, model))


def _try_predict(server, model) -> bool:
    try:
        return bool(server.stub.Predict(_request(_gen(model, n=2)), timeout=10).outputs)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False


# ----- lifecycle ------------------------------------------------------------------------------


def _copy_slowly(source: Path, target: Path, pause: float = 0.4) -> None:
    """Copies a version folder file by file, as a plain cp into the base path does, with pauses."""
    target.mkdir()
    time.sleep(pause)
    for path in sorted(source.rglob("*"), key=lambda p: (p.name != "saved_model.pb", str(p))):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
        time.sleep(pause)


def test_health_follows_versions_as_they_arrive_and_a_corrupt_version_never_replaces_a_good_one(model_dir, tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    with ServerProcess(
        ["--model_name", "m", "--model_base_path", base, "--file_system_poll_wait_seconds", "0.2"], debug=True
    ) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        health = health_pb2_grpc.HealthStub(channel)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        status_stub = model_service_pb2_grpc.ModelServiceStub(channel)

        def health_of(service):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        def served_version():
            return stub.Predict(_request({}, "metadata"), timeout=10).model_spec.version.value

        SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_of("") == NOT_SERVING and health_of("m") == NOT_SERVING
        _copy_slowly(model_dir, base / "1")  # not atomic: an empty folder first, then file by file
        poll(
            lambda: (
                health_of("") == SERVING
                and health_of("m") == SERVING
                and health_of("tensorflow.serving.PredictionService") == SERVING
            )
        )
        assert served_version() == 1

        (tmp_path / "staging").mkdir()
        (tmp_path / "staging" / "saved_model.pb").write_bytes(b"corrupt: not a SavedModel")
        (tmp_path / "staging").rename(base / "2")  # this one arrives whole
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "m"
        statuses = poll(
            lambda: (
                {s.version: s for s in status_stub.GetModelStatus(request).model_version_status}
                if server.log_matches(r"refused version 2")
                else None
            )
        )
        assert statuses[2].state == ModelVersionStatus.END and statuses[2].status.error_message
        assert str(tmp_path) not in statuses[2].status.error_message  # no server path reaches clients
        assert statuses[1].state == ModelVersionStatus.AVAILABLE
        polls = len(server.log_matches(r"version poll done"))
        poll(lambda: len(server.log_matches(r"version poll done")) >= polls + 5)  # polls go on ...
        assert len(server.log_matches(r"refused version 2")) == 1  # ... and never try the unchanged corrupt version
        assert served_version() == 1 and health_of("") == SERVING

        (base / "2" / "saved_model.pb").unlink()
        for path in sorted(model_dir.rglob("*")):  # fixed in place, file by file
            destination = base / "2" / path.relative_to(model_dir)
            if path.is_dir():
                destination.mkdir(exist_ok=True)
            else:
                shutil.copyfile(path, destination)
        poll(lambda: served_version() == 2, timeout=60, every=0.3)
        assert health_of("m") == SERVING
        poll(lambda: server.log_matches(r"unloaded version 1"))
    assert server.proc.returncode == 0


# ----- the batcher and the wire on their own (no server process) --------------------------------


def test_a_busy_group_never_holds_another_group_past_its_timeout_plus_one_batch_run():
    run_seconds = 0.15
    runs: list[tuple[str, float]] = []  # (group, start), in the order the one batch thread ran them

    def slow_run(loaded, signature, inputs):
        runs.append((signature, time.monotonic()))
        time.sleep(run_seconds)
        return {"y": inputs["x"]}

    batcher = Batcher(
        slow_run,
        BatchingOptions(max_batch_size=2, batch_timeout_micros=20_000, num_batch_threads=1, max_enqueued_batches=100),
    )
    target = LoadedVersion("m", 1, None, None, {})
    busy = [batcher.submit(target, "busy", {"x": np.ones([2, 1])}) for _ in range(20)]  # always a full batch ready
    time.sleep(0.05)
    started = time.monotonic()
    other = batcher.submit(target, "other", {"x": np.ones([1, 1])})
    other.result(10)
    # Ordering, not wall time (the machine may be loaded): once "other" was queued, at most one busy
    # batch began (while its 20 ms timeout ran), besides the one already running; then "other" ran.
    other_start = next(start for group, start in runs if group == "other")
    assert sum(1 for group, start in runs if group == "busy" and started < start < other_start) <= 1, runs
    assert not all(f.done() for f in busy)  # the busy group was still busy
    for f in busy:
        f.result(10)
    batcher.close()
    assert batcher._queues == {} and batcher._targets == {}  # empty groups are forgotten


def test_a_cancelled_call_is_left_out_of_its_batch_and_the_others_get_their_rows():
    def run(loaded, signature, inputs):
        return {"y": inputs["x"] * 2}

    batcher = Batcher(run, BatchingOptions(max_batch_size=8, batch_timeout_micros=200_000, num_batch_threads=1))
    target = LoadedVersion("m", 1, None, None, {})
    gone = threading.Event()
    calls = [
        batcher.submit(
            target, "s", {"x": np.full([1, 1], float(i))}, alive=None if i != 1 else (lambda: not gone.is_set())
        )
        for i in range(4)
    ]
    calls[2].cancel()
    gone.set()
    assert [calls[i].result(5)["y"][0, 0] for i in (0, 3)] == [0.0, 6.0]
    assert calls[2].cancelled()
    assert calls[1].cancelled()  # its caller had gone: dropped, never run
    batcher.close()
    assert batcher.batch_rows_run == {2: 1}


def test_the_wire_refuses_claimed_shapes_before_allocating():
    proto = wire.TensorProto(dtype=wire.DT_INT32, int_val=[7])
    proto.tensor_shape.dim.add(size=2**40)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="claims"):
        wire.from_tensor_proto(proto, max_elements=1000)
    assert time.perf_counter() - started < 0.1
    proto.tensor_shape.dim[0].size = -3
    with pytest.raises(ValueError, match="negative"):
        wire.from_tensor_proto(proto)
    proto.tensor_shape.dim[0].size = 3
    assert wire.from_tensor_proto(proto).tolist() == [7, 7, 7]


def test_each_call_is_checked_on_its_own_as_the_graph_would_before_it_can_join_a_batch():
    from keras_charrnn.serving.limits import check_call

    limits = ServingLimits(max_prime_chars=5)
    good = {
        "prime": np.array([b"ab"], dtype=object),
        "h_0": np.zeros([1, 4], np.float32),
        "num_chars": np.array([3], np.int32),
        "temperature": np.array([0.5], np.float32),
        "top_k": np.array([0], np.int32),
        "top_p": np.array([1.0], np.float32),
        "seed": np.array([1], np.int64),
        "position": np.array([0], np.int64),
    }
    check_call(good, 30, limits)
    cases = [
        ({"h_0": np.full([1, 4], np.nan, np.float32)}, "h_0 must be finite"),
        ({"temperature": np.array([np.inf], np.float32)}, "temperature"),
        ({"top_k": np.array([30], np.int32)}, "at most the vocabulary size (29)"),
        ({"top_p": np.array([np.nan], np.float32)}, "top_p"),
        ({"position": np.array([-1], np.int64)}, "position"),
        ({"prime": np.array([b""], dtype=object)}, "prime"),
        ({"prime": np.array(["é" * 6], dtype=object)}, "max_prime_chars"),
        ({"seed": np.array([1, 2], np.int64)}, "seed must have one row per row"),
    ]
    for change, fragment in cases:
        with pytest.raises(ServingError) as raised:
            check_call({**good, **change}, 30, limits)
        assert raised.value.code == "INVALID_ARGUMENT" and fragment in raised.value.message, raised.value.message
    step = {"ids": np.array([[1, 30]], np.int32), "h_0": np.zeros([1, 4], np.float32)}
    with pytest.raises(ServingError, match=r"ids must be in \[0, 30\)"):
        check_call(step, 30, limits)
