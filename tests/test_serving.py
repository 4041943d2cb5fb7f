"""The embedded model server over real gRPC on loopback, started as a subprocess."""

import re
import shutil
import subprocess
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from conftest import CELLS, start_server, stop_server, write_models_config
from keras_charrnn.sample import load
from keras_charrnn.serving.protos import BatchingParameters, SSLConfig


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
    inputs = {"prime": np.array([prime.encode()] * rows, dtype=object), **model.zero_state(rows),
              "num_chars": np.full([rows], n, np.int32), "temperature": np.full([rows], temperature, np.float32),
              "top_k": np.zeros([rows], np.int32), "top_p": np.ones([rows], np.float32),
              "seed": np.full([rows], seed, np.int64), "position": np.zeros([rows], np.int64)}
    return inputs


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


@pytest.mark.parametrize("cell", CELLS)
def test_predict_on_each_signature_equals_in_process(stub, model_base, cell):
    model = load(model_base / cell)
    inputs = _gen_inputs(model)
    expected = {k: v.numpy() for k, v in model.signatures["generate_text"](
        **{k: tf.constant(v) for k, v in inputs.items()}).items()}
    for signature in ("generate_text", "serving_default"):
        response = stub.Predict(_request(cell, signature, inputs))
        assert response.model_spec.version.value == 1 and response.model_spec.signature_name == signature
        assert tf.make_ndarray(response.outputs["text"])[0] == expected["text"][0]
        for name in model.info.state_names:
            np.testing.assert_array_equal(tf.make_ndarray(response.outputs[name]), expected[name])
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
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "gru"}))
    assert [(s.version, s.state) for s in status.model_version_status] == [(1, 30)]  # AVAILABLE
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService", "grpc.health.v1.Health"} <= names


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_every_bad_request_gets_its_status_code_and_the_server_keeps_serving(stub, model_base):
    model = load(model_base / "lstm")
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
        (predict(top_p=np.array([0], np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
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

    assert _code(lambda: stub.Predict(_request("lstm", "generate_text", {**good, "num_chars": np.array([4000], np.int32)}),
                                      timeout=0.001))[0] == grpc.StatusCode.DEADLINE_EXCEEDED

    response = stub.Predict(_request("lstm", "generate_text", good))  # still serving
    assert tf.make_ndarray(response.outputs["text"]).shape == (1,)


def test_new_version_is_served_and_a_corrupt_one_is_refused(tmp_path, model_base):
    base = tmp_path / "m"
    shutil.copytree(model_base / "lstm" / "1", base / "1")
    proc, port = start_server(["--model_name", "m", "--model_base_path", str(base),
                               "--file_system_poll_wait_seconds", "0.5"])
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        status_stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        model = load(model_base / "lstm")
        inputs = _gen_inputs(model)
        assert stub.Predict(_request("m", "generate_text", inputs)).model_spec.version.value == 1

        (base / "3").mkdir()
        (base / "3" / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        time.sleep(3)
        assert stub.Predict(_request("m", "generate_text", inputs)).model_spec.version.value == 1
        statuses = {s.version: s for s in status_stub.GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "m"})).model_version_status}
        assert statuses[3].state == 50 and statuses[3].status.error_message  # END, with its error
        assert statuses[1].state == 30

        shutil.copytree(model_base / "gru" / "1", base / "4")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if stub.Predict(_request("m", "metadata", {})).model_spec.version.value == 4:
                break
            time.sleep(0.3)
        answer = stub.Predict(_request("m", "metadata", {}))
        assert answer.model_spec.version.value == 4
        assert _code(lambda: stub.Predict(_request("m", "metadata", {}, version=1)))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        assert stop_server(proc) == 0


def test_batched_concurrent_calls_equal_the_same_calls_one_at_a_time(model_base, tmp_path):
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 16 }\nbatch_timeout_micros { value: 20000 }\n"
                      "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 4 }\n")
    proc, port = start_server(["--model_name", "lstm", "--model_base_path", str(model_base / "lstm"),
                               "--enable_batching", "--batching_parameters_file", str(params)])
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        model = load(model_base / "lstm")
        requests = [_request("lstm", "generate_text", _gen_inputs(model, prime=p, seed=s, n=48, temperature=1.0))
                    for s, p in enumerate(["the ", "a", "lazy dog ", "(", "\"q", "cats sit", "x", "seven "] * 2)]
        alone = [tf.make_ndarray(stub.Predict(r).outputs["text"])[0] for r in requests]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda r: stub.Predict(r), requests))
        assert [tf.make_ndarray(r.outputs["text"])[0] for r in together] == alone
    finally:
        assert stop_server(proc) == 0


def test_sigterm_drains_calls_in_flight_and_exits_zero(model_base):
    proc, port = start_server(["--model_name", "lstm", "--model_base_path", str(model_base / "lstm")])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    model = load(model_base / "lstm")
    request = _request("lstm", "generate_text", _gen_inputs(model, n=4000))
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=stub.Predict(request, timeout=60)))
    thread.start()
    time.sleep(0.05)
    assert stop_server(proc) == 0
    thread.join()
    assert len(tf.make_ndarray(result["r"].outputs["text"])[0].decode()) == 4000


