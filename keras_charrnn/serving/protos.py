"""TF Serving configuration messages that the tensorflow-serving-api wheel lacks.

``BatchingParameters`` (tensorflow_serving/servables/tensorflow/session_bundle_config.proto),
``SSLConfig`` (tensorflow_serving/config/ssl_config.proto) and ``MonitoringConfig``
(tensorflow_serving/config/monitoring_config.proto), with TF Serving's
field names and numbers, so ``--batching_parameters_file`` and
``--ssl_config_file`` take the same text files as ``tensorflow_model_server``.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool, wrappers_pb2  # noqa: F401  (registers wrappers.proto)

from keras_charrnn.serving.schema import make_messages

_messages = make_messages(
    "keras_charrnn/tf_serving_config.proto", "tensorflow.serving",
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
