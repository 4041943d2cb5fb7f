"""The gRPC sampling client against real model-server processes on loopback."""

import dataclasses
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus

from conftest import interactive_transcript, loaded, run_cli, side_by_side
import keras_charrnn
from keras_charrnn.errors import CharRNNError, ConfigError, InputError, ServingError
from keras_charrnn.sampling import DEFAULT_TEMPERATURE, SamplingParams
from keras_charrnn.serving.client import SamplingClient, ServerError, VersionGoneError
from keras_charrnn.session import ModelInfo, Session
from servers import ServerProcess


@pytest.fixture(scope="module")
def client(server):
    with SamplingClient(f"127.0.0.1:{server}") as c:
        yield c


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_seeded_grpc_session_gives_the_in_process_text(client, model_base, cell):
    expected = loaded(model_base / cell).generate("the ", 150, temperature=0.9, top_k=5, seed=42)
    session = client.session(cell, prime="the ", temperature=0.9, top_k=5, seed=42)
    assert session.generate(150) == expected
    assert session.version == 1 and session.position == 150


def test_chunking_does_not_change_the_text_over_grpc(client):
    whole = client.session("lstm", prime="a ", seed=9).generate(200)
    chunks = list(client.session("lstm", prime="a ", seed=9).stream(200, chunk=37))
    assert "".join(chunks) == whole and [len(c) for c in chunks] == [37, 74, 89]  # the server's segments grow


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
    expected_session = loaded(model_base / "lstm").session("the ", seed=2)
    expected_session.generate(30)
    expected_session.feed(" lazy dog")
    assert session.generate(60) == expected_session.generate(60)


def test_sixteen_concurrent_sessions_each_produce_what_they_produce_alone(client, model_base):
    model = loaded(model_base / "lstm")
    expected = [model.generate("the ", 96, temperature=1.0, seed=s) for s in range(16)]

    def run(seed):
        session = client.session("lstm", prime="the ", temperature=1.0, seed=seed)
        return "".join(session.stream(96, chunk=32))

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(run, range(16))) == expected


def test_server_errors_surface_as_serving_errors_with_code_and_message(client):
    with pytest.raises(ServingError) as raised:  # one exception type for a refused request, local or remote
        client.session("no_such_model")
    assert isinstance(raised.value, ServerError) and raised.value.status == grpc.StatusCode.NOT_FOUND
    assert raised.value.code == "NOT_FOUND" and "no_such_model" in str(raised.value)
    assert keras_charrnn.ServingError is ServingError
    with pytest.raises(ConfigError, match="top_p"):  # checked before any call
        client.session("lstm", top_p=0)
    info = client.model_info("lstm")
    inputs = {
        "prime": np.array([b"the "], dtype=object),
        "num_chars": np.array([5], np.int32),
        "temperature": np.array([1.0], np.float32),
        "top_k": np.array([0], np.int32),
        "top_p": np.array([0.0], np.float32),
        "seed": np.array([1], np.int64),
        "position": np.array([0], np.int64),
        **{name: np.zeros([1, info.state_size], np.float32) for name in info.state_names},
    }
    with pytest.raises(ServerError) as raised:  # the server's own check, for clients that skip the local one
        client.predict("lstm", "generate_text", inputs)
    assert raised.value.status == grpc.StatusCode.INVALID_ARGUMENT and "top_p must be in (0, 1]" in raised.value.details


