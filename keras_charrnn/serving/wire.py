"""Light, wire-compatible copies of the TF Serving messages the client sends and receives.

Importing ``tensorflow_serving.apis`` imports all of TensorFlow (seconds, and
hundreds of MB). The client needs only a handful of messages, so this module
builds them from their field numbers (TF Serving's and TensorFlow's own) in a
private descriptor pool, and converts tensors to and from NumPy by hand.
They carry the same full names as the real ones, so ``Any`` packing works,
and ``tests/test_wire_compat.py`` checks that every message parses as the real
message of the same name, and back.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import any_pb2, descriptor_pool, wrappers_pb2  # noqa: F401  (registers their files)

from keras_charrnn.errors import InputError
from keras_charrnn.serving.schema import make_messages

_pool = descriptor_pool.DescriptorPool()

DT_FLOAT, DT_INT32, DT_STRING, DT_INT64, DT_BOOL = 1, 3, 7, 9, 10

_tf = make_messages(
    "keras_charrnn/light_tensorflow.proto",
    "tensorflow",
    {
        "TensorShapeProto_Dim": [("size", 1, "int64", False), ("name", 2, "string", False)],
        "TensorShapeProto": [("dim", 2, "TensorShapeProto_Dim", True), ("unknown_rank", 3, "bool", False)],
        "TensorProto": [
            ("dtype", 1, "enum:DataType", False),
            ("tensor_shape", 2, "TensorShapeProto", False),
            ("version_number", 3, "int32", False),
            ("tensor_content", 4, "bytes", False),
            ("half_val", 13, "int32", True),
            ("float_val", 5, "float", True),
            ("double_val", 6, "double", True),
            ("int_val", 7, "int32", True),
            ("string_val", 8, "bytes", True),
            ("int64_val", 10, "int64", True),
            ("bool_val", 11, "bool", True),
        ],
        "TensorInfo": [
            ("name", 1, "string", False),
            ("dtype", 2, "enum:DataType", False),
            ("tensor_shape", 3, "TensorShapeProto", False),
        ],
        "SignatureDef": [
            ("inputs", 1, ("map", "string", "TensorInfo"), False),
            ("outputs", 2, ("map", "string", "TensorInfo"), False),
            ("method_name", 3, "string", False),
        ],
    },
    enums={
        "DataType": {
            "DT_INVALID": 0,
            "DT_FLOAT": DT_FLOAT,
            "DT_INT32": DT_INT32,
            "DT_STRING": DT_STRING,
            "DT_INT64": DT_INT64,
            "DT_BOOL": DT_BOOL,
        }
    },
    pool=_pool,
)
_serving = make_messages(
    "keras_charrnn/light_tensorflow_serving.proto",
    "tensorflow.serving",
    {
        "ModelSpec": [
            ("name", 1, "string", False),
            ("version", 2, ".google.protobuf.Int64Value", False),
            ("version_label", 4, "string", False),
            ("signature_name", 3, "string", False),
        ],
        "PredictRequest": [
            ("model_spec", 1, "ModelSpec", False),
            ("inputs", 2, ("map", "string", ".tensorflow.TensorProto"), False),
            ("output_filter", 3, "string", True),
        ],
        "PredictResponse": [
            ("model_spec", 2, "ModelSpec", False),
            ("outputs", 1, ("map", "string", ".tensorflow.TensorProto"), False),
        ],
        "GetModelMetadataRequest": [("model_spec", 1, "ModelSpec", False), ("metadata_field", 2, "string", True)],
        "GetModelMetadataResponse": [
            ("model_spec", 1, "ModelSpec", False),
            ("metadata", 2, ("map", "string", ".google.protobuf.Any"), False),
        ],
        "SignatureDefMap": [("signature_def", 1, ("map", "string", ".tensorflow.SignatureDef"), False)],
    },
    dependencies=(
        "keras_charrnn/light_tensorflow.proto",
        "google/protobuf/wrappers.proto",
        "google/protobuf/any.proto",
    ),
    pool=_pool,
)

TensorProto = _tf["TensorProto"]
TensorShapeProto = _tf["TensorShapeProto"]
TensorInfo = _tf["TensorInfo"]
SignatureDef = _tf["SignatureDef"]
ModelSpec = _serving["ModelSpec"]
PredictRequest = _serving["PredictRequest"]
PredictResponse = _serving["PredictResponse"]
GetModelMetadataRequest = _serving["GetModelMetadataRequest"]
GetModelMetadataResponse = _serving["GetModelMetadataResponse"]
SignatureDefMap = _serving["SignatureDefMap"]

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"

_NUMPY_OF = {DT_FLOAT: np.float32, DT_INT32: np.int32, DT_INT64: np.int64, DT_BOOL: np.bool_}
_DTYPE_OF = {np.dtype(v): k for k, v in _NUMPY_OF.items()}
_VALUES_FIELD = {DT_FLOAT: "float_val", DT_INT32: "int_val", DT_INT64: "int64_val", DT_BOOL: "bool_val"}
_LITTLE_ENDIAN = {k: np.dtype(v).newbyteorder("<") for k, v in _NUMPY_OF.items()}  # the wire's byte order
_NATIVE = {k: np.dtype(v) for k, v in _NUMPY_OF.items()}


def dtype_of(value: np.ndarray) -> int:
    """The TensorProto ``DataType`` of a NumPy array: ``DT_STRING`` for bytes/str objects.

    Args:
        value: the array.

    Returns:
        The ``DataType`` enum value (``DT_FLOAT``, ``DT_INT32``, ``DT_INT64``, ``DT_BOOL`` or ``DT_STRING``).

    Raises:
        InputError: the array's dtype has no TensorProto dtype here (e.g. float64); the message names ``value``.

    Example:

    >>> dtype_of(np.zeros(2, np.int32)) == DT_INT32
    True
    """
    if value.dtype == object or value.dtype.kind in "SU":
        return DT_STRING
    if value.dtype not in _DTYPE_OF:
        raise InputError(
            f"value: a {value.dtype} array has no TensorProto dtype here; give float32, int32, int64, bool or strings"
        )
    return _DTYPE_OF[value.dtype]


def to_tensor_proto(value: np.ndarray, into=None):
    """A NumPy array (numbers, or bytes/str objects) as a TensorProto, as ``tf.make_tensor_proto`` would.

    Args:
        value: the array (anything ``np.asarray`` takes).
        into: a light or a real (tensorflow) TensorProto to fill (the fields are the same); None: a new light one.

    Returns:
        The TensorProto.

    Raises:
        InputError: ``value``'s dtype has no TensorProto dtype here (see ``dtype_of``).
    """
    value = np.asarray(value)
    dtype = dtype_of(value)
    proto = into if into is not None else TensorProto()
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    proto.dtype = dtype
    if dtype == DT_STRING:
        proto.string_val.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value.reshape(-1))
        return proto
    proto.tensor_content = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    return proto


def from_tensor_proto(proto, max_elements: int | None = None) -> np.ndarray:
    """A TensorProto as a NumPy array (strings come back as ``bytes`` objects).

    The claimed shape is checked before anything is allocated: TensorProto
    repeats its last value to fill the shape, so a few bytes may claim any size.

    Args:
        proto: a TensorProto (light or real).
        max_elements: the most elements the tensor may claim (None: no limit).

    Returns:
        The array.

    Raises:
        ValueError: a negative dimension, an unknown rank, more than ``max_elements``
            elements, or content that does not fit the shape.
    """
    tensor_shape = proto.tensor_shape
    if tensor_shape.unknown_rank:
        raise ValueError("the tensor's shape has an unknown rank")
    shape = [d.size for d in tensor_shape.dim]
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    count = math.prod(shape)
    if max_elements is not None and count > max_elements:
        raise ValueError(f"shape {shape} claims {count} elements, more than {max_elements}")
    dtype_enum = proto.dtype
    if dtype_enum == DT_STRING:
        values = list(proto.string_val)
        if len(values) > max(count, 1):
            raise ValueError(f"{len(values)} values for shape {shape}")
        if values and len(values) < count:  # TF's convention: the last value fills the rest
            values = values + values[-1:] * (count - len(values))
        elif not values:
            values = [b""] * count
        return np.array(values, dtype=object).reshape(shape)
    if dtype_enum not in _NUMPY_OF:
        raise TypeError(f"unsupported tensor dtype {dtype_enum}")
    content = proto.tensor_content  # read once: each read of a bytes field copies it
    if content:
        return np.frombuffer(content, dtype=_LITTLE_ENDIAN[dtype_enum]).astype(_NATIVE[dtype_enum]).reshape(shape)
    array: np.ndarray = np.array(getattr(proto, _VALUES_FIELD[dtype_enum]), dtype=_NUMPY_OF[dtype_enum])
    if array.size > max(count, 1):
        raise ValueError(f"{array.size} values for shape {shape}")
    if array.size == 0:
        array = np.zeros(count, _NUMPY_OF[dtype_enum])
    elif array.size < count:  # TF's convention: the last value fills the rest
        array = np.concatenate([array, np.repeat(array[-1:], count - array.size)])
    return array.reshape(shape)


def predict_request(model: str, signature: str, inputs: dict[str, np.ndarray], version: int | None = None):
    """A light ``PredictRequest`` for ``signature`` of ``model`` (a version, or the newest) on NumPy ``inputs``.

    Args:
        model: the model's name.
        signature: the signature's name.
        inputs: its inputs by name.
        version: the version (None: the newest).

    Returns:
        The request.
    """
    request = PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        to_tensor_proto(value, request.inputs[key])
    return request
