"""Warm-up records: TF Serving's assets.extra/tf_serving_warmup_requests, written by export, replayed at load."""

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_log_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from conftest import run_cli, write_models_config
from servers import ServerProcess
from keras_charrnn import generation, warmup
from keras_charrnn.errors import ConfigError
from keras_charrnn.export import export_run
from keras_charrnn.serving.settings import batch_sizes_from_batching_parameters

ROOT = Path(__file__).resolve().parent.parent


def _records(version_dir):
    """The file as TF Serving reads it: TFRecords of PredictionLog."""
    path = version_dir / "assets.extra" / "tf_serving_warmup_requests"
    logs = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw)
        logs.append(log)
    return logs


def _batch(request):
    return tf.make_ndarray(request.inputs["prime"]).shape[0]


def test_export_writes_a_record_per_generate_text_signature_and_batch_size_the_batching_parameters_allow(
    trained_runs, tmp_path
):
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 6 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 6\n")
    result = run_cli(
        "export", trained_runs["lstm"], "--name", "m", "--base-path", tmp_path, "--batching-parameters-file", params
    )
    assert result.returncode == 0, result.stderr
    logs = _records(tmp_path / "m" / "1")
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * 4
    requests = [log.predict_log.request for log in logs]
    assert [(r.model_spec.signature_name, _batch(r)) for r in requests] == [
        ("generate_text", 2),
        ("generate_text", 6),
        ("generate_text_v2", 2),
        ("generate_text_v2", 6),
    ]
    plain = {"prime", "h_0", "c_0", "h_1", "c_1", "num_chars", "temperature", "top_k", "top_p", "seed", "position"}
    assert set(requests[0].inputs) == plain
    assert set(requests[2].inputs) == plain | {"min_p", "logit_bias", "stop", "stop_tail", "min_chars", "logprobs"}
    assert tf.make_ndarray(requests[1].inputs["h_1"]).shape == (6, 24)
    v2 = {k: tf.make_ndarray(v) for k, v in requests[3].inputs.items()}  # the table's defaults, stop padded
    assert v2["stop"].shape == (6, generation.MAX_STOPS) and set(v2["stop"].reshape(-1)) == {b""}
    assert v2["logprobs"].tolist() == [generation.LOGPROBS_OFF] * 6 and not v2["logit_bias"].any()
    assert v2["temperature"].tolist() == [pytest.approx(generation.DEFAULT_TEMPERATURE)] * 6


def test_warmup_batch_sizes_default_and_from_the_repos_batching_parameters(model_base):
    logs = _records(model_base / "gru" / "1")
    assert [_batch(log.predict_log.request) for log in logs] == list(warmup.DEFAULT_BATCH_SIZES) * 2 == [1, 2, 4, 8] * 2
    assert batch_sizes_from_batching_parameters("serving/batching_parameters.txt") == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ConfigError, match="warmup_batch_sizes"):
        warmup.check_batch_sizes([0, 2], ["generate_text"])
    with pytest.raises(ConfigError, match="1000"):
        warmup.check_batch_sizes(range(1, 1002), ["generate_text"])


def test_warmup_xla_adds_the_twins_records(trained_runs, tmp_path):
    path = export_run(trained_runs["rnn"], "m", tmp_path, warmup_batch_sizes=[1, 3], warmup_xla=True)
    assert [
        (log.predict_log.request.model_spec.signature_name, _batch(log.predict_log.request)) for log in _records(path)
    ] == [
        (signature, batch)
        for signature in ("generate_text", "generate_text_v2", "generate_text_xla", "generate_text_v2_xla")
        for batch in (1, 3)
    ]