def test_client_configuration_problems_raise_config_error(tmp_path):
    from keras_charrnn.serving.client import TLS

    with pytest.raises(ConfigError, match="targets"):
        SamplingClient([])
    with pytest.raises(ConfigError, match="ca_cert"):
        SamplingClient("localhost:1", tls=TLS(ca_cert=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="limits"):
        SamplingClient("localhost:1", limits={"max_prime_char": 8})
    with pytest.raises(ConfigError, match="limits"):
        SamplingClient("localhost:1", limits={"max_prime_chars": 0})
    with pytest.raises(ConfigError, match="timeout"):
        SamplingClient("localhost:1", timeout=0)


@pytest.mark.slow
def test_client_import_is_light_and_does_not_load_tensorflow():
    # Peak RSS from /proc (VmHWM): getrusage's ru_maxrss keeps the forking pytest process's peak across exec.
    code = (
        "import re, sys, time; t = time.perf_counter(); import keras_charrnn.serving.client; "
        "print(time.perf_counter() - t, 'tensorflow' in sys.modules, "
        "re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))"
    )
    seconds, has_tensorflow, peak_kib = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert has_tensorflow == "False"
    assert int(peak_kib) < 100 * 1024  # MB: NumPy and gRPC only (TensorFlow alone takes several hundred)
    assert float(seconds) < 2.0  # about 0.2 s when idle; TensorFlow's import takes several seconds


def test_sample_cli_over_grpc_matches_in_process(server, model_base):
    result, bad = side_by_side(  # independent commands: they run side by side
        lambda: run_cli(
            "sample",
            "--server",
            f"127.0.0.1:{server}",
            "--name",
            "rnn",
            "--prime",
            "the ",
            "-n",
            "100",
            "--seed",
            "4",
            "--chunk",
            "30",
        ),
        lambda: run_cli("sample", "--server", f"127.0.0.1:{server}", "--name", "nope", "-n", "10"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the " + loaded(model_base / "rnn").generate("the ", 100, seed=4) + "\n"
    assert bad.returncode == 2 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr


def test_interactive_sampling_over_grpc_continues_each_line_as_an_in_process_session(server, model_base):
    result = run_cli(
        "sample",
        "--server",
        f"127.0.0.1:{server}",
        "--name",
        "gru",
        "--interactive",
        "-n",
        "20",
        "--seed",
        "1",
        input="the lazy\nseven cats\n",
    )
    assert result.returncode == 0, result.stderr
    with SamplingClient(f"127.0.0.1:{server}") as client:
        controlled = client.model_info("gru").controlled
    stop = "\n\n" if controlled else ()  # the default stop, where the client knows the model has stops
    session = loaded(model_base / "gru").session("the lazy\n", seed=1, stop=stop)
    first = session.generate(20)
    session.feed("seven cats\n")
    second = session.generate(20)
    assert result.stdout == interactive_transcript(result.stdout, [first, second])  # a prompt per line, then Ctrl-D


def test_demo_streams_the_in_process_sessions_text_and_stops_the_server_cleanly(model_base):
    result = run_cli(
        "demo",
        "--base-path",
        model_base,
        "--name",
        "lstm",
        "--prime",
        "the ",
        "--calls",
        "3",
        "--chunk",
        "32",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    streamed = re.search(r"state carried by the client ---\n(.*)\n--- served by version", result.stdout, re.S)
    expected = loaded(model_base / "lstm").session("the ", temperature=DEFAULT_TEMPERATURE, seed=1).generate(32 * 3)
    assert streamed and streamed.group(1) == "the " + expected, result.stdout
    assert "server stopped with exit status 0" in result.stdout and "latency" in result.stdout


# ----- Session.from_json: every field checked (no server) ------------------------------------


def _info(**changes):
    return ModelInfo(
        **{
            "name": "m",
            "state_names": ["h_0", "c_0"],
            "state_size": 3,
            "vocab_size": 10,
            "max_chars_per_call": 64,
            **changes,
        }
    )


def _saved(**changes):
    obj = {
        "model": "m",
        "version": 1,
        "position": 5,
        "pending": "a",
        "temperature": 0.8,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 1,
        "states": {"h_0": [0.5] * 3, "c_0": [[0.25] * 3]},
    }
    return json.dumps({**obj, **changes})


def test_from_json_restores_a_valid_record_exactly():
    session = Session.from_json(
        _saved(version=None, seed=-(2**63), top_k=9, temperature=0, position=2**40), None, _info()
    )
    assert (session.version, session.params.seed, session.params.top_k, session.position) == (None, -(2**63), 9, 2**40)
    assert session.states["c_0"].shape == (1, 3) and session.states["c_0"].dtype == np.float32
    assert Session.from_json(session.to_json(), None, _info()).to_json() == session.to_json()


@pytest.mark.parametrize(
    "field, value",
    [
        ("states", {"h_0": [math.nan, 0, 0], "c_0": [0, 0, 0]}),
        ("states", {"h_0": [math.inf, 0, 0], "c_0": [0, 0, 0]}),
        ("states", {"h_0": [1e39, 0, 0], "c_0": [0, 0, 0]}),  # finite in JSON, infinite as float32
        ("states", {"h_0": [0, 0], "c_0": [0, 0]}),
        ("states", {"h_0": [[0, 0, 0], [0, 0, 0]], "c_0": [0, 0, 0]}),  # two rows
        ("states", {"h_0": ["0", "0", "0"], "c_0": [0, 0, 0]}),
        ("states", {"h_0": [True, False, True], "c_0": [0, 0, 0]}),
        ("states", {"h_0": [[0], [0, 0]], "c_0": [0, 0, 0]}),  # ragged
        ("states", {"h_0": [0, 0, 0], "h_1": [0, 0, 0]}),  # another model's state names
        ("states", [0, 0, 0]),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -0.1),
        ("temperature", "0.8"),
        ("temperature", True),
        ("top_k", -1),
        ("top_k", 10),
        ("top_k", 1.5),
        ("top_k", True),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_p", None),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("seed", 1.5),
        ("seed", "1"),
        ("position", -1),
        ("position", 1.0),
        ("position", 2**63),
        ("version", 0),
        ("version", -1),
        ("version", 1.5),
        ("version", "1"),
        ("pending", ""),
        ("pending", 3),
        ("pending", None),
        ("model", "other"),
        ("model", None),
    ],
)
def test_from_json_refuses_an_invalid_field_naming_it(field, value):
    with pytest.raises(InputError, match=field) as raised:
        Session.from_json(_saved(**{field: value}), None, _info())
    assert isinstance(raised.value, CharRNNError)


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "not a saved session"),
        ("[1, 2]", "JSON object"),
        ('"text"', "JSON object"),
        (json.dumps({"pending": "a"}), "no 'temperature' field"),
        (json.dumps({k: v for k, v in json.loads(_saved()).items() if k != "model"}), "no 'model' field"),
    ],
)
def test_from_json_refuses_what_is_not_a_saved_session(data, message):
    with pytest.raises(InputError, match=message):
        Session.from_json(data, None, _info())


