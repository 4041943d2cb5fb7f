"""The server's settings worked out from its options: the models, the request budget, batching, threads and TLS.

``ServerOptions`` holds what was asked for, one field per ``charrnn serve`` flag;
``ServerSettings.from_options`` reads the files they name and checks how they fit
together, once, before anything is loaded or listened on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.config import model_server_config_pb2

from keras_charrnn.errors import ConfigError
from keras_charrnn.serving.limits import ServingLimits
from keras_charrnn.serving.options import ServerOptions
from keras_charrnn.serving.config_files import BatchingParameters, SSLConfig, read_text_proto, single_model_config
from keras_charrnn.serving.request_batcher import BatchingOptions

__all__ = [
    "HEALTH_THREADS",
    "ServerSettings",
    "batch_sizes_from_batching_parameters",
    "batching_options",
    "concurrency_cap",
    "grpc_threads",
    "model_server_config",
    "server_credentials",
    "ssl_config",
]

HEALTH_THREADS = 8  # gRPC threads that Predict calls never take: health, status and metadata always find one


@dataclass(frozen=True)
class ServerSettings:
    """What a ``ModelServer`` runs by, worked out from its ``ServerOptions``.

    Args:
        models: the models to serve (TF Serving's ``ModelServerConfig``).
        limits: the request budget of one Predict call.
        batching: the batching parameters, or None when batching is off.
        max_concurrent_requests: Predict calls in flight at once (see ``concurrency_cap``).
        grpc_threads: the gRPC server's threads (see ``grpc_threads``).

    Example:

    >>> ServerSettings.from_options(ServerOptions(model_name="m", model_base_path="saved_models/m")).grpc_threads
    32
    """

    models: model_server_config_pb2.ModelServerConfig
    limits: ServingLimits
    batching: BatchingOptions | None
    max_concurrent_requests: int
    grpc_threads: int

    @classmethod
    def from_options(cls, options: ServerOptions) -> ServerSettings:
        """Reads the model config and batching files the options name and checks the options together.

        Args:
            options: the server's options.

        Returns:
            The settings.

        Raises:
            ConfigError: a file is unreadable or invalid, or a setting is out of range (the message names it).
        """
        batching = batching_options(options.batching_parameters_file) if options.enable_batching else None
        cap = concurrency_cap(options, batching)
        return cls(
            models=model_server_config(options),
            limits=ServingLimits.from_options(options),
            batching=batching,
            max_concurrent_requests=cap,
            grpc_threads=grpc_threads(options, cap),
        )


def concurrency_cap(options: ServerOptions, batching: BatchingOptions | None = None) -> int:
    """How many Predict calls may be in flight at once (beyond it: RESOURCE_EXHAUSTED at once).

    Automatic (``max_concurrent_requests`` 0): ``grpc_max_threads - 8``, so that health,
    status and metadata calls always find a thread; with batching, at least enough calls
    to fill a batch on every batch thread and one more batch forming
    (``max_batch_size x (num_batch_threads + 1)``): a call waiting in the batching queue
    holds its gRPC thread, so a lower cap would keep every batch below ``max_batch_size``
    (``grpc_threads`` then adds the threads). A cap given is kept, and must stay below
    ``grpc_max_threads``.

    Args:
        options: the server's options.
        batching: the batching parameters when batching is on.

    Returns:
        The cap (at least 1).

    Raises:
        ConfigError: ``max_concurrent_requests`` is negative or leaves no thread for them.
    """
    cap = options.max_concurrent_requests
    if cap < 0:
        raise ConfigError(f"max_concurrent_requests must be 0 (automatic) or positive, got {cap}")
    if cap == 0:
        fill = batching.max_batch_size * (batching.num_batch_threads + 1) if batching is not None else 0
        return max(1, options.grpc_max_threads - HEALTH_THREADS, fill)
    if cap >= options.grpc_max_threads:
        raise ConfigError(
            f"max_concurrent_requests ({cap}) must be less than grpc_max_threads "
            f"({options.grpc_max_threads}), so health and status calls always find a thread"
        )
    return cap


def grpc_threads(options: ServerOptions, cap: int) -> int:
    """The gRPC server's threads: ``grpc_max_threads``, or more where the Predict cap needs them.

    Args:
        options: the server's options.
        cap: the Predict calls in flight at once (``concurrency_cap``).

    Returns:
        ``max(grpc_max_threads, cap + HEALTH_THREADS)``.
    """
    return max(options.grpc_max_threads, cap + HEALTH_THREADS)


def model_server_config(options: ServerOptions) -> model_server_config_pb2.ModelServerConfig:
    """The models to serve: ``options.model_config_file``, or ``model_name`` at ``model_base_path``.

    Args:
        options: the server's options.

    Returns:
        TF Serving's ``ModelServerConfig``.

    Raises:
        ConfigError: neither or both ways are given, or the config file is invalid.
    """
    if options.model_config_file:
        if options.model_base_path:
            raise ConfigError("give model_config_file or model_base_path, not both")
        return read_text_proto(options.model_config_file, model_server_config_pb2.ModelServerConfig())
    if not options.model_base_path:
        raise ConfigError("give model_base_path (with model_name) or model_config_file")
    return single_model_config(options.model_name or "default", options.model_base_path)


def batching_options(path: str | os.PathLike | None) -> BatchingOptions:
    """The batching parameters of a ``BatchingParameters`` text file; the defaults for what it leaves out.

    Args:
        path: the file (TF Serving's ``batching_parameters_file``), or None for the defaults.

    Returns:
        The options.

    Raises:
        ConfigError: the file is unreadable or invalid.
    """
    if not path:
        return BatchingOptions()
    parsed = read_text_proto(path, BatchingParameters())
    given = {
        f.name: getattr(parsed, f.name).value
        for f in dataclasses.fields(BatchingOptions)
        if f.name != "allowed_batch_sizes" and parsed.HasField(f.name)
    }
    return BatchingOptions(**given, allowed_batch_sizes=tuple(parsed.allowed_batch_sizes))


def batch_sizes_from_batching_parameters(path: str | os.PathLike) -> list[int]:
    """The batch sizes a ``batching_parameters_file`` makes calls come in (what ``charrnn export`` warms up).

    ``allowed_batch_sizes`` when the file gives them (TF Serving pads every batch to
    one of them), else the sizes the embedded server pads to: the powers of two
    below ``max_batch_size``, then ``max_batch_size``.

    Args:
        path: a ``BatchingParameters`` text file (e.g. ``serving/batching_parameters.txt``).

    Returns:
        Increasing batch sizes.

    Raises:
        ConfigError: the file cannot be read or parsed; the message names ``batching_parameters_file``.

    Example:

    >>> batch_sizes_from_batching_parameters("serving/batching_parameters.txt")  # doctest: +SKIP
    [1, 2, 4, 8, 16, 32, 64]
    """
    try:
        options = batching_options(path)
    except ConfigError as exc:
        raise ConfigError(f"batching_parameters_file {exc}") from None
    return options.padded_sizes()


def ssl_config(path: str | os.PathLike) -> SSLConfig:
    """An ``SSLConfig`` text file (TF Serving's ``ssl_config_file``), checked: what the gRPC and REST ports serve.

    Args:
        path: the file.

    Returns:
        The config (PEM texts inline, as TF Serving takes them).

    Raises:
        ConfigError: the file is unreadable or invalid, lacks ``server_key`` or ``server_cert``,
            or sets ``client_verify`` without ``custom_ca``.
    """
    ssl = read_text_proto(path, SSLConfig())
    if not ssl.server_key or not ssl.server_cert:
        raise ConfigError(f"{Path(path)}: server_key and server_cert are required")
    if ssl.client_verify and not ssl.custom_ca:
        raise ConfigError(f"{Path(path)}: client_verify needs custom_ca")
    return ssl


def server_credentials(path: str | os.PathLike | None) -> grpc.ServerCredentials | None:
    """The gRPC server's TLS credentials from an ``SSLConfig`` text file (TF Serving's ``ssl_config_file``).

    Args:
        path: the file, or None for plaintext.

    Returns:
        The credentials (mutual TLS when the file sets ``client_verify``), or None.

    Raises:
        ConfigError: the file is unreadable or invalid, lacks ``server_key`` or ``server_cert``,
            or sets ``client_verify`` without ``custom_ca``.
    """
    if not path:
        return None
    ssl = ssl_config(path)
    return grpc.ssl_server_credentials(
        [(ssl.server_key.encode(), ssl.server_cert.encode())],
        root_certificates=ssl.custom_ca.encode() if ssl.custom_ca else None,
        require_client_auth=ssl.client_verify,
    )
