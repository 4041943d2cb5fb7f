"""The light client's messages are wire-compatible with tensorflow-serving-api's real ones."""

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from keras_charrnn.serving import wire

ARRAYS = [
    np.array([[1.5, -2.0]], np.float32),
    np.array([3, -4], np.int32),
    np.array([2**40, -1], np.int64),
    np.array([b"ROMEO:", "ünïcode 😀".encode()], dtype=object),
    np.array([True, False]),
]


def test_the_light_dtype_numbers_are_tensorflows():
    for name in ("DT_FLOAT", "DT_INT32", "DT_STRING", "DT_INT64", "DT_BOOL"):
        assert getattr(wire, name) == getattr(types_pb2, name), name


def test_tensors_built_from_numpy_parse_as_real_tensor_protos_and_back():
    for array in ARRAYS:
        light = wire.to_tensor_proto(array)
        real = tensor_pb2.TensorProto.FromString(light.SerializeToString())
        np.testing.assert_array_equal(tf.make_ndarray(real), array)
        again = wire.TensorProto.FromString(tf.make_tensor_proto(array).SerializeToString())
        np.testing.assert_array_equal(wire.from_tensor_proto(again), array)


def test_predict_request_parses_as_the_real_message_and_back():
    light = wire.PredictRequest()
    light.model_spec.name = "shakespeare"
    light.model_spec.version.value = 3
    light.model_spec.signature_name = "generate_text"
    light.output_filter.append("text")
    for i, array in enumerate(ARRAYS):
        wire.to_tensor_proto(array, light.inputs[f"t{i}"])
    real = predict_pb2.PredictRequest.FromString(light.SerializeToString())
    assert real.model_spec.name == "shakespeare" and real.model_spec.version.value == 3
    assert list(real.output_filter) == ["text"]
    for i, array in enumerate(ARRAYS):
        np.testing.assert_array_equal(tf.make_ndarray(real.inputs[f"t{i}"]), array)
    assert wire.PredictRequest.FromString(real.SerializeToString()) == light


def test_predict_response_from_a_real_server_parses():
    real = predict_pb2.PredictResponse()
    real.model_spec.name = "m"
    real.model_spec.version.value = 2
    real.outputs["text"].CopyFrom(tf.make_tensor_proto(np.array([b"abc"], dtype=object)))
    real.outputs["h_0"].CopyFrom(tf.make_tensor_proto(np.ones([1, 4], np.float32)))
    light = wire.PredictResponse.FromString(real.SerializeToString())
    assert light.model_spec.version.value == 2
    assert wire.from_tensor_proto(light.outputs["text"])[0] == b"abc"
    np.testing.assert_array_equal(wire.from_tensor_proto(light.outputs["h_0"]), np.ones([1, 4], np.float32))
    assert predict_pb2.PredictResponse.FromString(light.SerializeToString()) == real


def test_model_metadata_messages_round_trip_with_the_real_ones():
    request = wire.GetModelMetadataRequest()
    request.model_spec.name = "m"
    request.metadata_field.append("signature_def")
    real_request = get_model_metadata_pb2.GetModelMetadataRequest.FromString(request.SerializeToString())
    assert real_request.metadata_field == ["signature_def"]

    sig_map = get_model_metadata_pb2.SignatureDefMap()
    sig = sig_map.signature_def["generate_text"]
    sig.method_name = "tensorflow/serving/predict"
    sig.inputs["h_0"].dtype = 1
    sig.inputs["h_0"].tensor_shape.dim.add(size=-1)
    sig.inputs["h_0"].tensor_shape.dim.add(size=512)
    real = get_model_metadata_pb2.GetModelMetadataResponse()
    real.model_spec.name = "m"
    real.metadata["signature_def"].Pack(sig_map)
    light = wire.GetModelMetadataResponse.FromString(real.SerializeToString())
    light_map = wire.SignatureDefMap()
    assert light.metadata["signature_def"].Unpack(light_map)
    assert light_map.signature_def["generate_text"].inputs["h_0"].tensor_shape.dim[1].size == 512
    assert get_model_metadata_pb2.GetModelMetadataResponse.FromString(light.SerializeToString()) == real


def test_an_array_without_a_tensor_dtype_is_refused_naming_the_parameter():
    import pytest

    from keras_charrnn.errors import InputError

    with pytest.raises(InputError, match=r"^value: a float64 array has no TensorProto dtype"):
        wire.to_tensor_proto(np.zeros(2, np.float64))