def test_limits_split_calls_and_prime_without_changing_the_text(model_base):
    """A prime longer than max_prime_chars is fed in pieces, num_chars is cut to max_chars_per_call."""
    model = loaded(model_base / "lstm")
    expected = model.generate("the quick brown fox ", 50, temperature=1.0, seed=3)
    calls = []

    class CountingRunner:  # the real in-process runner, with each call's sizes recorded
        def run(self, signature, inputs, version):
            calls.append((len(inputs["prime"][0].decode()), int(inputs["num_chars"][0])))
            return model._runner.run(signature, inputs, version)

        def model_info(self, version):
            return info

    info = dataclasses.replace(model.info, max_chars_per_call=16, limits={"max_prime_chars": 6})
    session = Session(CountingRunner(), info, "the quick brown fox ", SamplingParams(temperature=1.0, seed=3))
    assert "".join(session.stream(50, chunk=25)) == expected
    assert calls[:4] == [(6, 1), (6, 1), (6, 1), (2, 16)] and [n for _, n in calls[3:]] == [16, 9, 16, 9]
    assert all(length <= 6 for length, _ in calls)


class _VersionedClient:
    """What a session's runner calls of ``SamplingClient``: versions ``served`` answer, others are gone."""

    def __init__(self, served: set[int]):
        self.served, self.calls, self.forgotten = served, [], []

    def predict_preferring_xla(self, model, signature, inputs, version):
        self.calls.append(version)
        if version is not None and version not in self.served:
            raise VersionGoneError(grpc.StatusCode.NOT_FOUND, f"version {version} is gone", "t")
        n = int(inputs["num_chars"][0])
        return {
            "text": np.array([b"x" * n], dtype=object),
            "h_0": np.ones([1, 3], np.float32),
            "c_0": np.ones([1, 3], np.float32),
        }, version or max(self.served)

    def forget_latest(self, model, version):
        self.forgotten.append(version)

    def model_info(self, model, version):
        return dataclasses.replace(_info(), version=version)


