"""Warm-up records: TF Serving's ``assets.extra/tf_serving_warmup_requests``.

TensorFlow Serving reads this file when it loads a version and runs every
record before the version becomes AVAILABLE; a record that fails fails the
load. The format (tensorflow_serving/servables/tensorflow/saved_model_warmup_util.cc):
a TFRecord file of serialized ``tensorflow.serving.PredictionLog`` messages,
at most 1000 of them; for a ``predict_log`` only ``request`` is used, its
``model_spec.signature_name`` picks the signature and its model name and
version are not checked.

``charrnn export`` writes one ``generate_text`` and one ``generate_text_v2``
request per batch size that calls may come in (the sizes TF Serving's batching
pads to), so the shapes are compiled at load, not on a client's first call. The
generation inputs take their defaults from ``keras_charrnn.generation``'s table;
``stop`` holds the models' ``MAX_STOPS`` empty strings, the width the embedded
server gives every call (``serving.segments.pad_stops``). The XLA twins are not in
the file by default: a server without XLA JIT would fail the load on them (see
``keras_charrnn.xla``); the embedded server warms them anyway, since it runs
the twin for every ``generate_text`` call when it has XLA.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from keras_charrnn import generation
from keras_charrnn.errors import ConfigError, InputError

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # TF Serving's WarmupConsts::kMaxNumRecords: more fails the load
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)  # one row per session call, and small merged batches
WARMUP_SIGNATURES = ("generate_text", "generate_text_v2")  # what sessions, the client and the playground call
WARMUP_NUM_CHARS = 2  # the sampling loop runs its body once


def warmup_path(version_dir: str | os.PathLike) -> Path:
    """Where a version's warm-up records live: ``VERSION/assets.extra/tf_serving_warmup_requests``."""
    return Path(version_dir) / ASSETS_EXTRA / WARMUP_FILE


