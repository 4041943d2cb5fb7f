"""The model server's settings: ``ServerOptions``, one field per ``charrnn serve`` flag.

The field names are ``tensorflow_model_server``'s flag names; each field's metadata holds its
help text, and ``charrnn serve`` makes one flag per field from it (``--model_name``: the names
keep their underscores, as TF Serving's do). The defaults here are the only copy: the server,
the REST server and the CLI all read them.

Pure Python, no TensorFlow import, so ``charrnn serve --help`` is instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keras_charrnn.serving.limits import ServingLimits

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_REST_NUM_THREADS",
    "DEFAULT_REST_PORT",
    "DEFAULT_REST_TIMEOUT_MS",
    "MAX_MESSAGE_BYTES",
    "ServerOptions",
]

DEFAULT_PORT = 8500  # tensorflow_model_server's --port
DEFAULT_HOST = "0.0.0.0"
DEFAULT_REST_PORT = 8501  # the REST port TF Serving's docs use (RestServer's default; the server's is 0: none)
DEFAULT_REST_TIMEOUT_MS = 30000  # tensorflow_model_server's --rest_api_timeout_in_ms
DEFAULT_REST_NUM_THREADS = 16
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the largest request (gRPC message, REST body) accepted


def _option(default, help: str, positive: bool = False, true_false: bool = False):
    """A field with its default and its flag's help.

    Args:
        default: the default value.
        help: the flag's help text (the CLI adds the default).
        positive: the flag takes a positive integer.
        true_false: a boolean flag that takes ``true``/``false`` (``--flag`` alone: true), as TF Serving's do;
            other boolean fields are switches (``--flag``: true).
    """
    return field(default=default, metadata={"help": help, "positive": positive, "true_false": true_false})


@dataclass
class ServerOptions:
    """The server's settings; the names are ``tensorflow_model_server``'s flags.

    Example:

    >>> ServerOptions(model_name="chars", model_base_path="saved_models/chars").port
    8500
    """

    port: int = _option(DEFAULT_PORT, "gRPC port (0 picks a free one)")
    host: str = _option(DEFAULT_HOST, "address to listen on")
    model_name: str | None = _option(None, "name of the single model to serve")
    model_base_path: str | None = _option(None, "folder of its numbered versions")
    model_config_file: str | None = _option(None, "ModelServerConfig text file (serving/models.config)")
    enable_batching: bool = _option(False, "merge concurrent calls into batches")
    batching_parameters_file: str | None = _option(None, "BatchingParameters text file")
    file_system_poll_wait_seconds: float = _option(1.0, "how often to look for new versions (0: only at start)")
    ssl_config_file: str | None = _option(None, "SSLConfig text file (TLS, mutual TLS; the gRPC and REST ports)")
    api_key_file: str | None = _option(
        None, "file of API keys, one a line, reread when it changes: REST routes then need 'Authorization: Bearer KEY'"
    )
    continuation_key_file: str | None = _option(
        None, "secret key file (the same on every replica): /v1/completions then offers signed continuation tokens"
    )
    grpc_max_threads: int = _option(
        32,
        "gRPC threads answering calls (with batching on, raised to the automatic "
        "max_concurrent_requests + 8 when that is more)",
        positive=True,
    )
    max_message_bytes: int = _option(
        MAX_MESSAGE_BYTES, "largest request accepted (larger: RESOURCE_EXHAUSTED)", positive=True
    )
    max_chars_per_call: int = _option(
        ServingLimits.max_chars_per_call, "cap on num_chars of one row of a call", positive=True
    )
    max_prime_chars: int = _option(
        ServingLimits.max_prime_chars,
        "cap on the characters of one row's prime (its UTF-8 bytes are checked first)",
        positive=True,
    )
    max_ids_length: int = _option(
        ServingLimits.max_ids_length, "cap on ids per row (T) of step, inspect and generate calls", positive=True
    )
    max_rows_per_call: int = _option(
        ServingLimits.max_rows_per_call, "cap on the rows (batch dimension) of one call", positive=True
    )
    max_request_elements: int = _option(
        ServingLimits.max_request_elements,
        "cap on the elements all of a request's tensors claim together",
        positive=True,
    )
    max_stops: int = _option(
        ServingLimits.max_stops, "cap on the stop strings of one row (at most the models' cap, 4)", positive=True
    )
    max_stop_chars: int = _option(
        ServingLimits.max_stop_chars, "cap on the characters of one stop string (at most 32)", positive=True
    )
    max_logprobs: int = _option(
        ServingLimits.max_logprobs,
        "cap on logprobs of one row: the alternatives scored per character (at most 10)",
        positive=True,
    )
    max_concurrent_requests: int = _option(
        0,
        "Predict calls answered at once; more get RESOURCE_EXHAUSTED at once "
        "(0: grpc_max_threads - 8, at least 1, leaving threads for health "
        "and status; with batching on, at least max_batch_size x "
        "(num_batch_threads + 1), since a queued call holds its thread)",
    )
    max_concurrent_streams: int = _option(
        16,
        "StreamPredict streams open at once (each holds a gRPC thread); more get RESOURCE_EXHAUSTED "
        "(0: no cap of their own)",
    )
    shutdown_grace_seconds: float = _option(30.0, "on SIGTERM, how long calls in flight may take to finish")
    rest_api_port: int = _option(0, "port of TF Serving's REST API, /playground and the metrics (0: no REST API)")
    rest_api_num_threads: int = _option(DEFAULT_REST_NUM_THREADS, "REST requests answered at once", positive=True)
    rest_api_timeout_in_ms: int = _option(
        DEFAULT_REST_TIMEOUT_MS, "longest a REST predict waits for the batching queue (0: no limit)"
    )
    monitoring_config_file: str | None = _option(
        None, "MonitoringConfig text file (prometheus_config { enable: true }: metrics on the REST port)"
    )
    xla_cpu_compilation_enabled: bool = _option(
        True,
        "run the XLA twins of the generating signatures (false: "
        "answer them 'XLA compilation disabled', as a stock "
        "tensorflow_model_server does)",
        true_false=True,
    )
    model_config_file_poll_wait_seconds: float = _option(
        0.0, "reread model_config_file this often: models added, removed or relabelled live (0: read only at start)"
    )
    allow_version_labels_for_unavailable_models: bool = _option(
        False, "let a new version label name a version that is not loaded yet", true_false=True
    )
