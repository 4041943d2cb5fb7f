"""The request budget: every Predict call is measured against these limits before anything is allocated.

A ``TensorProto`` may claim a shape far larger than the values it carries
(TensorFlow repeats the last value to fill it), so a request of a few hundred
bytes can claim gigabytes. ``check_request_tensors`` reads only the claimed
shapes and the sizes of the carried bytes, and refuses a request over a limit
before any tensor is expanded (the count of stop strings and the bytes of each
too); ``check_call`` then repeats, in NumPy, the checks the model's graph makes
(the rules of ``keras_charrnn.generation``'s table, prime, ids, states), so a call
that would fail in the graph never joins a batch.

The limits are ``ServerOptions`` fields (and ``charrnn serve`` flags) of the
same names, and the server advertises them in GetModelMetadata (``metadata["limits"]``, a packed
``google.protobuf.Struct``) so clients can split their work to fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from keras_charrnn import generation
from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.generation import MAX_CHARS_PER_CALL, MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOPS, RuleError
from keras_charrnn.serving import wire

MAX_RANK = 8  # no signature takes more than 3 dimensions
UTF8_MAX_BYTES = 4  # the most bytes one character takes in UTF-8
# Bytes per item of the fixed-size dtypes, as in a TensorProto's tensor_content.
ITEM_BYTES = {wire.DT_FLOAT: 4, wire.DT_INT32: 4, wire.DT_INT64: 8, wire.DT_BOOL: 1}
UNKNOWN_VOCAB = 1 << 31  # the vocabulary size the rules read when the model does not say (its ranges go unchecked)
_VALUE_FIELDS = ("float_val", "int_val", "int64_val", "bool_val", "double_val", "half_val")
# The string inputs whose values are bounded by their UTF-8 bytes before they are decoded, and the limit on their
# characters (None: the models' own cap, ``MAX_STOP_CHARS``).
_STRING_LIMITS = {"prime": "max_prime_chars", "stop": "max_stop_chars", "stop_tail": None}


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
        max_stops: stop strings per row (``stop`` [B, S]: S), at most the models' cap (4).
        max_stop_chars: characters of one stop string, at most the models' cap (32).
        max_logprobs: ``logprobs`` of a row (the alternatives per character), at most the models' cap (10).

    Example:

    >>> ServingLimits(max_prime_chars=100).advertised()["max_prime_chars"]
    100
    """

    max_prime_chars: int = 16384
    max_ids_length: int = 16384
    max_rows_per_call: int = 64
    max_chars_per_call: int = MAX_CHARS_PER_CALL
    max_request_elements: int = 1 << 20
    max_stops: int = MAX_STOPS
    max_stop_chars: int = MAX_STOP_CHARS
    max_logprobs: int = MAX_LOGPROBS

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
        caps = {"max_stops": MAX_STOPS, "max_stop_chars": MAX_STOP_CHARS, "max_logprobs": MAX_LOGPROBS}
        for name, cap in caps.items():
            if getattr(self, name) > cap:
                raise ConfigError(f"{name} must be at most {cap} (the models' own cap), got {getattr(self, name)}")

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