def check_batch_sizes(batch_sizes: Iterable[int], signatures: Sequence[str]) -> list[int]:
    """Validates warm-up batch sizes; returns them sorted without repeats.

    Raises:
        ConfigError: a size is not a positive integer, or there would be over ``MAX_RECORDS`` records.
    """
    sizes = sorted(set(batch_sizes))
    if not sizes or any(not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ConfigError(f"warmup_batch_sizes must be positive integers, got {list(batch_sizes)}")
    if len(sizes) * len(signatures) > MAX_RECORDS:
        raise ConfigError(
            f"warmup_batch_sizes: {len(sizes)} sizes x {len(signatures)} signatures is over "
            f"TF Serving's limit of {MAX_RECORDS} warm-up records"
        )
    return [int(b) for b in sizes]


def _example_input(name: str, info, batch: int) -> np.ndarray:
    """A valid value of one input: a newline prime, zero states, the table's defaults (seed 0, 2 characters)."""
    dtype = tf.dtypes.as_dtype(info.dtype).as_numpy_dtype
    dims = [d.size for d in info.tensor_shape.dim]
    spec = generation.BY_NAME.get(name)
    if spec is not None:
        overrides = {"num_chars": WARMUP_NUM_CHARS, "seed": 0, "stop": ("",) * generation.MAX_STOPS}
        vocab_size = dims[1] if spec.row_shape == ("vocab",) else 0
        return spec.column(batch, generation.context(vocab_size), overrides.get(name)).astype(dtype)
    if info.dtype == tf.string.as_datatype_enum:
        return np.array([b"\n"] * batch, dtype=object)
    if name == "ids":
        return np.ones([batch, 1], dtype)
    return np.zeros([batch if i == 0 else d for i, d in enumerate(dims)], dtype)


def _tensor_proto(value: np.ndarray):
    """A TensorProto of ``value``; a numeric one of equal elements as one value and a shape (TF fills the rest)."""
    if value.dtype != object and value.size > 1 and (value == value.flat[0]).all():
        return tf.make_tensor_proto(value.flat[0], shape=value.shape)
    return tf.make_tensor_proto(value)


def warmup_requests(
    signature_defs: Mapping,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    signatures: Sequence[str] = WARMUP_SIGNATURES,
) -> list[predict_pb2.PredictRequest]:
    """One PredictRequest per (signature, batch size), with inputs made from the SignatureDefs.

    Args:
        signature_defs: the export's SignatureDefs by name (a ``MetaGraphDef.signature_def``).
        batch_sizes: the batch sizes to warm.
        signatures: the signatures to warm; those the export lacks are skipped.

    Returns:
        The requests (their ``model_spec`` names only the signature).

    Raises:
        ConfigError: bad batch sizes, or too many records.
    """
    present = [s for s in signatures if s in signature_defs]
    requests = []
    for signature in present:
        for batch in check_batch_sizes(batch_sizes, present):
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            for name, info in signature_defs[signature].inputs.items():
                request.inputs[name].CopyFrom(_tensor_proto(_example_input(name, info, batch)))
            requests.append(request)
    return requests


def write_warmup_file(version_dir: str | os.PathLike, requests: Sequence[predict_pb2.PredictRequest]) -> Path:
    """Writes ``requests`` as TF Serving's warm-up records into a (not yet published) version folder.

    Args:
        version_dir: the SavedModel folder being built.
        requests: at most ``MAX_RECORDS`` requests.

    Returns:
        The file written.

    Raises:
        ConfigError: more than ``MAX_RECORDS`` requests.
    """
    if len(requests) > MAX_RECORDS:
        raise ConfigError(f"{len(requests)} warm-up requests: TF Serving reads at most {MAX_RECORDS}")
    path = warmup_path(version_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog()
            log.predict_log.request.CopyFrom(request)
            writer.write(log.SerializeToString())
    return path


def read_warmup_file(version_dir: str | os.PathLike) -> list[prediction_log_pb2.PredictionLog]:
    """The warm-up records of a version, as TF Serving reads them.

    Args:
        version_dir: a SavedModel version folder.

    Returns:
        The records; empty when the version has no warm-up file (warm-up is optional).

    Raises:
        InputError: the file is not a TFRecord file of PredictionLogs, or holds over ``MAX_RECORDS``.
    """
    path = warmup_path(version_dir)
    if not path.is_file():
        return []
    records: list[prediction_log_pb2.PredictionLog] = []
    try:
        for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            if len(records) == MAX_RECORDS:
                raise InputError(f"{path}: number of warmup records exceeds the maximum ({MAX_RECORDS})")
            log = prediction_log_pb2.PredictionLog()
            try:
                log.ParseFromString(raw)
            except Exception:  # protobuf's DecodeError
                raise InputError(f"{path}: failed to parse a warmup record") from None
            records.append(log)
    except tf.errors.DataLossError as exc:
        raise InputError(f"{path}: {exc.message}. Please verify your warmup data is in TFRecord format.") from None
    return records


def request_arrays(request: predict_pb2.PredictRequest) -> dict[str, np.ndarray]:
    """A PredictRequest's inputs as NumPy arrays (strings as ``bytes`` objects)."""
    return {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}


def replay(version_dir: str | os.PathLike, run: Callable[[str, dict[str, np.ndarray]], object]) -> int:
    """Runs every warm-up record of a version, in order, as TF Serving does at load.

    Only ``predict_log`` records are run (this model serves Predict only); other
    kinds are skipped.

    Args:
        version_dir: the version folder.
        run: ``run(signature_name, inputs)`` calls the loaded version; its errors propagate
            (a failed warm-up is a failed load).

    Returns:
        The number of records read.

    Raises:
        InputError: the file is malformed or too long.
    """
    records = read_warmup_file(version_dir)
    for log in records:
        if log.WhichOneof("log_type") != "predict_log":
            continue
        request = log.predict_log.request
        run(request.model_spec.signature_name or "serving_default", request_arrays(request))
    return len(records)
