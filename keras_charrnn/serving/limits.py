"""The request budget: every Predict call is measured against these limits before anything is allocated.

A ``TensorProto`` may claim a shape far larger than the values it carries
(TensorFlow repeats the last value to fill it), so a request of a few hundred
bytes can claim gigabytes. ``check_request_tensors`` reads only the claimed
shapes and the sizes of the carried bytes, and refuses a request over a limit
before any tensor is expanded; ``check_call`` then repeats, in NumPy, the
checks the model's graph makes (temperature, top_k, top_p, num_chars, prime,
position, ids), so a call that would fail in the graph never joins a batch.

The limits are ``ServerOptions`` fields (and ``charrnn serve`` flags) of the
same names, and the server advertises them in GetModelMetadata (``metadata["limits"]``, a packed
``google.protobuf.Struct``) so clients can split their work to fit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.sampling import MAX_CHARS_PER_CALL
from keras_charrnn.serving import wire

MAX_RANK = 8  # no signature takes more than 3 dimensions
UTF8_MAX_BYTES = 4  # the most bytes one character takes in UTF-8
# Bytes per item of the fixed-size dtypes, as in a TensorProto's tensor_content.
ITEM_BYTES = {wire.DT_FLOAT: 4, wire.DT_INT32: 4, wire.DT_INT64: 8, wire.DT_BOOL: 1}
_VALUE_FIELDS = ("float_val", "int_val", "int64_val", "bool_val", "double_val", "half_val")
SAMPLING_ROWS = ("num_chars", "temperature", "top_k", "top_p", "seed", "position")


@dataclass(frozen=True)
class ServingLimits:
    """What one Predict call may ask for; each field is the ``ServerOptions`` field (and flag) of its name.

    Args:
        max_prime_chars: characters of ``prime`` per row (its UTF-8 bytes are checked first:
            at most 4 bytes a character).
        max_ids_length: ids per row (T of ``ids`` [B, T]) for ``step``, ``inspect`` and ``generate``.
        max_rows_per_call: rows (the batch dimension B) of one call.
        max_chars_per_call: ``num_chars`` of one row; the server generates long calls in segments.
        max_request_elements: elements of all the request's tensors together, as their shapes claim.

    Example:

    >>> ServingLimits(max_prime_chars=100).advertised()["max_prime_chars"]
    100
    """

    max_prime_chars: int = 16384
    max_ids_length: int = 16384
    max_rows_per_call: int = 64
    max_chars_per_call: int = MAX_CHARS_PER_CALL
    max_request_elements: int = 1 << 20

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_options(cls, options) -> ServingLimits:
        """The limits a server's options set: each field is read from the option of its name.

        Args:
            options: a ``ServerOptions`` (or anything with an attribute per field).

        Returns:
            The limits.

        Raises:
            ConfigError: a limit is not a positive integer.
        """
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls)})

    def advertised(self) -> dict[str, int]:
        """The limits as a ``{name: value}`` dict (what GetModelMetadata advertises)."""
        return dataclasses.asdict(self)


def refuse(limit: str, value: int, what: str) -> ServingError:
    """The error for a request over ``limit``: names the limit and its value (its ``setting``: the limit).

    Args:
        limit: the ``ServingLimits`` field.
        value: its value on this server.
        what: what the request asked for, e.g. ``"prime of row 0 holds 3145728 bytes"``.

    Returns:
        An INVALID_ARGUMENT ``ServingError`` (retrying the same request cannot help; split it).

    Example:

    >>> refuse("max_rows_per_call", 64, "input 'ids' has 65 rows").message
    "input 'ids' has 65 rows, over this server's limit max_rows_per_call=64; split the work into smaller calls"
    """
    return ServingError(
        "INVALID_ARGUMENT",
        f"{what}, over this server's limit {limit}={value}; split the work into smaller calls",
        setting=limit,
    )


def claimed_shape(key: str, proto) -> list[int]:
    """The shape a TensorProto claims, checked: a known rank, no negative size (the rank's limit: ``check_shapes``).

    Args:
        key: the input's name (for the message).
        proto: a TensorProto (real or light).

    Returns:
        The dimension sizes.

    Raises:
        ServingError: INVALID_ARGUMENT for an unknown rank or a negative size.
    """
    if proto.tensor_shape.unknown_rank:
        raise ServingError("INVALID_ARGUMENT", f"input {key!r}: the tensor's shape has an unknown rank")
    shape = [d.size for d in proto.tensor_shape.dim]
    if any(s < 0 for s in shape):
        raise ServingError("INVALID_ARGUMENT", f"input {key!r}: negative dimension in shape {shape}")
    return shape


def _carried_values(proto) -> int:
    return max(len(getattr(proto, name)) for name in _VALUE_FIELDS if hasattr(proto, name))


def check_shapes(shapes: dict[str, list[int]], prime_bytes: int, limits: ServingLimits) -> None:
    """A request's input shapes and its longest prime against the limits: the one copy of these rules.

    Args:
        shapes: each input's shape (claimed by its TensorProto, or an array's).
        prime_bytes: the UTF-8 bytes of the longest prime (0: none); at most 4 a character.
        limits: this server's limits.

    Raises:
        ServingError: INVALID_ARGUMENT naming the input, or the limit.
    """
    total = 0
    for key in sorted(shapes):
        shape = shapes[key]
        if len(shape) > MAX_RANK:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input {key!r}: {len(shape)} dimensions, more than any signature takes ({MAX_RANK})",
            )
        count = math.prod(shape)
        total += count
        if total > limits.max_request_elements:
            raise refuse(
                "max_request_elements",
                limits.max_request_elements,
                f"the request's tensors claim {total if count < 1 << 62 else 'over 2**62'} elements "
                f"(input {key!r} has shape {shape})",
            )
        if shape and shape[0] > limits.max_rows_per_call:
            raise refuse("max_rows_per_call", limits.max_rows_per_call, f"input {key!r} has {shape[0]} rows")
        if key == "ids" and len(shape) == 2 and shape[1] > limits.max_ids_length:
            raise refuse("max_ids_length", limits.max_ids_length, f"ids has {shape[1]} ids per row")
    if prime_bytes > UTF8_MAX_BYTES * limits.max_prime_chars:
        raise refuse(
            "max_prime_chars",
            limits.max_prime_chars,
            f"prime holds {prime_bytes} bytes (more than {UTF8_MAX_BYTES} per character allowed)",
        )


def check_request_tensors(request_inputs, limits: ServingLimits) -> None:
    """Checks a request's tensors against the limits from their claimed shapes and carried sizes alone.

    Nothing is expanded or decoded: a request that claims more than the limits
    allow costs the server only this look at its shapes.

    Args:
        request_inputs: the request's ``inputs`` map (name -> TensorProto).
        limits: this server's limits.

    Raises:
        ServingError: INVALID_ARGUMENT naming the input, or the limit.
    """
    shapes = {key: claimed_shape(key, request_inputs[key]) for key in sorted(request_inputs)}
    prime = request_inputs["prime"].string_val if "prime" in request_inputs else ()
    check_shapes(shapes, max((len(v) for v in prime), default=0), limits)
    for key, shape in shapes.items():
        proto, count = request_inputs[key], math.prod(shape)
        dtype = proto.dtype
        if dtype in ITEM_BYTES:
            content_bytes = len(proto.tensor_content)  # read once: each read of a bytes field copies it
            if content_bytes:
                if content_bytes != count * ITEM_BYTES[dtype]:
                    raise ServingError(
                        "INVALID_ARGUMENT",
                        f"input {key!r}: tensor_content holds "
                        f"{content_bytes} bytes, but shape {shape} "
                        f"needs {count * ITEM_BYTES[dtype]}",
                    )
            elif _carried_values(proto) > max(count, 1):
                raise ServingError(
                    "INVALID_ARGUMENT", f"input {key!r}: {_carried_values(proto)} values for shape {shape}"
                )
        elif len(proto.string_val) > max(count, 1):
            raise ServingError("INVALID_ARGUMENT", f"input {key!r}: {len(proto.string_val)} values for shape {shape}")


def check_request_arrays(arrays: dict[str, np.ndarray], limits: ServingLimits) -> None:
    """Checks a request's NumPy inputs (e.g. decoded from REST's JSON) against the limits of ``check_shapes``.

    Args:
        arrays: the inputs by name.
        limits: this server's limits.

    Raises:
        ServingError: INVALID_ARGUMENT naming the input, or the limit.
    """
    prime = arrays["prime"].reshape(-1) if "prime" in arrays and arrays["prime"].dtype == object else ()
    check_shapes(
        {key: list(value.shape) for key, value in arrays.items()},
        max((len(v) for v in prime if isinstance(v, bytes)), default=0),
        limits,
    )


def _rows(arrays: dict[str, np.ndarray]) -> int:
    first = "prime" if "prime" in arrays else "ids" if "ids" in arrays else sorted(arrays)[0]
    return arrays[first].shape[0]


def check_call(arrays: dict[str, np.ndarray], vocab_size: int | None, limits: ServingLimits) -> None:
    """The model graph's own input checks, in NumPy, plus the per-row limits.

    A call that passes them runs without a model-side error, so it can share a
    batch with other calls without putting them at risk.

    Args:
        arrays: the call's inputs (already checked against the signature's dtypes and shapes).
        vocab_size: the model's number of ids (None: unknown, ids and top_k ranges unchecked).
        limits: this server's limits.

    Raises:
        ServingError: INVALID_ARGUMENT naming the input and the rule, or the limit.
    """
    if not arrays:
        return
    n = _rows(arrays)
    for key, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != n:
            raise ServingError(
                "INVALID_ARGUMENT", f"{key} must have one row per row of the input ({n}), got shape {list(value.shape)}"
            )
    if n == 0:
        raise ServingError("INVALID_ARGUMENT", "the batch is empty")

    def bad(message: str) -> ServingError:
        return ServingError("INVALID_ARGUMENT", message)

    if "prime" in arrays:
        for row, value in enumerate(arrays["prime"].reshape(-1)):
            if not value:
                raise bad("the input (prime) must hold at least one character")
            chars = len(value.decode("utf-8", errors="replace")) if isinstance(value, bytes) else len(str(value))
            if chars > limits.max_prime_chars:
                raise refuse("max_prime_chars", limits.max_prime_chars, f"prime of row {row} holds {chars} characters")
    if "ids" in arrays:
        ids = arrays["ids"]
        if ids.shape[1] == 0 and "num_chars" in arrays:
            raise bad("the input (prime) must hold at least one character")
        if ids.size and vocab_size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise bad(f"ids must be in [0, {vocab_size}), got values from {int(ids.min())} to {int(ids.max())}")
    for key, value in arrays.items():
        if value.dtype.kind == "f" and key not in ("temperature", "top_p") and not np.isfinite(value).all():
            raise bad(f"{key} must be finite (a state holds NaN or infinity)")
    if "num_chars" in arrays:
        num_chars = arrays["num_chars"]
        if num_chars.min() < 1:
            raise bad("num_chars must be at least 1")
        if num_chars.max() > limits.max_chars_per_call:
            raise refuse("max_chars_per_call", limits.max_chars_per_call, f"num_chars {int(num_chars.max())}")
    if "temperature" in arrays and not (np.isfinite(arrays["temperature"]) & (arrays["temperature"] >= 0)).all():
        raise bad("temperature must be 0 (greedy) or positive (and finite)")
    if "top_k" in arrays:
        top_k = arrays["top_k"]
        if top_k.min() < 0:
            raise bad("top_k must be 0 (off) or positive")
        if vocab_size and top_k.max() > vocab_size - 1:
            raise bad(f"top_k must be at most the vocabulary size ({vocab_size - 1})")
    if "top_p" in arrays and not ((arrays["top_p"] > 0) & (arrays["top_p"] <= 1)).all():
        raise bad("top_p must be in (0, 1]")
    if "position" in arrays and arrays["position"].min() < 0:
        raise bad("position must be 0 or more")