def test_a_session_goes_out_pinned_to_the_version_its_model_info_came_from():
    from keras_charrnn.serving.client import _GrpcRunner

    fake = _VersionedClient({1, 2})
    session = Session(
        _GrpcRunner(fake, "m", follow_newest=True), dataclasses.replace(_info(), version=1), "a", SamplingParams(seed=1)
    )
    assert session.version == 1
    session.generate(3)
    session.generate(3)
    assert fake.calls == [1, 1] and session.version == 1 and session.info.version == 1


def test_a_version_gone_before_the_first_answer_gives_way_to_the_newest_unless_the_caller_chose_it():
    from keras_charrnn.serving.client import _GrpcRunner

    fake = _VersionedClient({2})  # the client's cached newest version, 1, was replaced by 2
    info = dataclasses.replace(_info(), version=1)
    session = Session(_GrpcRunner(fake, "m", follow_newest=True), info, "a", SamplingParams(seed=1))
    assert session.generate(3) == "xxx"
    assert fake.calls == [1, None] and fake.forgotten == [1]
    assert (session.version, session.info.version) == (2, 2)  # pinned to the version that answered, its facts too
    fake.served = {3}
    with pytest.raises(VersionGoneError):  # its state belongs to version 2 now: never moved
        session.generate(3)
    chosen = Session(_GrpcRunner(_VersionedClient({2}), "m", follow_newest=False), info, "a", SamplingParams(seed=1))
    with pytest.raises(VersionGoneError):
        chosen.generate(3)


# ----- several replicas: balance, failover, versions, deadlines --------------------------------


class Replicas:
    """Two ``charrnn serve`` replicas of model "lstm", each on its own base path (so versions may differ)."""

    def __init__(self, model_base, tmp_path_factory):
        self.bases = []
        for name in ("a", "b"):
            base = tmp_path_factory.mktemp(f"replica_{name}") / "lstm"
            shutil.copytree(model_base / "lstm" / "1", base / "1")
            self.bases.append(base)
        self.servers = side_by_side(*(lambda base=base: self._start(base) for base in self.bases))  # independent

    @staticmethod
    def _start(base, port: int = 0) -> ServerProcess:
        return ServerProcess(
            [
                "--model_name",
                "lstm",
                "--model_base_path",
                base,
                "--file_system_poll_wait_seconds",
                "0.3",
                "--max_prime_chars",
                "8",
                "--max_chars_per_call",
                "48",
                "--port",
                port,
            ],
            debug=True,
        )

    @property
    def targets(self) -> list[str]:
        return [f"127.0.0.1:{server.port}" for server in self.servers]

    def predicts(self, index: int) -> int:
        """Predict calls replica ``index`` (its current process) has received."""
        return len(self.servers[index].log_matches(r"Predict: model lstm version"))

    def restart(self, index: int) -> None:
        """SIGKILL, then a new process on the same port."""
        port = self.servers[index].port
        self.servers[index].kill()
        self.servers[index] = self._start(self.bases[index], port)

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def replicas(model_base, tmp_path_factory):
    pair = Replicas(model_base, tmp_path_factory)
    yield pair
    pair.close()


def test_calls_are_spread_round_robin_over_the_replicas(replicas, model_base):
    expected = loaded(model_base / "lstm").generate("the ", 96, temperature=1.0, seed=11)
    with SamplingClient(replicas.targets) as client:
        session = client.session("lstm", prime="the ", temperature=1.0, seed=11)
        before = [replicas.predicts(0), replicas.predicts(1)]
        text = "".join(session.generate(8) for _ in range(12))  # unary calls (a stream would be one call)
        calls = [replicas.predicts(0) - before[0], replicas.predicts(1) - before[1]]
    assert text == expected
    assert calls == [6, 6]  # 12 calls, one after the other on each replica


def test_advertised_limits_split_prime_and_chars_and_keep_the_text(replicas, model_base):
    prime = "the quick brown fox jumps "  # 26 characters; the replicas take 8 per call
    expected = loaded(model_base / "lstm").generate(prime, 100, temperature=1.0, seed=12)
    with SamplingClient(replicas.targets) as client:
        info = client.model_info("lstm")
        assert info.limits["max_prime_chars"] == 8 and info.max_chars_per_call == 48
        session = client.session("lstm", prime=prime, temperature=1.0, seed=12)
        before = replicas.predicts(0) + replicas.predicts(1)
        assert session.generate(100) == expected  # each call within the limits: none refused
        assert replicas.predicts(0) + replicas.predicts(1) - before == 3 + 3  # 3 prime pieces, then 48 + 48 + 4
    with SamplingClient(replicas.targets, limits={"max_chars_per_call": 10}) as client:  # the lower limit wins
        assert client.model_info("lstm").max_chars_per_call == 10


