"""The embedded model server over real gRPC on loopback, started as a subprocess."""

import functools
import re
import shutil
import subprocess
import textwrap
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow.core.protobuf import error_codes_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus
from tensorflow_serving.config import model_server_config_pb2

from conftest import CELLS, loaded, run_cli, write_models_config
from keras_charrnn.errors import ConfigError, ServingError, graph_error_message
from keras_charrnn.serving.config_files import single_model_config
from keras_charrnn.serving.manager import ModelManager, wanted_versions
from keras_charrnn.serving.options import ServerOptions
from keras_charrnn.serving.config_files import BatchingParameters, SSLConfig
from keras_charrnn.serving.request_batcher import Batcher, BatchingOptions, _Call, padded_sizes
from keras_charrnn.serving.server import ModelServer
from keras_charrnn.serving.settings import batching_options
from keras_charrnn.serving.version_loader import LoadedVersion
from servers import ServerProcess, poll


def _request(model, signature, inputs, version=None):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return req


def _gen_inputs(model, prime="the ", n=40, seed=3, temperature=0.8, rows=1):
    inputs = {
        "prime": np.array([prime.encode()] * rows, dtype=object),
        **model.zero_state(rows),
        "num_chars": np.full([rows], n, np.int32),
        "temperature": np.full([rows], temperature, np.float32),
        "top_k": np.zeros([rows], np.int32),
        "top_p": np.ones([rows], np.float32),
        "seed": np.full([rows], seed, np.int64),
        "position": np.zeros([rows], np.int64),
    }
    return inputs


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("cell", CELLS)
def test_predict_on_each_signature_equals_in_process(stub, model_base, cell):
    model = loaded(model_base / cell)
    inputs = _gen_inputs(model)
    expected = {
        k: v.numpy()
        for k, v in model.signatures["generate_text"](**{k: tf.constant(v) for k, v in inputs.items()}).items()
    }
    for signature in ("generate_text", "serving_default"):
        response = stub.Predict(_request(cell, signature, inputs))
        assert response.model_spec.version.value == 1 and response.model_spec.signature_name == signature
        assert tf.make_ndarray(response.outputs["text"])[0] == expected["text"][0]
        for name in model.info.state_names:  # the server runs the XLA twin: the same text, states to float rounding
            np.testing.assert_allclose(tf.make_ndarray(response.outputs[name]), expected[name], atol=1e-5)
    ids = np.array([model.vocab.encode("the lazy dog")], np.int32)
    step = stub.Predict(_request(cell, "step", {"ids": ids, **model.zero_state()}))
    local = model.signatures["step"](ids=tf.constant(ids), **{k: tf.constant(v) for k, v in model.zero_state().items()})
    np.testing.assert_allclose(tf.make_ndarray(step.outputs["logits"]), local["logits"].numpy(), atol=1e-6)
    gen_inputs = {k: v for k, v in inputs.items() if k != "prime"}
    gen_inputs["ids"] = ids
    gen = stub.Predict(_request(cell, "generate", gen_inputs))
    local = model.signatures["generate"](**{k: tf.constant(v) for k, v in gen_inputs.items()})
    np.testing.assert_array_equal(tf.make_ndarray(gen.outputs["ids"]), local["ids"].numpy())
    meta = stub.Predict(_request(cell, "metadata", {}))
    assert tf.make_ndarray(meta.outputs["vocabulary"]).shape[0] == model.vocab.size


def test_model_metadata_and_status_answer_as_tf_serving_does(server, stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "lstm"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request)
    assert response.model_spec.name == "lstm" and response.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    assert {"step", "generate", "generate_text", "serving_default", "metadata"} <= set(sig_map.signature_def)
    assert sig_map.signature_def["generate_text"].inputs["c_1"].tensor_shape.dim[1].size == 24

    channel = grpc.insecure_channel(f"127.0.0.1:{server}")
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "gru"})
    )
    assert [(s.version, s.state) for s in status.model_version_status] == [(1, ModelVersionStatus.AVAILABLE)]
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService", "grpc.health.v1.Health"} <= names


