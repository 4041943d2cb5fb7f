"""The model server process and its lifecycle: TF Serving's APIs over the model folders, started and stopped.

Services: ``tensorflow.serving.PredictionService`` and ``tensorflow.serving.ModelService``
(see ``servicers``), the standard gRPC health service and server reflection; with a REST
port, TF Serving's REST API (see ``rest``). ``ModelServer`` starts them over a
``ModelManager``, keeps health following what is loaded, compiles the batch sizes of
each new version, gives freed heap back once calls stop, and drains calls on SIGTERM.
Start it with ``charrnn serve`` (the flags of ``tensorflow_model_server``) or
``ModelServer(...).start()``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
import weakref
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (
    model_service_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from keras_charrnn import warmup
from keras_charrnn.errors import ConfigError
from keras_charrnn.serving import monitoring, streaming
from keras_charrnn.serving.manager import ModelManager
from keras_charrnn.serving.memory import release_freed_memory
from keras_charrnn.serving.options import ServerOptions
from keras_charrnn.serving.request_batcher import Batcher
from keras_charrnn.serving.api_keys import ApiKeys
from keras_charrnn.serving.continuation import Continuations
from keras_charrnn.serving.openai_api import OpenAIApi
from keras_charrnn.serving.rest import RestApi, RestServer
from keras_charrnn.serving.rest_tls import rest_ssl_context
from keras_charrnn.serving.servicers import ModelStatusServicer, PredictionServicer, SettingNamer
from keras_charrnn.serving.settings import HEALTH_THREADS, ServerSettings, server_credentials
from keras_charrnn.serving.signature_runner import run_batch, run_signature
from keras_charrnn.serving.streaming import StreamServicer, register_descriptor

__all__ = ["ModelServer", "ServerOptions"]

log = logging.getLogger("charrnn.serve")

HEALTH_SERVICES = (
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)
IDLE_TRIM_SECONDS = 1.0  # after this long with no model call, the heap the calls freed goes back to the system


class ModelServer:
    """A TF Serving-compatible gRPC server for keras-charrnn SavedModels.

    Args:
        options: where to listen and what to serve.
        name_setting: how whoever runs the server sets one of its settings, added to the errors a
            setting causes (``charrnn serve`` gives the flag); None: the errors name the setting alone.

    Raises:
        ConfigError: the options do not fit together, or a file they name is invalid.

    Example:

    >>> server = ModelServer(ServerOptions(port=0, model_name="shakespeare",
    ...                                    model_base_path="saved_models/shakespeare"))  # doctest: +SKIP
    >>> server.start(); print(server.port)                                            # doctest: +SKIP
    """

    def __init__(self, options: ServerOptions, name_setting: SettingNamer | None = None):
        self.options = options
        self.settings = ServerSettings.from_options(options)
        self.name_setting = name_setting
        batching = self.settings.batching
        self.batcher = None
        if batching is not None:
            self.batcher = Batcher(run_batch, batching)
            log.info("batching on: %s", ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(batching).items()))
            if self.settings.grpc_threads > options.grpc_max_threads:
                log.info(
                    "gRPC threads raised to %d (max_concurrent_requests %d + %d): batches of max_batch_size "
                    "need that many calls waiting",
                    self.settings.grpc_threads,
                    self.settings.max_concurrent_requests,
                    HEALTH_THREADS,
                )
        self.health = health.HealthServicer()
        self._warmed: dict[tuple[str, int], weakref.ref] = {}  # versions whose batch sizes are compiled
        self.manager = ModelManager(
            self.settings.models,
            options.file_system_poll_wait_seconds,
            xla=options.xla_cpu_compilation_enabled,
            allow_version_labels_for_unavailable_models=(options.allow_version_labels_for_unavailable_models),
            on_change=self._after_poll,  # every poll: new versions warmed, health follows
            on_remove=self._models_removed,
        )
        self.port: int | None = None
        self.rest_port: int | None = None
        self._rest: RestServer | None = None
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    def _after_poll(self) -> None:
        """After every version poll: new versions' batch sizes compiled, health following what is loaded."""
        if self.batcher is not None:
            self._warm_batch_sizes(self.batcher)
        self._update_health()

    def _warm_batch_sizes(self, batcher: Batcher) -> None:
        """Compiles each newly loaded version's XLA twins for every batch size the batcher pads to.

        A version's warm-up records cover the sizes given at export (1, 2, 4 and 8 by
        default); a batched call of another size would otherwise XLA-compile (about a
        second for a 2x512 LSTM) while its batch, and every call behind it, waits.
        """
        current = {
            (name, version): loaded
            for name, model in self.manager.models.items()
            for version, loaded in list(model.loaded.items())
        }
        self._warmed = {key: ref for key, ref in self._warmed.items() if current.get(key) is ref()}
        compiled = False
        for key, loaded in current.items():
            if key in self._warmed:
                continue
            self._warmed[key] = weakref.ref(loaded)  # weakly: an unloaded version's memory is not held
            requests = warmup.warmup_requests(loaded.signature_defs, batcher.allowed_batch_sizes)
            if not loaded.xla or not requests:  # the plain signatures run any batch size without compiling
                continue
            started = time.monotonic()
            try:
                for request in requests:
                    run_signature(loaded, request.model_spec.signature_name, warmup.request_arrays(request))
            except Exception as exc:  # a call of that size will compile (or fail) then, as before
                log.warning("model %s version %d: warming the batch sizes failed: %s", *key, exc)
                continue
            compiled = True
            log.info(
                "model %s version %d: ran %d call(s) to compile batch sizes %s (%.1f s)",
                *key,
                len(requests),
                batcher.allowed_batch_sizes,
                time.monotonic() - started,
            )
        if compiled:
            release_freed_memory()  # the compiler's freed heap goes back to the system

    def _update_health(self) -> None:
        """Health: SERVING while every model has a version AVAILABLE ("" and the service names), per model too."""
        serving = self.manager.serving()
        status = health_pb2.HealthCheckResponse
        overall = status.SERVING if serving and all(serving.values()) else status.NOT_SERVING
        for name in ("", *HEALTH_SERVICES):
            self.health.set(name, overall)
        for name, ready in serving.items():
            self.health.set(name, status.SERVING if ready else status.NOT_SERVING)

    def start(self) -> int:
        """Loads the models, then listens (gRPC, and REST with a ``rest_api_port``).

        Returns:
            The gRPC port (useful with port 0).

        Raises:
            ConfigError: the TLS config is invalid, or the port cannot be listened on.
        """
        credentials = server_credentials(self.options.ssl_config_file)
        self.manager.start()
        release_freed_memory()  # loading and XLA compiling at warm-up leave much freed heap behind
        self._watch_model_config()
        limit = self.options.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.settings.grpc_threads),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction = PredictionServicer(
            self.manager,
            self.batcher,
            self.settings.limits,
            self.settings.max_concurrent_requests,
            self.options.max_message_bytes,
            self.name_setting,
        )
        model_status = ModelStatusServicer(self.manager, self.name_setting)
        streams = StreamServicer(prediction, self.options.max_concurrent_streams)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(model_status, server)
        server.add_generic_rpc_handlers((streams.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        register_descriptor()
        names = (
            *HEALTH_SERVICES,
            streaming.SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        address = f"{self.options.host}:{self.options.port}"
        try:
            self.port = (
                server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
            )
        except RuntimeError:  # grpc's "failed to bind": the port is taken or the host is not this machine's
            self.port = 0
        if not self.port:
            self.manager.stop()
            raise ConfigError(
                f"cannot listen on {address} (is the port in use, and is host an address of this machine?)"
            )
        if self.options.rest_api_port:
            self._start_rest(prediction, model_status)
        server.start()
        self._server = server
        self._update_health()
        threading.Thread(target=self._trim_when_idle, args=(prediction,), name="charrnn-idle-trim", daemon=True).start()
        log.info("listening on %s:%d (%s)", self.options.host, self.port, "TLS" if credentials else "plaintext")
        return self.port

    def _trim_when_idle(self, prediction: PredictionServicer) -> None:
        """Once the model calls stop for ``IDLE_TRIM_SECONDS``, gives the heap they freed back (``malloc_trim``).

        A load of many concurrent calls (batches, their requests and responses, the gRPC
        threads) leaves freed heap that glibc's malloc keeps; trimmed once per busy spell,
        when no call has run for a second, so no call pays for it.
        """
        trimmed_at = time.monotonic()
        while not self._stopped.wait(IDLE_TRIM_SECONDS):
            ran_at = prediction.ran_at
            if ran_at > trimmed_at and time.monotonic() - ran_at >= IDLE_TRIM_SECONDS:
                trimmed_at = time.monotonic()
                release_freed_memory()

    def _start_rest(self, prediction: PredictionServicer, model_status: ModelStatusServicer) -> None:
        """Starts the REST API (with the playground, and the metrics if the monitoring config enables them)."""
        timeout_ms = self.options.rest_api_timeout_in_ms
        timeout_s = timeout_ms / 1000 if timeout_ms > 0 else None
        api = RestApi(prediction, model_status, timeout_s, self.name_setting)
        try:
            keys = ApiKeys(self.options.api_key_file) if self.options.api_key_file else None
            signer = Continuations.from_file(self.options.continuation_key_file)
            openai = OpenAIApi(prediction, timeout_s, self.name_setting, signer)
            prometheus = monitoring.read_monitoring_config(self.options.monitoring_config_file)
            self._rest = RestServer(
                api,
                self.options.host,
                self.options.rest_api_port,
                self.options.max_message_bytes,
                prometheus.path if prometheus.enable else None,
                list(self.manager.models),
                self.settings.limits.max_chars_per_call,
                self.options.rest_api_num_threads,
                openai.handle,
                keys,
                rest_ssl_context(self.options.ssl_config_file),
            )
        except BaseException:
            self.manager.stop()
            raise
        self.rest_port = self._rest.start()
        log.info(
            "REST API on %s:%d (%s%s)%s",
            self.options.host,
            self.rest_port,
            "TLS" if self.options.ssl_config_file else "plaintext",
            ", API keys" if keys is not None else "",
            f", Prometheus metrics at {prometheus.path}" if prometheus.enable else "",
        )

    def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets the calls in flight finish (up to ``grace`` seconds), then stops."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.options.shutdown_grace_seconds if grace is None else grace
        if self._rest is not None:
            self._rest.stop(grace)
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.close()
        self.manager.stop()
        log.info("stopped")

    def wait(self) -> None:
        """Blocks until ``stop``."""
        self._stopped.wait()

    def serve_until_signal(self) -> None:
        """Runs until SIGTERM or SIGINT, then drains the calls in flight and returns."""
        received = threading.Event()

        def on_signal(signum, frame):
            log.info("received %s: draining", signal.Signals(signum).name)
            received.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not received.wait(0.5) and not self._stopped.is_set():
            pass
        self.stop()

    def _watch_model_config(self) -> None:
        """Rereads ``model_config_file`` every ``model_config_file_poll_wait_seconds`` (models added, removed,
        relabelled live); a removed model's health turns NOT_SERVING (``_models_removed``)."""
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            self.manager.watch_config_file(
                self.options.model_config_file, self.options.model_config_file_poll_wait_seconds
            )

    def _models_removed(self, names: list[str]) -> None:
        """Health of models a config reload removed: NOT_SERVING."""
        for name in names:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