def _make_certs(tmp_path):
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=test-ca")
    for name in ("server", "client", "rogue"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
        signer = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"] if name != "rogue" else ["-key", "rogue.key"]
        run("x509", "-req", "-in", f"{name}.csr", "-out", f"{name}.pem", "-days", "2", "-copy_extensions", "copy",
            *signer)
    return {p.name: p.read_bytes() for p in tmp_path.iterdir()}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make test certificates")
def test_mutual_tls_serves_known_clients_and_refuses_others(tmp_path, model_base):
    certs = _make_certs(tmp_path)
    ssl = SSLConfig(server_key=certs["server.key"].decode(), server_cert=certs["server.pem"].decode(),
                    custom_ca=certs["ca.pem"].decode(), client_verify=True)
    (tmp_path / "ssl.config").write_text(text_format.MessageToString(ssl))
    proc, port = start_server(["--model_name", "gru", "--model_base_path", str(model_base / "gru"),
                               "--ssl_config_file", str(tmp_path / "ssl.config")])
    try:
        def call(key, cert):
            creds = grpc.ssl_channel_credentials(certs["ca.pem"], key and certs[key], cert and certs[cert])
            channel = grpc.secure_channel(f"localhost:{port}", creds)
            return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                _request("gru", "metadata", {}), timeout=10)

        assert call("client.key", "client.pem").model_spec.name == "gru"
        for key, cert in ((None, None), ("rogue.key", "rogue.pem")):
            with pytest.raises(grpc.RpcError) as info:
                call(key, cert)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert stop_server(proc) == 0


def test_served_versions_follow_the_version_policy(tmp_path, model_base):
    base = tmp_path / "m"
    for v in (1, 2, 3):
        shutil.copytree(model_base / "rnn" / "1", base / str(v))
    config = write_models_config(tmp_path / "models.config", tmp_path, ["m"],
                                 policy="model_version_policy { specific { versions: 1 versions: 3 } }")
    proc, port = start_server(["--model_config_file", str(config)])
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert stub.Predict(_request("m", "metadata", {}, version=1)).model_spec.version.value == 1
        assert stub.Predict(_request("m", "metadata", {})).model_spec.version.value == 3
        assert _code(lambda: stub.Predict(_request("m", "metadata", {}, version=2)))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        stop_server(proc)


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
    k8s_models = text_format.Parse(textwrap.dedent(blocks["models.config"]), model_server_config_pb2.ModelServerConfig())
    assert k8s_models == config
    k8s_batching = text_format.Parse(textwrap.dedent(blocks["batching_parameters.txt"]), BatchingParameters())
    assert k8s_batching == batching
    compose = (root / "compose.yaml").read_text()
    for path in re.findall(r"--(?:model_config_file|batching_parameters_file)=/workspace/(\S+)", compose):
        assert (root.parent / path).is_file(), path


def test_embedded_server_serves_from_the_repo_serving_files():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc, port = start_server(["--model_config_file", "serving/models.config", "--enable_batching",
                               "--batching_parameters_file", "serving/batching_parameters.txt"], cwd=root)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert stub.Predict(_request("shakespeare", "metadata", {})).model_spec.name == "shakespeare"
    finally:
        assert stop_server(proc) == 0


@pytest.mark.skipif(shutil.which("tensorflow_model_server") is None, reason="tensorflow_model_server is not on PATH")
def test_the_client_works_against_real_tensorflow_serving(model_base):
    import socket

    from keras_charrnn.serving.client import SamplingClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["tensorflow_model_server", f"--port={port}", "--model_name=lstm",
                             f"--model_base_path={model_base / 'lstm'}", "--xla_cpu_compilation_enabled=true"])
    try:
        client = SamplingClient(f"127.0.0.1:{port}", timeout=60, retries=20, backoff=0.5)
        text = client.session("lstm", prime="the ", seed=3).generate(100)
        assert text == load(model_base / "lstm").generate("the ", 100, seed=3)
    finally:
        proc.terminate()
        proc.wait()


def test_a_full_batching_queue_answers_unavailable():
    from keras_charrnn.serving.batching import Batcher
    from keras_charrnn.serving.manager import LoadedVersion, ServingError

    release = threading.Event()

    def slow_run(loaded, signature, inputs):
        release.wait(10)
        return {"y": inputs["x"] * 2}

    batcher = Batcher(slow_run, max_batch_size=2, batch_timeout_micros=0, num_batch_threads=1, max_enqueued_batches=1)
    target = LoadedVersion("m", 1, None, None, {})
    first = batcher.submit(target, "s", {"x": np.ones([2, 1])})  # taken by the one batch thread
    time.sleep(0.2)
    queued = batcher.submit(target, "s", {"x": np.full([2, 1], 3.0)})  # fills the queue (one batch of 2 rows)
    with pytest.raises(ServingError) as info:
        batcher.submit(target, "s", {"x": np.ones([1, 1])})
    assert info.value.code == "UNAVAILABLE" and "full" in info.value.message
    release.set()
    np.testing.assert_array_equal(first.result(10)["y"], np.full([2, 1], 2.0))
    np.testing.assert_array_equal(queued.result(10)["y"], np.full([2, 1], 6.0))
    batcher.close()
