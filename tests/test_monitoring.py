"""Prometheus metrics under TF Serving's names, scraped from a real ``charrnn serve`` after real calls."""

from __future__ import annotations

import re
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from conftest import loaded, write_models_config
from keras_charrnn.errors import ConfigError
from keras_charrnn.serving.monitoring import DEFAULT_PATH, ServerMetrics, read_monitoring_config
from servers import ServerProcess, free_ports
from test_rest import as_json, generate_inputs, http_call

REST_CALLS, GRPC_CALLS = 3, 2


def scrape(url: str) -> tuple[str, dict[str, float]]:
    """The metrics page and its samples: ``'name{labels}' -> value``."""
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        page = response.read().decode()
    samples = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return page, samples


@pytest.fixture(scope="module")
def monitored(model_base, tmp_path_factory):
    """A server with batching, the REST API and Prometheus at /metrics, after a known set of calls."""
    folder = tmp_path_factory.mktemp("monitoring")
    config = write_models_config(folder / "models.config", model_base, ["lstm"])
    (folder / "monitoring.config").write_text('prometheus_config {\n  enable: true\n  path: "/metrics"\n}\n')
    (port,) = free_ports(1)
    with ServerProcess(
        [
            "--model_config_file",
            config,
            "--rest_api_port",
            port,
            "--enable_batching",
            "--monitoring_config_file",
            folder / "monitoring.config",
        ]
    ) as server:
        url = f"http://127.0.0.1:{port}"
        model = loaded(model_base / "lstm")
        inputs = generate_inputs(model, "the ", 10, seed=3)
        body = {"signature_name": "generate_text", "inputs": as_json(inputs)}
        for _ in range(REST_CALLS):
            assert http_call(f"{url}/v1/models/lstm:predict", body)[0] == 200
        assert http_call(f"{url}/v1/models/lstm:predict", {"signature_name": "nope", "inputs": {}})[0] == 400
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "lstm", "generate_text"
        for k, v in inputs.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(GRPC_CALLS):
                stub.Predict(request, timeout=60)
        yield url, model_base / "lstm" / "1"


def test_request_counts_and_latencies_by_model_api_and_status(monitored):
    url, _ = monitored
    page, samples = scrape(f"{url}/metrics")
    assert "# TYPE :tensorflow:serving:request_count counter" in page
    assert samples[':tensorflow:serving:request_count{model_name="lstm",status="OK"}'] == REST_CALLS + GRPC_CALLS
    assert samples[':tensorflow:serving:request_count{model_name="lstm",status="FAILED_PRECONDITION"}'] == 1
    assert "# TYPE :tensorflow:serving:request_latency histogram" in page
    rest = 'model_name="lstm",API="predict",entrypoint="REST"'
    assert samples[f":tensorflow:serving:request_latency_count{{{rest}}}"] == REST_CALLS
    assert samples[f':tensorflow:serving:request_latency_bucket{{{rest},le="+Inf"}}'] == REST_CALLS
    assert samples[f":tensorflow:serving:request_latency_sum{{{rest}}}"] > 0  # microseconds
    grpc_labels = 'model_name="lstm",API="Predict",entrypoint="GRPC"'
    assert samples[f":tensorflow:serving:request_latency_count{{{grpc_labels}}}"] == GRPC_CALLS


def test_model_load_and_batching_metrics(monitored):
    url, version_dir = monitored
    _, samples = scrape(f"{url}/metrics")
    assert samples[f':tensorflow:cc:saved_model:load_attempt_count{{model_path="{version_dir}",status="success"}}'] == 1
    assert samples[f':tensorflow:cc:saved_model:load_latency{{model_path="{version_dir}"}}'] > 0
    calls = REST_CALLS + GRPC_CALLS  # the refused call never reached the batcher
    assert samples[":tensorflow:serving:batching_session:input_batch_size_count{}"] == calls
    assert samples[":tensorflow:serving:batching_session:input_batch_size_sum{}"] == calls  # one row each
    queuing = ':tensorflow:serving:batching_session:queuing_latency_count{thread_pool_name="batch_threads"}'
    assert samples[queuing] == calls
    runs = samples[":tensorflow:serving:batching_session:wrapped_run_count{}"]
    assert 1 <= runs <= calls
    assert samples[":tensorflow:serving:batching_session:processed_batch_size_count{}"] == runs


def test_process_metrics_come_with_the_serving_ones(monitored):
    url, _ = monitored
    _, samples = scrape(f"{url}/metrics")
    assert samples["process_resident_memory_bytes"] > 0 and "process_cpu_seconds_total" in samples
    assert http_call(f"{url}{DEFAULT_PATH}")[0] == 404  # served at the configured path only


def test_monitoring_config_file_in_tf_serving_text_format(tmp_path):
    path = tmp_path / "monitoring.config"
    path.write_text("prometheus_config { enable: true }\n")
    settings = read_monitoring_config(path)
    assert settings.enable and settings.path == "/monitoring/prometheus/metrics"
    path.write_text('prometheus_config { enable: false path: "/m" }\n')
    assert not read_monitoring_config(path).enable
    path.write_text("prometheus_config { enabled: true }\n")
    with pytest.raises(ConfigError, match="MonitoringConfig"):
        read_monitoring_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_monitoring_config(tmp_path / "missing.config")
    path.write_text('prometheus_config { enable: true path: "metrics" }\n')
    with pytest.raises(ConfigError, match="path"):
        read_monitoring_config(path)


def test_histogram_buckets_are_cumulative_with_tf_serving_bounds():
    metrics = ServerMetrics()
    for seconds in (5e-6, 20e-6, 1.0):
        metrics.record_request("m", "predict", "REST", "OK", seconds)
    metrics.record_request("m", "predict", "REST", "NOT_FOUND", 0.1)
    page = metrics.exposition().decode()
    buckets = re.findall(
        r':tensorflow:serving:request_latency_bucket\{model_name="m",API="predict",'
        r'entrypoint="REST",le="([^"]+)"\} (\d+)',
        page,
    )
    bounds = [float(b) for b, _ in buckets]
    counts = [int(c) for _, c in buckets]
    assert bounds[:3] == [10.0, 18.0, 32.4] and bounds[-1] == np.inf and len(bounds) == 34
    assert counts[:3] == [1, 1, 2] and counts[-1] == 3 and counts == sorted(counts)
    assert metrics.value(":tensorflow:serving:request_count", model_name="m", status="NOT_FOUND") == 1
