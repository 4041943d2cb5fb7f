"""TF Serving's text config files: the config messages the tensorflow-serving-api wheel lacks, and their reading.

``BatchingParameters`` (tensorflow_serving/servables/tensorflow/session_bundle_config.proto),
``SSLConfig`` (tensorflow_serving/config/ssl_config.proto) and ``MonitoringConfig``
(tensorflow_serving/config/monitoring_config.proto), with TF Serving's
field names and numbers, so ``batching_parameters_file``, ``ssl_config_file`` and
``monitoring_config_file`` take the same text files as ``tensorflow_model_server``'s.

``read_text_proto`` and ``parse_text_proto`` read any of TF Serving's text-format config files.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import descriptor_pool, text_format, wrappers_pb2  # noqa: F401  (registers wrappers.proto)
from google.protobuf.message import Message
from tensorflow_serving.config import model_server_config_pb2

from keras_charrnn.errors import ConfigError
from keras_charrnn.serving.schema import make_messages

_messages = make_messages(
    "keras_charrnn/tf_serving_config.proto",
    "tensorflow.serving",
    {
        "BatchingParameters": [
            ("max_batch_size", 1, ".google.protobuf.Int64Value", False),
            ("batch_timeout_micros", 2, ".google.protobuf.Int64Value", False),
            ("max_enqueued_batches", 3, ".google.protobuf.Int64Value", False),
            ("num_batch_threads", 4, ".google.protobuf.Int64Value", False),
            ("thread_pool_name", 5, ".google.protobuf.StringValue", False),
            ("allowed_batch_sizes", 6, "int64", True),
            ("pad_variable_length_inputs", 7, "bool", False),
        ],
        "SSLConfig": [
            ("server_key", 1, "string", False),
            ("server_cert", 2, "string", False),
            ("custom_ca", 3, "string", False),
            ("client_verify", 4, "bool", False),
        ],
        "PrometheusConfig": [("enable", 1, "bool", False), ("path", 2, "string", False)],
        "MonitoringConfig": [("prometheus_config", 1, "PrometheusConfig", False)],
    },
    dependencies=("google/protobuf/wrappers.proto",),
    pool=descriptor_pool.DescriptorPool(),
)
BatchingParameters = _messages["BatchingParameters"]
SSLConfig = _messages["SSLConfig"]
MonitoringConfig = _messages["MonitoringConfig"]  # tensorflow_serving/config/monitoring_config.proto


def parse_text_proto(text: str, message: Message) -> Message:
    """Parses protobuf text format into ``message``.

    Args:
        text: the file's text.
        message: an empty message of the text's type; it is filled in.

    Returns:
        ``message``.

    Raises:
        ConfigError: the text does not parse as that message ("not a valid ModelServerConfig (...)").
    """
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"not a valid {message.DESCRIPTOR.name} ({exc})") from None


def read_text_proto(path: str | os.PathLike, message: Message) -> Message:
    """Reads a protobuf text-format file (TF Serving's config files) into ``message``.

    Args:
        path: the text file.
        message: an empty message of the file's type; it is filled in.

    Returns:
        ``message``.

    Raises:
        ConfigError: the file cannot be read or does not parse as that message; the message starts
            with the path.

    Example:

    >>> read_text_proto("serving/batching_parameters.txt", BatchingParameters()).max_batch_size.value  # doctest: +SKIP
    64
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror if isinstance(exc, OSError) else exc})") from None
    try:
        return parse_text_proto(text, message)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config that ``model_name`` and ``model_base_path`` stand for.

    Args:
        name: the model's name.
        base_path: the folder of its numbered versions.

    Returns:
        A ``ModelServerConfig`` with that one model (default version policy: the latest).
    """
    config = model_server_config_pb2.ModelServerConfig()
    mc = config.model_config_list.config.add()
    mc.name, mc.base_path, mc.model_platform = name, str(Path(base_path).resolve()), "tensorflow"
    return config


def model_config_problem(config: model_server_config_pb2.ModelServerConfig) -> str:
    """What makes a config unservable, as TF Serving checks it ("" when it is fine).

    Args:
        config: a ``ModelServerConfig``.

    Returns:
        The problem, naming the model and field, or "".

    Example:

    >>> model_config_problem(model_server_config_pb2.ModelServerConfig())
    'the config has no model_config_list (only a ModelConfigList can be served)'
    """
    if config.WhichOneof("config") != "model_config_list":
        return "the config has no model_config_list (only a ModelConfigList can be served)"
    if not config.model_config_list.config:
        return "model_config_list holds no model"
    names: set[str] = set()
    for mc in config.model_config_list.config:
        if not mc.name:
            return "a model of model_config_list has no name"
        if mc.name in names:
            return f"Illegal to list model {mc.name} multiple times in config list"
        names.add(mc.name)
        if not mc.base_path:
            return f"model {mc.name}: base_path is empty"
        if mc.model_platform not in ("", "tensorflow"):
            return f"model {mc.name}: model_platform {mc.model_platform!r} is not supported (only tensorflow)"
        for label, version in mc.version_labels.items():
            if not label or version < 1:
                return (
                    f"model {mc.name}: version_labels {label!r}: {version} "
                    "(a label needs a name and a version of 1 or more)"
                )
    return ""
