"""What a client reads of a served model: its advertised request limits, and the facts a session needs.

GetModelMetadata's ``metadata["limits"]`` (this package's server advertises its
``ServingLimits``; a stock TF Serving advertises none) and the model's ``metadata``
signature (its exported config: the state names, sizes and caps; its vocabulary)
make the ``ModelInfo`` of a version. The states are the ones the config declares,
checked against the generate signatures' inputs. TensorFlow-free, as the client is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np
from google.protobuf import struct_pb2, wrappers_pb2

from keras_charrnn.errors import InputError
from keras_charrnn.serving.limits import ServingLimits
from keras_charrnn.session import ModelInfo

__all__ = ["LIMIT_NAMES", "advertised_limits", "model_info"]

# Request limits a server may advertise in GetModelMetadata (``metadata["limits"]``), positive integers.
LIMIT_NAMES = tuple(f.name for f in dataclasses.fields(ServingLimits)) + (
    "max_message_bytes",
    "max_concurrent_streams",
    "segment_chars",
)


def model_info(
    model: str,
    version: int,
    signature_defs: Mapping,
    metadata: Mapping[str, np.ndarray],
    advertised: Mapping[str, int],
    client_limits: Mapping[str, int],
) -> ModelInfo:
    """The facts a session needs of one version of a served model.

    Args:
        model: the model's name.
        version: the version.
        signature_defs: its SignatureDefs by name (GetModelMetadata's).
        metadata: the outputs of its ``metadata`` signature (``config``, ``vocabulary``).
        advertised: the limits its server advertises.
        client_limits: the client's own limits (the lower value wins).

    Returns:
        The model's info: its states from its config, its signatures and vocabulary, the limits.

    Raises:
        InputError: a generate signature disagrees with the states the config declares.
    """
    config = json.loads(metadata["config"].reshape(-1)[0].decode("utf-8"))
    vocabulary = [c.decode("utf-8") for c in metadata["vocabulary"].reshape(-1)] if "vocabulary" in metadata else None
    limits = {**advertised, **_limits_dict(config.get("limits"))}
    for name, value in client_limits.items():
        limits[name] = min(value, limits.get(name, value))
    info = ModelInfo.from_config(model, config, version, limits, signatures=signature_defs, vocabulary=vocabulary)
    _check_states(model, info, signature_defs)
    return info


def _check_states(model: str, info: ModelInfo, sigs: Mapping) -> None:
    """Every state the model's config declares is an input of each generate signature, of its width.

    Raises:
        InputError: a signature disagrees with the config (not a model this client can keep sessions on).
    """
    for name in ("generate_text", "generate_text_v2"):
        if name not in sigs:
            continue
        inputs = sigs[name].inputs
        widths = {k: inputs[k].tensor_shape.dim[1].size if k in inputs else None for k in info.state_names}
        if any(w != info.state_size for w in widths.values()):
            raise InputError(
                f"model {model!r}: signature {name} takes states {widths}, but its metadata declares "
                f"{info.state_names} of width {info.state_size}"
            )


def _limits_dict(value) -> dict[str, int]:
    """The known request limits in ``value`` (a dict, or JSON text of one); others are ignored."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    if not isinstance(value, dict):
        return {}
    return {
        k: int(v)
        for k, v in value.items()
        if k in LIMIT_NAMES and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1
    }


def advertised_limits(response) -> dict[str, int]:
    """Request limits a server puts in GetModelMetadata's ``metadata`` map, under ``"limits"``.

    Read as JSON text (a ``google.protobuf.StringValue``/``BytesValue``) or a ``Struct``;
    a stock TF Serving advertises none.

    Args:
        response: a ``GetModelMetadataResponse``.

    Returns:
        The known limits by name (others are ignored).
    """
    if "limits" not in response.metadata:
        return {}
    packed = response.metadata["limits"]
    for message in (wrappers_pb2.StringValue(), wrappers_pb2.BytesValue(), struct_pb2.Struct()):
        if packed.Is(message.DESCRIPTOR):
            packed.Unpack(message)
            if isinstance(message, struct_pb2.Struct):
                return _limits_dict(dict(message))
            return _limits_dict(message.value)
    return {}
