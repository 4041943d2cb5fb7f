"""The gRPC sampling client against real model-server processes on loopback."""

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from conftest import run_cli
from keras_charrnn.errors import ConfigError
from keras_charrnn.inprocess import load
from keras_charrnn.serving.client import SamplingClient, ServerError, VersionGoneError
from servers import ServerProcess


@pytest.fixture(scope="module")
def client(server):
    with SamplingClient(f"127.0.0.1:{server}") as c:
        yield c


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_seeded_grpc_session_gives_the_in_process_text(client, model_base, cell):
    expected = load(model_base / cell).generate("the ", 150, temperature=0.9, top_k=5, seed=42)
    session = client.session(cell, prime="the ", temperature=0.9, top_k=5, seed=42)
    assert session.generate(150) == expected
    assert session.version == 1 and session.position == 150


def test_chunking_does_not_change_the_text_over_grpc(client):
    whole = client.session("lstm", prime="a ", seed=9).generate(200)
    chunks = list(client.session("lstm", prime="a ", seed=9).stream(200, chunk=37))
    assert "".join(chunks) == whole and len(chunks) == 6


def test_fork_and_json_restore_continue_identically(client, server):
    session = client.session("gru", prime="the ", seed=5, temperature=1.0)
    session.generate(40)
    fork = session.fork()
    saved = session.to_json()
    rest = session.generate(80)
    assert fork.generate(80) == rest
    with SamplingClient(f"127.0.0.1:{server}") as other:  # another client, as another machine would
        assert other.restore(saved).generate(80) == rest
    json.loads(saved)  # plain JSON


def test_feed_pushes_user_text_into_the_state(client, model_base):
    session = client.session("lstm", prime="the ", seed=2)
    session.generate(30)
    session.feed(" lazy dog")
    expected_session = load(model_base / "lstm").session("the ", seed=2)
    expected_session.generate(30)
    expected_session.feed(" lazy dog")
    assert session.generate(60) == expected_session.generate(60)


def test_session_survives_a_replica_killed_mid_session(model_base):
    args = ["--model_name", "lstm", "--model_base_path", model_base / "lstm"]
    with ServerProcess(args) as first, ServerProcess(args) as second:
        expected = load(model_base / "lstm").generate("the ", 240, temperature=1.0, seed=77)
        client = SamplingClient([f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"], timeout=10, retries=6)
        session = client.session("lstm", prime="the ", temperature=1.0, seed=77)
        text = session.generate(80)
        first.kill()  # SIGKILL: no drain, connections drop
        text += session.generate(80) + session.generate(80)
        assert text == expected
        client.close()


def test_a_pinned_version_that_disappears_raises_a_clear_error(tmp_path, model_base):
    base = tmp_path / "m"
    shutil.copytree(model_base / "lstm" / "1", base / "1")
    with ServerProcess(["--model_name", "m", "--model_base_path", base,
                        "--file_system_poll_wait_seconds", "0.3"]) as server:
        client = SamplingClient(f"127.0.0.1:{server.port}")
        session = client.session("m", prime="the ", seed=1)
        session.generate(20)
        assert session.version == 1
        shutil.copytree(model_base / "lstm" / "1", base / "2")  # version 2 replaces version 1
        status = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        request = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "m", "version": {"value": 1}})
        deadline = time.monotonic() + 60
        while status.GetModelStatus(request).model_version_status[0].state != ModelVersionStatus.END:
            assert time.monotonic() < deadline, "version 1 was never unloaded"
            time.sleep(0.1)
        with pytest.raises(VersionGoneError, match="version 1 .* no longer served"):
            session.generate(20)
        assert client.session("m", prime="the ", seed=1).generate(5)  # a new session runs on version 2
        client.close()


def test_sixteen_concurrent_sessions_each_produce_what_they_produce_alone(client, model_base):
    model = load(model_base / "lstm")
    expected = [model.generate("the ", 96, temperature=1.0, seed=s) for s in range(16)]

    def run(seed):
        session = client.session("lstm", prime="the ", temperature=1.0, seed=seed)
        return "".join(session.stream(96, chunk=32))

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(run, range(16))) == expected


def test_server_errors_surface_with_code_and_message(client):
    with pytest.raises(ServerError) as raised:
        client.session("no_such_model")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND and "no_such_model" in str(raised.value)
    with pytest.raises(ConfigError, match="top_p"):  # checked before any call
        client.session("lstm", top_p=0)
    info = client.model_info("lstm")
    inputs = {"prime": np.array([b"the "], dtype=object), "num_chars": np.array([5], np.int32),
              "temperature": np.array([1.0], np.float32), "top_k": np.array([0], np.int32),
              "top_p": np.array([0.0], np.float32), "seed": np.array([1], np.int64),
              "position": np.array([0], np.int64),
              **{name: np.zeros([1, info.state_size], np.float32) for name in info.state_names}}
    with pytest.raises(ServerError) as raised:  # the server's own check, for clients that skip the local one
        client.predict("lstm", "generate_text", inputs)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_p must be in (0, 1]" in raised.value.details


def test_client_configuration_problems_raise_config_error(tmp_path):
    from keras_charrnn.serving.client import TLS

    with pytest.raises(ConfigError, match="targets"):
        SamplingClient([])
    with pytest.raises(ConfigError, match="ca_cert"):
        SamplingClient("localhost:1", tls=TLS(ca_cert=str(tmp_path / "missing.pem")))


def test_client_import_is_light_and_does_not_load_tensorflow():
    # Peak RSS from /proc (VmHWM): getrusage's ru_maxrss keeps the forking pytest process's peak across exec.
    code = ("import re, sys, time; t = time.perf_counter(); import keras_charrnn.serving.client; "
            "print(time.perf_counter() - t, 'tensorflow' in sys.modules, "
            "re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")
    seconds, has_tensorflow, peak_kib = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                       check=True).stdout.split()
    assert has_tensorflow == "False"
    assert int(peak_kib) < 100 * 1024  # MB: NumPy and gRPC only (TensorFlow alone takes several hundred)
    assert float(seconds) < 2.0  # about 0.2 s when idle; TensorFlow's import takes several seconds


def test_sample_cli_over_grpc_matches_in_process(server, model_base):
    result = run_cli("sample", "--server", f"127.0.0.1:{server}", "--name", "rnn", "--prime", "the ", "-n", "100",
                     "--seed", "4", "--chunk", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the " + load(model_base / "rnn").generate("the ", 100, seed=4) + "\n"
    bad = run_cli("sample", "--server", f"127.0.0.1:{server}", "--name", "nope", "-n", "10")
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def test_interactive_sampling_over_grpc_continues_each_line_as_an_in_process_session(server, model_base):
    result = run_cli("sample", "--server", f"127.0.0.1:{server}", "--name", "gru", "--interactive", "-n", "20",
                     "--seed", "1", input="the lazy\nseven cats\n")
    assert result.returncode == 0, result.stderr
    session = load(model_base / "gru").session("the lazy\n", seed=1)
    first = session.generate(20)
    session.feed("seven cats\n")
    second = session.generate(20)
    assert result.stdout.split("> ")[1:] == [first + "\n", second + "\n", "\n"]  # a prompt per line, then Ctrl-D


def test_demo_runs_to_completion(model_base):
    result = run_cli("demo", "--base-path", model_base, "--name", "lstm", "--prime", "the ", "--calls", "3",
                     "--chunk", "32")
    assert result.returncode == 0, result.stderr
    assert "server stopped with exit status 0" in result.stdout and "latency" in result.stdout