def test_every_record_replays_through_a_real_servers_grpc_predict(model_base, server_process):
    logs = _records(model_base / "lstm" / "1")
    server = server_process  # the session's server: it serves model_base/lstm too, and is only called here
    server.wait_for_log(r"model lstm version 1: ran 8 warm-up record\(s\)", timeout=5)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for log in logs:
            request = predict_pb2.PredictRequest()
            request.CopyFrom(log.predict_log.request)
            request.model_spec.name = "lstm"
            response = stub.Predict(request, timeout=60)
            text = tf.make_ndarray(response.outputs["text"])
            assert text.shape == (_batch(request),) and all(len(t.decode()) == 2 for t in text)
            assert tf.make_ndarray(response.outputs["h_0"]).shape == (_batch(request), 24)


def _with_records(src, dst, requests):
    shutil.copytree(src, dst)
    with tf.io.TFRecordWriter(str(dst / "1" / "assets.extra" / "tf_serving_warmup_requests")) as writer:
        for request in requests:  # written by hand: export never writes a file TF Serving refuses
            writer.write(prediction_log_pb2.PredictionLog(predict_log={"request": request}).SerializeToString())
    return dst


def test_a_version_whose_warmup_fails_is_not_loaded(model_base, tmp_path):
    lstm = model_base / "lstm"
    good = warmup.warmup_requests(_signature_defs(lstm / "1"), [1])[0]
    bad = predict_pb2.PredictRequest()
    bad.CopyFrom(good)
    bad.inputs["num_chars"].CopyFrom(tf.make_tensor_proto(np.array([0], np.int32)))
    metadata = predict_pb2.PredictRequest()
    metadata.model_spec.signature_name = "metadata"
    twin = warmup.warmup_requests(_signature_defs(lstm / "1"), [1], ["generate_text_xla"])
    _with_records(lstm, tmp_path / "failing", [good, bad])
    _with_records(lstm, tmp_path / "many", [metadata] * (warmup.MAX_RECORDS + 1))
    _with_records(lstm, tmp_path / "ok", [metadata] * warmup.MAX_RECORDS)
    _with_records(lstm, tmp_path / "xla_records", [good] + twin)  # what `export --warmup-xla` writes
    config = write_models_config(tmp_path / "models.config", tmp_path, ["failing", "many", "ok", "xla_records"])
    with ServerProcess(["--model_config_file", config, "--xla_cpu_compilation_enabled=false"]) as server:
        server.wait_for_log(r"model ok version 1: ran 1000 warm-up record\(s\)", timeout=5)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            status = {}
            for name in ("failing", "many", "ok", "xla_records"):
                request = get_model_status_pb2.GetModelStatusRequest()
                request.model_spec.name = name
                status[name] = stub.GetModelStatus(request, timeout=10).model_version_status[0]
    assert status["ok"].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    for name, message in [
        ("failing", "num_chars must be at least 1"),
        ("many", "exceeds the maximum (1000)"),
        ("xla_records", "XLA compilation disabled"),
    ]:
        assert status[name].state == get_model_status_pb2.ModelVersionStatus.END, name
        assert message in status[name].status.error_message, (name, status[name].status.error_message)


def _signature_defs(version_dir):
    return _signature_defs_graph(version_dir).signature_def


@pytest.mark.slow
def test_the_bundled_model_serves_without_xla_and_carries_warmup_records():
    import json

    from keras_charrnn.xla import must_compile_signatures

    version = ROOT / "saved_models" / "shakespeare" / "1"
    twins = ["generate_xla", "generate_text_xla", "generate_v2_xla", "generate_text_v2_xla"]
    assert must_compile_signatures(_signature_defs_graph(version)) == set(twins)
    records = [
        (log.predict_log.request.model_spec.signature_name, _batch(log.predict_log.request))
        for log in _records(version)
    ]
    assert records == [(s, b) for s in ("generate_text", "generate_text_v2") for b in (1, 2, 4, 8)]
    config = json.loads(tf.saved_model.load(str(version)).signatures["metadata"]()["config"].numpy())
    assert "run_dir" not in config and config["xla_signatures"] == twins


def _signature_defs_graph(version_dir):
    return saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes()).meta_graphs[0]
