"""gRPC sampling client: sessions that keep the hidden state between calls to a model server.

Works with ``charrnn serve`` and with TensorFlow Serving's ``tensorflow_model_server``
alike: it uses only ``PredictionService/Predict`` and ``GetModelMetadata``,
with TF Serving's messages (light copies, see ``wire.py``), and never imports
TensorFlow.

Example::

    from keras_charrnn.serving.client import SamplingClient

    client = SamplingClient(["localhost:8500", "localhost:8501"])
    session = client.session("shakespeare", prime="ROMEO:", temperature=0.8, seed=1)
    print(session.generate(200))
    for text in session.stream(500, chunk=64):
        print(text, end="", flush=True)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import grpc
import numpy as np

from keras_charrnn.errors import CharRNNError, ConfigError, InputError
from keras_charrnn.sampling import DEFAULT_PRIME, SamplingParams
from keras_charrnn.serving import wire
from keras_charrnn.session import ModelInfo, Session

SAMPLING_INPUTS = ("prime", "num_chars", "temperature", "top_k", "top_p", "seed", "position")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ServerError(CharRNNError):
    """An error status from the model server; ``code`` is the ``grpc.StatusCode``."""

    def __init__(self, code: grpc.StatusCode, message: str, target: str):
        super().__init__(f"{target}: {code.name}: {message}")
        self.code = code
        self.details = message
        self.target = target


class VersionGoneError(ServerError):
    """The model version a session is pinned to is no longer served anywhere."""


@dataclass
class TLS:
    """TLS settings for the channel.

    Args:
        ca_cert: PEM file of the certificate authority that signed the server's certificate.
        client_cert: PEM file of this client's certificate (mutual TLS).
        client_key: PEM file of this client's private key (mutual TLS).
        server_name: the name to check the server's certificate against, if not the target's host.
    """

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these files make.

        Raises:
            ConfigError: a file cannot be read.
        """
        return grpc.ssl_channel_credentials(_read_pem(self.ca_cert, "ca_cert"), _read_pem(self.client_key, "client_key"),
                                            _read_pem(self.client_cert, "client_cert"))