def test_a_killed_replica_is_skipped_and_gets_traffic_again_once_restarted(replicas, model_base):
    expected = loaded(model_base / "lstm").generate("the ", 1500, temperature=1.0, seed=13)
    with SamplingClient(replicas.targets, down_time=0.3, timeout=20) as client:
        session = client.session("lstm", prime="the ", temperature=1.0, seed=13)
        text = session.generate(40)
        replicas.servers[0].kill()  # SIGKILL: no drain, connections drop
        for _ in range(5):
            text += session.generate(8)  # every call answered, by the other replica
        replicas.restart(0)
        deadline = time.monotonic() + 30
        while replicas.predicts(0) == 0:  # the restarted replica is tried again after its skip time
            assert time.monotonic() < deadline, "the restarted replica never got a call"
            text += session.generate(8)
            time.sleep(0.2)
        served = len(text)
        before = [replicas.predicts(0), replicas.predicts(1)]
        for _ in range(6):
            text += session.generate(8)
        assert [replicas.predicts(0) - before[0], replicas.predicts(1) - before[1]] == [3, 3]  # balanced again
    assert text == expected[: len(text)] and served > 80


def _wait_until_unloaded(target: str, version: int) -> None:
    status = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(target))
    request = get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "lstm", "version": {"value": version}})
    deadline = time.monotonic() + 60
    while True:
        try:
            if status.GetModelStatus(request).model_version_status[0].state == ModelVersionStatus.END:
                return
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return
        assert time.monotonic() < deadline, f"version {version} was never unloaded from {target}"
        time.sleep(0.1)


def test_a_version_missing_on_one_replica_is_served_by_the_other_until_gone_everywhere(replicas, model_base):
    expected = loaded(model_base / "lstm").generate("the ", 200, temperature=1.0, seed=14)
    with SamplingClient(replicas.targets) as client:
        session = client.session("lstm", prime="the ", temperature=1.0, seed=14)
        text = session.generate(40)
        saved = session.to_json()
        assert session.version == 1
        shutil.copytree(replicas.bases[1] / "1", replicas.bases[1] / "2")  # replica b moves to version 2
        _wait_until_unloaded(replicas.targets[1], 1)
        for _ in range(10):
            text += session.generate(16)  # NOT_FOUND on b: a answers, every call
        assert text == expected and session.version == 1
        assert client.restore(saved).generate(160) == expected[40:]
        newest = client.session("lstm", prime="the ", seed=1)
        newest.generate(5)
        assert newest.version in (1, 2)
        shutil.copytree(replicas.bases[0] / "1", replicas.bases[0] / "2")  # now a moves to version 2 too
        _wait_until_unloaded(replicas.targets[0], 1)
        with pytest.raises(VersionGoneError, match="version 1 .* no longer served"):
            session.generate(16)
        with pytest.raises(VersionGoneError):
            client.restore(saved)
        fresh = client.session("lstm", prime="the ", temperature=1.0, seed=14)
        assert fresh.generate(40) == expected[:40] and fresh.version == 2
        assert client.model_info("lstm").version == 2  # the cached facts follow the new version


def test_a_session_against_an_unreachable_target_fails_within_its_timeout():
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            refusing = closed.getsockname()[1]  # bound, never listening: connections refused
            for target in (f"127.0.0.1:{silent.getsockname()[1]}", f"127.0.0.1:{refusing}"):
                with SamplingClient(target, timeout=1.5, retries=1000) as client:
                    start = time.monotonic()
                    with pytest.raises(ServerError) as raised:
                        client.session("lstm")
                    assert time.monotonic() - start < 3.0
                    assert raised.value.status in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
                    start = time.monotonic()
                    with pytest.raises(ServerError):
                        client.restore(_saved(model="lstm"))
                    assert time.monotonic() - start < 3.0
