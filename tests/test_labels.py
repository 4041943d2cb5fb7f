"""Version labels and live config (issue 11): a real ``charrnn serve`` over gRPC and HTTP, its config file
rewritten while it serves, and the canary roll-out of the README."""

from __future__ import annotations

import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from keras_charrnn.errors import ConfigError, InputError, ServingError
from keras_charrnn.serving.client import SamplingClient
from keras_charrnn.serving.manager import ModelManager
from servers import ServerProcess, free_ports, http_call

POLL = 0.3  # --model_config_file_poll_wait_seconds


def config_text(base, models: dict[str, dict[str, int]], note: str = "") -> str:
    """models.config for ``{name: {label: version}}``: every version on disk served (policy ``all``)."""
    entries = ""
    for name, labels in models.items():
        label_lines = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in labels.items())
        entries += (
            f'  config {{\n    name: "{name}"\n    base_path: "{base / name}"\n    model_platform: "tensorflow"\n'
            f"    model_version_policy {{ all {{}} }}\n{label_lines}  }}\n"
        )
    return f"# {note}\nmodel_config_list {{\n{entries}}}\n"


class Deployment:
    """A server on ``models.config``, rewritten by the tests; ``chars`` has versions 1 (lstm) and 2 (gru)."""

    def __init__(self, base, config, server: ServerProcess, rest_port: int):
        self.base, self.config, self.server, self.rest = base, config, server, f"http://127.0.0.1:{rest_port}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.writes = 0
        self.current: dict | None = None  # the models of the config in force, if the file's

    def write(self, text: str) -> None:
        """Replaces the config file at once (as an editor's save or a ConfigMap update does)."""
        self.writes += 1
        tmp = self.config.with_name(f"models.config.{self.writes}")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def apply(self, models: dict[str, dict[str, int]]) -> None:
        """Writes a config and waits until the server has applied it (nothing to do if it is the one in force)."""
        if models == self.current:
            return
        self.current = models
        before = len(self.server.log_matches(r"model config reloaded"))
        self.write(config_text(self.base, models, note=f"write {self.writes + 1}"))
        end = time.monotonic() + 120
        while len(self.server.log_matches(r"model config reloaded")) <= before:
            assert time.monotonic() < end, f"config not applied; last log lines: {self.server.log[-5:]}"
            time.sleep(0.05)

    def version_of(self, model: str, label: str | None = None, version: int | None = None) -> int:
        """The version that answers a Predict (the ``metadata`` signature) on a label or version."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = model, "metadata"
        if label is not None:
            request.model_spec.version_label = label
        if version is not None:
            request.model_spec.version.value = version
        return self.predict_stub.Predict(request, timeout=60).model_spec.version.value


@pytest.fixture(scope="module")
def deployment(model_base, tmp_path_factory):
    base = tmp_path_factory.mktemp("labelled")
    shutil.copytree(model_base / "lstm" / "1", base / "chars" / "1")
    shutil.copytree(model_base / "gru" / "1", base / "chars" / "2")  # the canary: other weights, same vocabulary
    shutil.copytree(model_base / "rnn" / "1", base / "extra" / "1")  # on disk, not in the config at start
    config = base / "models.config"
    config.write_text(config_text(base, {"chars": {"stable": 1, "canary": 2}}))
    (rest_port,) = free_ports(1)
    with ServerProcess(
        [
            "--model_config_file",
            config,
            "--model_config_file_poll_wait_seconds",
            POLL,
            "--rest_api_port",
            rest_port,
            "--log_level",
            "debug",
        ]
    ) as server:
        deployment = Deployment(base, config, server, rest_port)
        deployment.current = {"chars": {"stable": 1, "canary": 2}}
        yield deployment
        deployment.channel.close()


def test_version_labels_resolve_over_grpc_and_rest(deployment):
    assert deployment.version_of("chars", label="stable") == 1
    assert deployment.version_of("chars", label="canary") == 2
    status, body = http_call(f"{deployment.rest}/v1/models/chars/labels/canary")
    assert status == 200 and [v["version"] for v in body["model_version_status"]] == ["2"]
    status, body = http_call(f"{deployment.rest}/v1/models/chars/labels/stable/metadata")
    assert status == 200 and body["model_spec"]["version"] == "1"


def test_unknown_label_is_invalid_argument_as_in_tf_serving(deployment):
    with pytest.raises(grpc.RpcError) as caught:
        deployment.version_of("chars", label="nightly")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "Unrecognized servable version label: nightly"
    status, body = http_call(f"{deployment.rest}/v1/models/chars/labels/nightly/metadata")
    assert status == 400 and "Unrecognized servable version label" in body["error"]


def test_canary_rollout_moves_new_sessions_only(deployment):
    """The README walk-through: stable on 1, canary on 2, then canary promoted to stable."""
    deployment.apply({"chars": {"stable": 1, "canary": 2}})
    with SamplingClient(f"127.0.0.1:{deployment.server.port}") as client:
        on_stable = client.session("chars", prime="ROMEO:", seed=3, version_label="stable")
        first = on_stable.generate(40)
        on_canary = client.session("chars", prime="ROMEO:", seed=3, version_label="canary")
        on_canary.generate(40)
        assert (on_stable.version, on_canary.version) == (1, 2)

        deployment.apply({"chars": {"stable": 2, "canary": 2}})  # promote: stable now names version 2
        second = on_stable.generate(40)  # the session stays on the weights its state belongs to
        reference = client.session("chars", prime="ROMEO:", seed=3, version=1)
        assert first + second == reference.generate(40) + reference.generate(40)
        assert on_stable.version == 1
        assert client.session("chars", prime="ROMEO:", seed=3, version_label="stable").version == 2
        with pytest.raises(InputError, match="version or version_label"):
            client.session("chars", version=1, version_label="stable")
    deployment.apply({"chars": {"stable": 1, "canary": 2}})


def test_models_added_and_removed_by_the_config_file(deployment):
    with pytest.raises(grpc.RpcError) as caught:
        deployment.version_of("extra")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    deployment.apply({"chars": {"stable": 1}, "extra": {}})
    assert deployment.version_of("extra") == 1
    assert deployment.version_of("chars", label="stable") == 1

    # A call in flight on a model being removed finishes on the version it holds; new calls get NOT_FOUND.
    rows, chars = 16, 4000
    with SamplingClient(f"127.0.0.1:{deployment.server.port}", timeout=300) as client:
        info = client.model_info("extra", 1)
        inputs = {
            "prime": np.array([b"A"] * rows, dtype=object),
            "num_chars": np.full([rows], chars, np.int32),
            **{name: np.zeros([rows, info.state_size], np.float32) for name in info.state_names},
            "temperature": np.full([rows], 0.8, np.float32),
            "top_k": np.zeros([rows], np.int32),
            "top_p": np.ones([rows], np.float32),
            "seed": np.arange(rows, dtype=np.int64),
            "position": np.zeros([rows], np.int64),
        }
        result: dict = {}
        call = threading.Thread(
            target=lambda: result.update(answer=client.predict("extra", "generate_text", inputs, version=1))
        )
        pattern = r"Predict: model extra version 1 signature generate_text"
        received = len(deployment.server.log_matches(pattern))
        call.start()
        end = time.monotonic() + 60
        while len(deployment.server.log_matches(pattern)) <= received:
            assert time.monotonic() < end
            time.sleep(0.01)
        deployment.apply({"chars": {"stable": 1, "canary": 2}})
        removed_while_running = call.is_alive()
        call.join(timeout=300)
        outputs, version = result["answer"]
        assert version == 1 and [len(t.decode()) for t in outputs["text"]] == [chars] * rows
        assert removed_while_running  # the removal was applied while the call ran, and the call still finished
    with pytest.raises(grpc.RpcError) as caught:
        deployment.version_of("extra")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        deployment.model_stub.GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "extra"}), timeout=60
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert deployment.server.log_matches(r"model extra: removed from the config")


def test_reload_config_request_applies_a_config_and_refuses_a_bad_label(deployment):
    early = model_management_pb2.ReloadConfigRequest()  # a label on a model this same reload adds: not yet
    text_format.Parse(config_text(deployment.base, {"chars": {}, "extra": {"stable": 1}}), early.config)
    with pytest.raises(grpc.RpcError) as caught:
        deployment.model_stub.HandleReloadConfigRequest(early, timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Request to assign label to version 1 of model extra" in caught.value.details()

    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(config_text(deployment.base, {"chars": {"stable": 2}, "extra": {}}), request.config)
    response = deployment.model_stub.HandleReloadConfigRequest(request, timeout=300)
    deployment.current = None  # the server's config is no longer the file's
    assert response.status.error_code == 0
    assert deployment.version_of("extra") == 1
    assert deployment.version_of("chars", label="stable") == 2

    bad = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(config_text(deployment.base, {"chars": {"stable": 7}}), bad.config)
    with pytest.raises(grpc.RpcError) as caught:
        deployment.model_stub.HandleReloadConfigRequest(bad, timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Request to assign label to version 7 of model chars" in caught.value.details()
    assert deployment.version_of("extra") == 1  # the refused config changed nothing
    assert deployment.version_of("chars", label="stable") == 2

    deployment.apply({"chars": {"stable": 1, "canary": 2}})  # the file, changed again, is applied over it
    assert deployment.version_of("chars", label="stable") == 1
    with pytest.raises(grpc.RpcError) as caught:
        deployment.version_of("extra")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_broken_config_file_keeps_the_config_in_force(deployment):
    deployment.apply({"chars": {"stable": 1, "canary": 2}})
    deployment.write('model_config_list { config { name: "chars" base_path: ')  # a half-written file
    deployment.server.wait_for_log(r"model config file .* not applied: not a valid ModelServerConfig", timeout=60)
    assert deployment.version_of("chars", label="canary") == 2
    deployment.write(config_text(deployment.base, {"chars": {"stable": 9}}, note="label on a missing version"))
    deployment.server.wait_for_log(r"not applied: Request to assign label to version 9 of model chars", timeout=60)
    assert deployment.version_of("chars", label="stable") == 1
    deployment.apply({"chars": {"stable": 2, "canary": 2}})  # a good file afterwards applies
    assert deployment.version_of("chars", label="stable") == 2
    assert deployment.server.proc.poll() is None


def test_label_rules_for_versions_not_available(model_base, tmp_path):
    """TF Serving's rule: a label needs an AVAILABLE version; with allow_version_labels_for_unavailable_models a
    new label may name one not loaded yet, but an existing label moves only to an AVAILABLE version."""
    shutil.copytree(model_base / "lstm" / "1", tmp_path / "m" / "1")

    def config(labels: dict[str, int]) -> model_server_config_pb2.ModelServerConfig:
        return text_format.Parse(config_text(tmp_path, {"m": labels}), model_server_config_pb2.ModelServerConfig())

    strict = ModelManager(config({"stable": 1, "next": 2}), poll_seconds=0)
    with pytest.raises(ConfigError, match="'next' points to version 2, which is not available"):
        strict.start()

    lenient = ModelManager(
        config({"stable": 1, "next": 2}), poll_seconds=0, allow_version_labels_for_unavailable_models=True
    )
    lenient.start()
    assert lenient.resolve("m", label="stable").version == 1
    with pytest.raises(ServingError) as caught:
        lenient.resolve("m", label="next")  # labelled, not loaded
    assert caught.value.code == "NOT_FOUND"
    with pytest.raises(ServingError) as caught:
        lenient.reload_config(config({"stable": 3, "next": 2}))  # moving "stable" to a version not available
    assert caught.value.code == "FAILED_PRECONDITION"
    lenient.reload_config(config({"stable": 1, "next": 2, "later": 5}))  # a new label may wait for its version
    assert lenient.labels("m") == {"stable": 1, "next": 2, "later": 5}
    lenient.stop()