def _read_pem(path: str | None, parameter: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{parameter}: cannot read {path} ({exc.strerror})") from None


class SamplingClient:
    """Talks to one model server or several replicas of it.

    Args:
        targets: ``"host:port"`` or a list of them (replicas serving the same models).
        tls: TLS settings; None for a plaintext channel.
        timeout: deadline of each call, in seconds.
        retries: how many times an UNAVAILABLE or DEADLINE_EXCEEDED call is retried,
            moving to the next target each time, with exponential backoff.
        backoff: first backoff delay in seconds (doubles, with jitter).
    """

    def __init__(self, targets: str | list[str], tls: TLS | None = None, timeout: float = 30.0,
                 retries: int = 4, backoff: float = 0.05):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        if not self.targets:
            raise ConfigError("targets must hold at least one server address")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if tls and tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._channels = [grpc.secure_channel(t, tls.credentials(), options) if tls else grpc.insecure_channel(t, options)
                          for t in self.targets]
        self._predict = [c.unary_unary(wire.PREDICT, request_serializer=wire.PredictRequest.SerializeToString,
                                       response_deserializer=wire.PredictResponse.FromString) for c in self._channels]
        self._metadata = [c.unary_unary(wire.GET_MODEL_METADATA,
                                        request_serializer=wire.GetModelMetadataRequest.SerializeToString,
                                        response_deserializer=wire.GetModelMetadataResponse.FromString)
                          for c in self._channels]
        self._current = 0
        self._model_infos: dict[str, ModelInfo] = {}  # "model@version" -> its facts

    def _call(self, stubs, request):
        """One call with failover: retryable failures move on to the next target."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            index = self._current
            try:
                return stubs[index](request, timeout=self.timeout)
            except grpc.RpcError as exc:
                code, target = exc.code(), self.targets[index]
                if code not in RETRYABLE or attempt == self.retries:
                    raise ServerError(code, exc.details() or "", target) from None
                self._current = (index + 1) % len(self.targets)
                time.sleep(delay * (0.5 + random.random()))
                delay *= 2

    def predict(self, model: str, signature: str, inputs: dict[str, np.ndarray], version: int | None = None
                ) -> tuple[dict[str, np.ndarray], int]:
        """Calls Predict; returns the outputs as NumPy arrays and the version that answered."""
        request = wire.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = version
        for key, value in inputs.items():
            wire.to_tensor_proto(value, request.inputs[key])
        try:
            response = self._call(self._predict, request)
        except ServerError as exc:
            if version is not None and exc.code == grpc.StatusCode.NOT_FOUND:
                raise VersionGoneError(exc.code, f"version {version} of model {model!r}, which this session is "
                                       f"pinned to, is no longer served (its state belongs to those weights; "
                                       f"start a new session): {exc.details}", exc.target) from None
            raise
        outputs = {k: wire.from_tensor_proto(v) for k, v in response.outputs.items()}
        return outputs, response.model_spec.version.value

    def signature_defs(self, model: str, version: int | None = None) -> dict:
        """The model's SignatureDefs, from GetModelMetadata."""
        request = wire.GetModelMetadataRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        request.metadata_field.append("signature_def")
        response = self._call(self._metadata, request)
        sig_map = wire.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(sig_map):
            raise InputError(f"model {model!r}: the server's metadata holds no SignatureDefMap")
        return dict(sig_map.signature_def)

    def model_info(self, model: str, version: int | None = None) -> ModelInfo:
        """State names and sizes (GetModelMetadata) and limits (the ``metadata`` signature)."""
        key = f"{model}@{version}"
        if key not in self._model_infos:
            sigs = self.signature_defs(model, version)
            if "generate_text" not in sigs or "metadata" not in sigs:
                raise InputError(f"model {model!r} is not a keras-charrnn model (no generate_text/metadata signature)")
            states = {k: v.tensor_shape.dim[1].size for k, v in sigs["generate_text"].inputs.items()
                      if k not in SAMPLING_INPUTS}
            outputs, _ = self.predict(model, "metadata", {}, version)
            config = json.loads(outputs["config"].reshape(-1)[0].decode("utf-8"))
            info = ModelInfo.from_config(model, config)
            if set(states) != set(info.state_names) or any(s != info.state_size for s in states.values()):
                raise InputError(f"model {model!r}: signature states {states} disagree with its metadata")
            self._model_infos[key] = info
        return self._model_infos[key]

    def session(self, model: str, prime: str = DEFAULT_PRIME, params: SamplingParams | None = None,
                version: int | None = None, **fields) -> Session:
        """A session on ``model``; its first call pins the version that answered.

        Args:
            model: the model's name on the server.
            prime: the text to continue (at least one character).
            params: how characters are chosen; or give its fields as keywords
                (``temperature=``, ``top_k=``, ``top_p=``, ``seed=``).
            version: pin this version from the start (default: the newest the server has).

        Returns:
            A new session; its calls go to the server.

        Example:

        >>> client.session("shakespeare", prime="ROMEO:", temperature=0.5, seed=1).generate(100)  # doctest: +SKIP
        """
        params = SamplingParams.of(params, **fields)
        session = Session(_GrpcRunner(self, model), self.model_info(model, version), prime, params)
        session.version = version
        return session

    def restore(self, saved: str) -> Session:
        """Continues a session saved with ``Session.to_json`` (possibly by another process)."""
        obj = json.loads(saved)
        return Session.from_json(saved, _GrpcRunner(self, obj["model"]), self.model_info(obj["model"], obj["version"]))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "SamplingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _GrpcRunner:
    def __init__(self, client: SamplingClient, model: str):
        self.client, self.model = client, model

    def run(self, signature, inputs, version):
        return self.client.predict(self.model, signature, inputs, version)