def refuse(limit: str, value: int, what: str, advice: str | None = None) -> ServingError:
    """The error for a request over ``limit``: names the limit and its value (its ``setting``: the limit).

    Args:
        limit: the ``ServingLimits`` field.
        value: its value on this server.
        what: what the request asked for, e.g. ``"prime of row 0 holds 3145728 bytes"``.
        advice: what the caller may do instead (None: split the work into smaller calls).

    Returns:
        An INVALID_ARGUMENT ``ServingError`` (retrying the same request cannot help; split it).

    Example:

    >>> refuse("max_rows_per_call", 64, "input 'ids' has 65 rows").message
    "input 'ids' has 65 rows, over this server's limit max_rows_per_call=64; split the work into smaller calls"
    """
    return ServingError(
        "INVALID_ARGUMENT",
        f"{what}, over this server's limit {limit}={value}; {advice or 'split the work into smaller calls'}",
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


def check_shapes(shapes: dict[str, list[int]], string_bytes: dict[str, int], limits: ServingLimits) -> None:
    """A request's input shapes and its longest strings against the limits: the one copy of these rules.

    Args:
        shapes: each input's shape (claimed by its TensorProto, or an array's).
        string_bytes: the UTF-8 bytes of the longest value of ``prime``, ``stop`` and ``stop_tail``
            (missing: none); at most 4 a character.
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
        if key == "stop" and len(shape) == 2 and shape[1] > limits.max_stops:
            raise refuse("max_stops", limits.max_stops, f"stop holds {shape[1]} strings per row", _FEWER)
    for key, limit in _STRING_LIMITS.items():
        chars = getattr(limits, limit) if limit else MAX_STOP_CHARS
        if string_bytes.get(key, 0) <= UTF8_MAX_BYTES * chars:
            continue
        what = f"{key} holds {string_bytes[key]} bytes (more than {UTF8_MAX_BYTES} per character allowed)"
        if limit is None:
            raise ServingError("INVALID_ARGUMENT", f"{what}: {key} holds at most {chars} characters")
        raise refuse(limit, chars, what, None if key == "prime" else _FEWER)


_FEWER = "ask for fewer or shorter ones"


def _longest(values) -> int:
    """The bytes of the longest ``bytes`` value among ``values`` (0: none)."""
    return max((len(v) for v in values if isinstance(v, bytes)), default=0)


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
    strings = {key: _longest(request_inputs[key].string_val) for key in _STRING_LIMITS if key in request_inputs}
    check_shapes(shapes, strings, limits)
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
    strings = {
        key: _longest(arrays[key].reshape(-1))
        for key in _STRING_LIMITS
        if key in arrays and arrays[key].dtype == object
    }
    check_shapes({key: list(value.shape) for key, value in arrays.items()}, strings, limits)


def _rows(arrays: dict[str, np.ndarray]) -> int:
    first = "prime" if "prime" in arrays else "ids" if "ids" in arrays else sorted(arrays)[0]
    return arrays[first].shape[0]


def check_call(
    arrays: dict[str, np.ndarray],
    vocab_size: int | None,
    limits: ServingLimits,
    vocabulary: Sequence[str] | None = None,
) -> None:
    """The model graph's own input checks, in NumPy, plus the per-row limits.

    A call that passes them runs without a model-side error, so it can share a
    batch with other calls without putting them at risk. The generation inputs are
    checked by the rules of ``keras_charrnn.generation``'s table (the graph's own).

    Args:
        arrays: the call's inputs (already checked against the signature's dtypes and shapes).
        vocab_size: the model's number of ids (None: unknown, ids, top_k and logit_bias unchecked).
        limits: this server's limits.
        vocabulary: the model's characters in id order, id 0 first (None: unknown, the
            characters of stop strings unchecked).

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
    for key, value in arrays.items():  # the states, and any other float input the table has no rule for
        if value.dtype.kind == "f" and key not in generation.BY_NAME and not np.isfinite(value).all():
            raise bad(f"{key} must be finite (a state holds NaN or infinity)")
    # A call over the models' cap of characters runs in segments (the server's limit may be higher).
    ctx = {
        **generation.context(vocab_size or UNKNOWN_VOCAB, limits.advertised()),
        "max_chars_per_call": limits.max_chars_per_call,
    }
    ruled = {k: v for k, v in arrays.items() if vocab_size or k not in ("top_k", "logit_bias")}
    try:
        generation.check_rows(ruled, ctx, vocabulary)
    except RuleError as exc:
        raise _rule_error(exc, ctx) from None


def _rule_error(exc: RuleError, ctx: dict[str, int]) -> ServingError:
    """A generation input's rule broken, as the server answers it: over a limit, the refusal names it."""
    if exc.limit is None:
        return ServingError("INVALID_ARGUMENT", exc.message)
    if f"{exc.limit}=" in exc.message:  # the message names the limit and its value already
        return ServingError("INVALID_ARGUMENT", f"{exc.message}; {_FEWER}", setting=exc.limit)
    return refuse(exc.limit, ctx[exc.limit], exc.message, None if exc.limit == "max_chars_per_call" else _FEWER)
