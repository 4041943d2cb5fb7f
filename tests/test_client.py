"""The gRPC sampling client against real model-server processes on loopback."""

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import run_cli, start_server, stop_server
from keras_charrnn.sample import load
from keras_charrnn.serving.client import SamplingClient, ServerError, VersionGoneError


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
    first, port1 = start_server(["--model_name", "lstm", "--model_base_path", str(model_base / "lstm")])
    second, port2 = start_server(["--model_name", "lstm", "--model_base_path", str(model_base / "lstm")])
    try:
        expected = load(model_base / "lstm").generate("the ", 240, temperature=1.0, seed=77)
        client = SamplingClient([f"127.0.0.1:{port1}", f"127.0.0.1:{port2}"], timeout=10, retries=6)
        session = client.session("lstm", prime="the ", temperature=1.0, seed=77)
        text = session.generate(80)
        first.kill()  # SIGKILL: no drain, connections drop
        first.wait()
        text += session.generate(80) + session.generate(80)
        assert text == expected
        client.close()
    finally:
        stop_server(second)
        if first.poll() is None:
            first.kill()


def test_a_pinned_version_that_disappears_raises_a_clear_error(tmp_path, model_base):
    base = tmp_path / "m"
    shutil.copytree(model_base / "lstm" / "1", base / "1")
    proc, port = start_server(["--model_name", "m", "--model_base_path", str(base),
                               "--file_system_poll_wait_seconds", "0.3"])
    try:
        client = SamplingClient(f"127.0.0.1:{port}")
        session = client.session("m", prime="the ", seed=1)
        session.generate(20)
        assert session.version == 1
        shutil.copytree(model_base / "lstm" / "1", base / "2")  # version 2 replaces version 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and client.predict("m", "metadata", {})[1] != 2:
            time.sleep(0.2)
        time.sleep(0.5)  # version 1 is unloaded right after version 2 is available
        with pytest.raises(VersionGoneError, match="version 1 .* no longer served"):
            session.generate(20)
        client.close()
    finally:
        stop_server(proc)


def test_sixteen_concurrent_sessions_each_produce_what_they_produce_alone(client, model_base):
    model = load(model_base / "lstm")
    expected = [model.generate("the ", 96, temperature=1.0, seed=s) for s in range(16)]

    def run(seed):
        session = client.session("lstm", prime="the ", temperature=1.0, seed=seed)
        return "".join(session.stream(96, chunk=32))

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(run, range(16))) == expected


def test_server_errors_surface_with_code_and_message(client):
    with pytest.raises(ServerError) as info:
        client.session("no_such_model")
    assert info.value.code.name == "NOT_FOUND" and "no_such_model" in str(info.value)
    with pytest.raises(Exception, match="top_p"):
        client.session("lstm", top_p=0)


def test_client_import_does_not_load_tensorflow():
    code = ("import sys, time, resource; t = time.perf_counter(); import keras_charrnn.serving.client; "
            "print(time.perf_counter() - t, 'tensorflow' in sys.modules, "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"


def test_sample_cli_over_grpc_matches_in_process(server, model_base):
    result = run_cli("sample", "--server", f"127.0.0.1:{server}", "--name", "rnn", "--prime", "the ", "-n", "100",
                     "--seed", "4", "--chunk", "30")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the " + load(model_base / "rnn").generate("the ", 100, seed=4) + "\n"
    bad = run_cli("sample", "--server", f"127.0.0.1:{server}", "--name", "nope", "-n", "10")
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def test_interactive_sampling_keeps_state_across_turns(server):
    result = run_cli("sample", "--server", f"127.0.0.1:{server}", "--name", "gru", "--interactive", "-n", "20",
                     "--seed", "1", input="the lazy\nseven cats\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") >= 2


def test_demo_runs_to_completion(model_base):
    result = run_cli("demo", "--base-path", model_base, "--name", "lstm", "--prime", "the ", "--calls", "3",
                     "--chunk", "32")
    assert result.returncode == 0, result.stderr
    assert "server stopped with exit status 0" in result.stdout and "latency" in result.stdout