def _code(call):
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def test_every_bad_request_gets_its_status_code_and_the_server_keeps_serving(stub, model_base):
    model = loaded(model_base / "lstm")
    good = _gen_inputs(model)

    def predict(model_name="lstm", signature="generate_text", version=None, **changes):
        inputs = {**good, **changes}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        return lambda: stub.Predict(_request(model_name, signature, inputs, version), timeout=30)

    cases = [
        (predict(model_name="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (predict(version=7), grpc.StatusCode.NOT_FOUND, "7"),
        (predict(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION, "nope"),
        (predict(seed=None), grpc.StatusCode.INVALID_ARGUMENT, "missing"),
        (predict(extra=np.zeros([1], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "unexpected"),
        (predict(temperature=np.array([1], np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
        (predict(h_0=np.zeros([1, 7], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "h_0"),
        (predict(h_0=np.zeros([24], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (predict(temperature=np.array([-1], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (predict(top_k=np.array([500], np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (predict(top_p=np.array([0], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        (predict(num_chars=np.array([0], np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "num_chars"),
        (predict(num_chars=np.array([100_000], np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "num_chars"),
        (predict(prime=np.array([b""], dtype=object)), grpc.StatusCode.INVALID_ARGUMENT, "prime"),
        (predict(position=np.zeros([2], np.int64)), grpc.StatusCode.INVALID_ARGUMENT, "position"),
        (lambda: stub.Classify(predict_pb2.PredictRequest()), grpc.StatusCode.UNIMPLEMENTED, ""),
    ]
    for call, code, fragment in cases:
        got, details = _code(call)
        assert got == code, (code, details)
        assert fragment in details and "Traceback" not in details

    malformed = _request("lstm", "generate_text", good)
    malformed.inputs["h_0"].tensor_content = b"\x00\x01\x02"  # not a whole number of floats
    assert _code(lambda: stub.Predict(malformed))[0] == grpc.StatusCode.INVALID_ARGUMENT

    huge = _request("lstm", "generate_text", {**good, "prime": np.array([b"x" * (5 * 1024 * 1024)], dtype=object)})
    assert _code(lambda: stub.Predict(huge))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED

    assert (
        _code(
            lambda: stub.Predict(
                _request("lstm", "generate_text", {**good, "num_chars": np.array([4000], np.int32)}), timeout=0.001
            )
        )[0]
        == grpc.StatusCode.DEADLINE_EXCEEDED
    )

    response = stub.Predict(_request("lstm", "generate_text", good))  # still serving
    assert tf.make_ndarray(response.outputs["text"]).shape == (1,)


def _version_states(status_stub, name):
    response = status_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": name}))
    return {s.version: s for s in response.model_version_status}


def test_new_version_is_served_and_a_corrupt_one_is_refused(tmp_path, model_base):
    base = tmp_path / "m"
    shutil.copytree(model_base / "lstm" / "1", base / "1")
    with ServerProcess(
        ["--model_name", "m", "--model_base_path", base, "--file_system_poll_wait_seconds", "0.5"]
    ) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
        model = loaded(model_base / "lstm")
        inputs = _gen_inputs(model)
        assert stub.Predict(_request("m", "generate_text", inputs)).model_spec.version.value == 1

        (base / "3").mkdir()
        (base / "3" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        statuses = poll(
            lambda: (
                (found := _version_states(status_stub, "m")).get(3)
                and found[3].state == ModelVersionStatus.END
                and found
            )
        )
        assert statuses[3].status.error_code == error_codes_pb2.INVALID_ARGUMENT and statuses[3].status.error_message
        assert statuses[1].state == ModelVersionStatus.AVAILABLE
        assert stub.Predict(_request("m", "generate_text", inputs)).model_spec.version.value == 1

        shutil.copytree(model_base / "gru" / "1", base / "4")
        poll(lambda: stub.Predict(_request("m", "metadata", {})).model_spec.version.value == 4, every=0.3)
        assert _code(lambda: stub.Predict(_request("m", "metadata", {}, version=1)))[0] == grpc.StatusCode.NOT_FOUND
    assert server.proc.returncode == 0


def test_batched_concurrent_calls_form_multi_row_batches_and_equal_the_calls_alone(model_base, tmp_path):
    params = tmp_path / "batching.txt"
    params.write_text(
        "max_batch_size { value: 16 }\nbatch_timeout_micros { value: 100000 }\n"
        "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 4 }\n"
    )
    with ServerProcess(
        [
            "--model_name",
            "lstm",
            "--model_base_path",
            model_base / "lstm",
            "--enable_batching",
            "--batching_parameters_file",
            params,
        ],
        debug=True,
    ) as server:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        model = loaded(model_base / "lstm")
        requests = [
            _request("lstm", "generate_text", _gen_inputs(model, prime=p, seed=s, n=48, temperature=1.0))
            for s, p in enumerate(["the ", "a", "lazy dog ", "(", '"q', "cats sit", "x", "seven "] * 2)
        ]
        alone = [tf.make_ndarray(stub.Predict(r).outputs["text"])[0] for r in requests]
        batch = r"ran a batch of (\d+) rows from (\d+) calls .* generate_text"
        assert [m.group(1, 2) for m in server.log_matches(batch)] == [("1", "1")] * 16  # one at a time: no batching
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda r: stub.Predict(r), requests))
        assert [tf.make_ndarray(r.outputs["text"])[0] for r in together] == alone
        concurrent = [(int(m.group(1)), int(m.group(2))) for m in server.log_matches(batch)][16:]
        assert sum(rows for rows, _ in concurrent) == 16
        assert max(calls for _, calls in concurrent) > 1, concurrent  # calls really shared model runs
    assert server.proc.returncode == 0


def test_sigterm_drains_calls_in_flight_and_exits_zero(model_base):
    server = ServerProcess(["--model_name", "lstm", "--model_base_path", model_base / "lstm"], debug=True)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    model = loaded(model_base / "lstm")
    request = _request("lstm", "generate_text", _gen_inputs(model, n=4000))
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=stub.Predict(request, timeout=60)))
    thread.start()
    server.wait_for_log(r"Predict: model lstm version 1 signature generate_text")  # the call is in flight
    assert server.stop() == 0
    thread.join()
    assert len(tf.make_ndarray(result["r"].outputs["text"])[0].decode()) == 4000


def _make_certs(tmp_path):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    for name in ("server", "client", "rogue"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        )
        signer = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"] if name != "rogue" else ["-key", "rogue.key"]
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-copy_extensions",
            "copy",
            *signer,
        )
    return {p.name: p.read_bytes() for p in tmp_path.iterdir()}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make test certificates")
def test_mutual_tls_serves_known_clients_and_refuses_others(tmp_path, model_base):
    certs = _make_certs(tmp_path)
    ssl = SSLConfig(
        server_key=certs["server.key"].decode(),
        server_cert=certs["server.pem"].decode(),
        custom_ca=certs["ca.pem"].decode(),
        client_verify=True,
    )
    (tmp_path / "ssl.config").write_text(text_format.MessageToString(ssl))
    with ServerProcess(
        ["--model_name", "gru", "--model_base_path", model_base / "gru", "--ssl_config_file", tmp_path / "ssl.config"]
    ) as server:

        def call(key, cert):
            creds = grpc.ssl_channel_credentials(certs["ca.pem"], key and certs[key], cert and certs[cert])
            channel = grpc.secure_channel(f"localhost:{server.port}", creds)
            return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                _request("gru", "metadata", {}), timeout=10
            )

        assert call("client.key", "client.pem").model_spec.name == "gru"
        for key, cert in ((None, None), ("rogue.key", "rogue.pem")):
            assert _code(functools.partial(call, key, cert))[0] == grpc.StatusCode.UNAVAILABLE
    assert server.proc.returncode == 0


def test_served_versions_follow_the_version_policy(tmp_path, model_base):
    base = tmp_path / "m"
    for v in (1, 2, 3):
        shutil.copytree(model_base / "rnn" / "1", base / str(v))
    config = write_models_config(
        tmp_path / "models.config",
        tmp_path,
        ["m"],
        policy="model_version_policy { specific { versions: 1 versions: 3 } }",
    )
    with ServerProcess(["--model_config_file", config]) as server:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        assert stub.Predict(_request("m", "metadata", {}, version=1)).model_spec.version.value == 1
        assert stub.Predict(_request("m", "metadata", {})).model_spec.version.value == 3
        assert _code(lambda: stub.Predict(_request("m", "metadata", {}, version=2)))[0] == grpc.StatusCode.NOT_FOUND


def test_every_config_file_in_serving_parses_with_tf_serving_messages():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "serving"
    config = text_format.Parse((root / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert [c.name for c in config.model_config_list.config] == ["shakespeare"]
    batching = text_format.Parse((root / "batching_parameters.txt").read_text(), BatchingParameters())
    assert batching.max_batch_size.value >= 16

    # The Kubernetes ConfigMap carries the same two files as block scalars.
    configmap = (root / "k8s" / "configmap.yaml").read_text()
    blocks = dict(re.findall(r"^  (\S+): \|\n((?:    .*\n|\n)+)", configmap, flags=re.M))
    k8s_models = text_format.Parse(
        textwrap.dedent(blocks["models.config"]), model_server_config_pb2.ModelServerConfig()
    )
    assert k8s_models == config
    k8s_batching = text_format.Parse(textwrap.dedent(blocks["batching_parameters.txt"]), BatchingParameters())
    assert k8s_batching == batching
    compose = (root / "compose.yaml").read_text()
    for path in re.findall(r"--(?:model_config_file|batching_parameters_file)=/workspace/(\S+)", compose):
        assert (root.parent / path).is_file(), path


@pytest.mark.slow
def test_embedded_server_serves_from_the_repo_serving_files():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with ServerProcess(
        [
            "--model_config_file",
            "serving/models.config",
            "--enable_batching",
            "--batching_parameters_file",
            "serving/batching_parameters.txt",
        ],
        cwd=root,
    ) as server:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        assert stub.Predict(_request("shakespeare", "metadata", {})).model_spec.name == "shakespeare"
    assert server.proc.returncode == 0


@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None, reason="tensorflow_model_server is not on PATH")
def test_the_client_works_against_real_tensorflow_serving(model_base):
    import socket

    from keras_charrnn.serving.client import SamplingClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "tensorflow_model_server",
            f"--port={port}",
            "--model_name=lstm",
            f"--model_base_path={model_base / 'lstm'}",
            "--xla_cpu_compilation_enabled=true",
        ]
    )
    try:
        client = SamplingClient(f"127.0.0.1:{port}", timeout=60, retries=20, backoff=0.5)
        text = client.session("lstm", prime="the ", seed=3).generate(100)
        assert text == loaded(model_base / "lstm").generate("the ", 100, seed=3)
    finally:
        proc.terminate()
        proc.wait()


def test_a_full_batching_queue_answers_unavailable():
    running, release = threading.Event(), threading.Event()

    def slow_run(loaded, signature, inputs):
        running.set()
        release.wait(10)
        return {"y": inputs["x"] * 2}

    batcher = Batcher(
        slow_run, BatchingOptions(max_batch_size=2, batch_timeout_micros=0, num_batch_threads=1, max_enqueued_batches=1)
    )
    target = LoadedVersion("m", 1, None, None, {})
    first = batcher.submit(target, "s", {"x": np.ones([2, 1])})
    assert running.wait(10)  # taken by the one batch thread
    queued = batcher.submit(target, "s", {"x": np.full([2, 1], 3.0)})  # fills the queue (one batch of 2 rows)
    with pytest.raises(ServingError) as raised:
        batcher.submit(target, "s", {"x": np.ones([1, 1])})
    assert raised.value.code == "UNAVAILABLE" and "full" in raised.value.message
    release.set()
    np.testing.assert_array_equal(first.result(10)["y"], np.full([2, 1], 2.0))
    np.testing.assert_array_equal(queued.result(10)["y"], np.full([2, 1], 6.0))
    batcher.close()
    assert batcher.batch_rows_run == {2: 2}


def test_a_partial_batch_waits_for_the_callers_of_the_last_batch_to_call_again():
    def run(loaded, signature, inputs):
        time.sleep(0.5)
        return {"y": inputs["x"] * 2}

    batcher = Batcher(run, BatchingOptions(max_batch_size=8, batch_timeout_micros=10_000, num_batch_threads=1))
    target = LoadedVersion("m", 1, None, None, {})
    for future in [batcher.submit(target, "s", {"x": np.ones([1, 1])}) for _ in range(4)]:  # one batch of 4
        future.result(10)
    # The same four callers call again 50 ms apart: each gap is over the timeout, all four within one run.
    again = []
    for i in range(4):
        again.append(batcher.submit(target, "s", {"x": np.full([1, 1], float(i))}))
        time.sleep(0.05)
    for i, future in enumerate(again):
        np.testing.assert_array_equal(future.result(10)["y"], [[2.0 * i]])
    batcher.close()
    assert batcher.batch_rows_run == {4: 2}


def test_a_partial_batch_is_held_no_longer_than_the_last_batch_took_and_a_lone_caller_not_at_all():
    batcher = Batcher(lambda loaded, signature, inputs: inputs, BatchingOptions(batch_timeout_micros=2000))
    target = (LoadedVersion("m", 1, None, None, {}), "s")
    key = (id(target[0]), "s")

    def queue(*enqueued):
        return deque(_Call({}, 1, enqueued=t) for t in enqueued)

    assert batcher._ready_at(queue(100.0), target) == pytest.approx(100.002)  # nothing run yet: the timeout
    batcher._last_batch[key] = (1, 0.3, 99.0)  # one caller: it is not waited for
    assert batcher._ready_at(queue(100.0), target) == pytest.approx(100.002)
    batcher._last_batch[key] = (4, 0.3, 99.0)  # four callers, two back: the run's 0.3 s at most
    assert batcher._ready_at(queue(100.0, 100.001), target) == pytest.approx(100.302)
    batcher._last_batch[key] = (4, 0.3, 100.1)  # ... counted from the run's end when that is later
    assert batcher._ready_at(queue(100.0, 100.001), target) == pytest.approx(100.4)
    batcher._last_batch[key] = (2, 0.3, 99.0)  # all back, the last just now: the timeout after it
    assert batcher._ready_at(queue(100.0, 100.001), target) == pytest.approx(100.003)
    batcher.close()


# ----- fast unit tests: no server process ------------------------------------------------------


def _policy(text: str = "") -> model_server_config_pb2.ModelConfig:
    return text_format.Parse(text, model_server_config_pb2.ModelConfig())


@pytest.mark.parametrize(
    "policy, on_disk, wanted",
    [
        ("", [1, 3, 2], [3]),  # default: the latest one
        ("model_version_policy { latest { num_versions: 2 } }", [1, 3, 2], [3, 2]),
        ("model_version_policy { latest { num_versions: 5 } }", [2, 1], [2, 1]),
        ("model_version_policy { all {} }", [1, 3, 2], [3, 2, 1]),
        ("model_version_policy { specific { versions: 1 versions: 3 } }", [1, 2, 3, 4], [3, 1]),
        ("model_version_policy { specific { versions: 7 } }", [1, 2], []),
        ("", [], []),
    ],
)
def test_version_policy_picks_the_wanted_versions_newest_first(policy, on_disk, wanted):
    assert wanted_versions(_policy(policy), on_disk) == wanted


def test_batches_are_padded_to_powers_of_two_or_the_allowed_sizes():
    assert padded_sizes(1) == [1]
    assert padded_sizes(16) == [1, 2, 4, 8, 16]
    assert padded_sizes(12) == [1, 2, 4, 8, 12]
    assert padded_sizes(8, [2, 5, 8]) == [2, 5, 8]
    for bad in ([4, 2, 8], [2, 4], [2, 2, 8], [0, 8]):
        with pytest.raises(ConfigError, match="allowed_batch_sizes"):
            padded_sizes(8, bad)


def test_batching_parameters_file_fills_in_defaults_and_bad_values_name_the_parameter(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8\n")
    options = batching_options(path)
    assert options == BatchingOptions(max_batch_size=8, allowed_batch_sizes=(4, 8))
    assert options.batch_timeout_micros == BatchingOptions().batch_timeout_micros
    path.write_text("num_batch_threads { value: 0 }\n")
    with pytest.raises(ConfigError, match="num_batch_threads"):
        Batcher(lambda *a: {}, batching_options(path))
    path.write_text("max_batch_size: 8\n")  # not a wrapper message
    with pytest.raises(ConfigError, match="BatchingParameters"):
        batching_options(path)


def test_server_configuration_problems_raise_config_error(tmp_path):
    cases = [
        (ServerOptions(), "model_base_path"),
        (ServerOptions(model_config_file=str(tmp_path / "missing.config")), "no such file"),
        (ServerOptions(model_config_file=str(tmp_path), model_base_path=str(tmp_path / "m")), "not both"),
        (ServerOptions(model_config_file=str(tmp_path)), "cannot read"),
        (
            ServerOptions(
                model_base_path=str(tmp_path / "m"),
                enable_batching=True,
                batching_parameters_file=str(tmp_path / "missing.txt"),
            ),
            "no such file",
        ),
    ]
    (tmp_path / "empty.config").write_text("model_config_list {}\n")
    cases.append((ServerOptions(model_config_file=str(tmp_path / "empty.config")), "holds no model"))
    (tmp_path / "other.config").write_text(
        'model_config_list { config { name: "m" base_path: "/x" model_platform: "pytorch" } }\n'
    )
    cases.append((ServerOptions(model_config_file=str(tmp_path / "other.config")), "model_platform"))
    for options, fragment in cases:
        with pytest.raises(ConfigError, match=fragment):
            ModelServer(options)
    (tmp_path / "ssl.config").write_text('server_key: "k"\n')
    server = ModelServer(
        ServerOptions(
            model_base_path=str(tmp_path / "none"),
            ssl_config_file=str(tmp_path / "ssl.config"),
            file_system_poll_wait_seconds=0,
        )
    )
    with pytest.raises(ConfigError, match="server_cert"):
        server.start()


@pytest.mark.slow
def test_serve_command_reports_a_config_problem_in_one_line(tmp_path):
    result = run_cli("serve", "--port", "0", "--model_config_file", tmp_path / "missing.config", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"charrnn: error: {tmp_path / 'missing.config'}: no such file"]


def test_a_zero_padded_version_folder_is_not_served_as_that_number(tmp_path):
    base = tmp_path / "m"
    for name in ("007", "2"):
        (base / name).mkdir(parents=True)
        (base / name / "saved_model.pb").write_bytes(b"not a SavedModel")
    config = single_model_config("m", str(base))
    config.model_config_list.config[0].model_version_policy.all.SetInParent()
    manager = ModelManager(config, poll_seconds=0)
    manager.poll()
    ((version, status),) = manager.statuses("m")  # 2 was tried; 007 was never read as version 7
    assert version == 2 and status.state == ModelVersionStatus.END and status.error_code == "INVALID_ARGUMENT"
    with pytest.raises(ServingError) as raised:
        manager.resolve("m", 7)
    assert raised.value.code == "NOT_FOUND"


def test_graph_error_message_keeps_the_models_own_sentence():
    report = (
        "Graph execution error:\n\nDetected at node assert/Assert defined at (most recent call last):\n"
        "  File ...\nassertion failed: [top_p must be in (0, 1]] [Condition x > 0 did not hold]\n"
        "\t [[{{node assert/Assert}}]] [Op:__inference_generate_123]"
    )
    assert graph_error_message(report) == "top_p must be in (0, 1]"  # the message's own "]" is kept
    assert graph_error_message("assertion failed: [the batch is empty]") == "the batch is empty"
    assert (
        graph_error_message("Graph execution error:\n\nDetected at node x\nindices[0] = 99 is not in [0, 65)")
        == "indices[0] = 99 is not in [0, 65)"
    )
    assert graph_error_message("Graph execution error:\n") == "Graph execution error:"
    assert graph_error_message("") == "model error"


def test_serving_limits_are_the_options_of_their_names():
    import dataclasses

    from keras_charrnn.serving.limits import ServingLimits

    for f in dataclasses.fields(ServingLimits):  # one default each: the option's is the limit's
        assert getattr(ServerOptions(), f.name) == f.default, f.name
    options = ServerOptions(max_prime_chars=7, max_rows_per_call=3, max_chars_per_call=9)
    assert ServingLimits.from_options(options) == ServingLimits(
        max_prime_chars=7, max_rows_per_call=3, max_chars_per_call=9
    )
    with pytest.raises(ConfigError, match="^max_ids_length must be a positive integer, got 0"):
        ServingLimits.from_options(ServerOptions(max_ids_length=0))


def test_the_server_hands_its_settings_to_the_manager_when_it_builds_it(tmp_path):
    server = ModelServer(
        ServerOptions(
            model_name="m",
            model_base_path=str(tmp_path),
            xla_cpu_compilation_enabled=False,
            allow_version_labels_for_unavailable_models=True,
            max_prime_chars=11,
        )
    )
    manager = server.manager
    assert (manager.xla, manager.allow_version_labels_for_unavailable_models) == (False, True)
    assert manager.on_change == server._after_poll and manager.on_remove == server._models_removed
    assert server.settings.limits.max_prime_chars == 11 and server.settings.batching is None


def test_serve_flags_come_from_server_options_with_their_defaults_and_help():
    import dataclasses
    import inspect
    import sys

    from keras_charrnn.cli import build_parser
    from keras_charrnn.serving.rest import RestServer

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest: a for a in serve._actions}
    for f in dataclasses.fields(ServerOptions):
        assert flags[f.name].option_strings == ["--" + f.name] and flags[f.name].default == f.default, f.name
        assert flags[f.name].help.startswith(f.metadata["help"]), f.name
    args = serve.parse_args(
        [
            "--model_name",
            "m",
            "--model_base_path",
            "b",
            "--rest_api_num_threads",
            "3",
            "--xla_cpu_compilation_enabled=false",
            "--enable_batching",
        ]
    )
    given = ServerOptions(**{k: v for k, v in vars(args).items() if k in ServerOptions.__dataclass_fields__})
    assert given == ServerOptions(
        model_name="m",
        model_base_path="b",
        rest_api_num_threads=3,
        xla_cpu_compilation_enabled=False,
        enable_batching=True,
    )
    rest_defaults = {k: p.default for k, p in inspect.signature(RestServer).parameters.items()}
    assert (rest_defaults["host"], rest_defaults["max_body_bytes"], rest_defaults["num_threads"]) == (
        ServerOptions.host,
        ServerOptions.max_message_bytes,
        ServerOptions.rest_api_num_threads,
    )
    tf_free = subprocess.run(
        [sys.executable, "-c", "import sys, keras_charrnn.serving.options; sys.exit('tensorflow' in sys.modules)"],
        capture_output=True,
        text=True,
    )
    assert tf_free.returncode == 0, tf_free.stderr  # charrnn serve --help stays instant


@pytest.mark.slow
def test_the_serve_process_imports_tensorflow_without_the_modules_it_never_uses():
    import sys

    code = textwrap.dedent("""
        import linecache, sys
        from keras_charrnn import cli
        from keras_charrnn.serving import memory
        update = linecache.updatecache
        memory.lean_server_process()
        with memory.source_lines_unread():
            cli.import_tensorflow_quietly()
        import keras_charrnn.serving.server
        assert linecache.updatecache is update
        read = [f for f, entry in linecache.cache.items() if len(entry) == 4 and entry[2] and "tensorflow" in f]
        assert not read, f"TensorFlow's source was read into linecache: {read[:3]}"
        import requests
        from tensorflow.python.profiler.internal import _pywrap_profiler_plugin
        maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
        assert "_pywrap_profiler_plugin" not in maps, "the profiler client's library was loaded"
        assert "urllib3" not in sys.modules and "charset_normalizer" not in sys.modules
        for module in (requests, _pywrap_profiler_plugin):
            assert isinstance(module, memory.NotLoaded) and not hasattr(module, "get")
            try:
                module.get
            except AttributeError as exc:
                assert "not loaded in `charrnn serve`" in str(exc)
        assert all(sys.modules.get(name) is None for name in memory.SERVE_UNUSED_MODULES)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_heap_is_trimmed_once_the_calls_stop_and_once_per_busy_spell(monkeypatch):
    from types import SimpleNamespace

    from keras_charrnn.serving import server as server_module

    class Prediction:  # what the trimmer reads of PredictionServicer: when a model call last started or ended
        busy = False
        last = 0.0

        @property
        def ran_at(self):
            return time.monotonic() if self.busy else self.last

    trims = []
    monkeypatch.setattr(server_module, "IDLE_TRIM_SECONDS", 0.05)
    monkeypatch.setattr(server_module, "release_freed_memory", lambda: trims.append(time.monotonic()))
    fake = SimpleNamespace(_stopped=threading.Event())
    prediction = Prediction()
    trimmer = threading.Thread(target=ModelServer._trim_when_idle, args=(fake, prediction), daemon=True)
    trimmer.start()
    try:
        time.sleep(0.3)
        assert trims == []  # no call has run since the server started: nothing to give back
        prediction.busy = True  # calls keep coming
        time.sleep(0.3)
        assert trims == []
        prediction.last, prediction.busy = time.monotonic(), False
        poll(lambda: trims, timeout=10, every=0.01)
        time.sleep(0.3)
        assert len(trims) == 1 and trims[0] - prediction.last >= 0.05  # once, after the spell
        prediction.last = time.monotonic()  # another spell: one more trim
        poll(lambda: len(trims) == 2, timeout=10, every=0.01)
    finally:
        fake._stopped.set()
        trimmer.join(timeout=5)
    assert not trimmer.is_alive()
