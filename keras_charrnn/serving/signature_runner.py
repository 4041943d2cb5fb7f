"""Running one signature of a loaded version: looked up once per call, its inputs checked, called on NumPy arrays.

``SignatureCall.of`` looks the signature up (its XLA twin where XLA is on) and
fetches what every call reads from its SignatureDef, worked out once per loaded
function; the call then checks a request's inputs against the limits and the
signature (as TensorProtos for gRPC, as arrays for REST: the same checks), estimates
the response's size, and runs the function.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context as tf_context
from tensorflow.python.framework import ops as tf_ops

from keras_charrnn.errors import InputError, ServingError, graph_error_message
from keras_charrnn.serving import limits as request_limits
from keras_charrnn.serving import wire
from keras_charrnn.serving.limits import ServingLimits
from keras_charrnn.serving.signature_loader import ServedFunction
from keras_charrnn.serving.version_loader import LoadedVersion

__all__ = ["SignatureCall", "run_signature", "vocab_size"]

UTF8_TEXT_BYTES = request_limits.UTF8_MAX_BYTES  # a generated character's bytes in ``text``, at most
SHORT_STRING_BYTES = 16  # a short string output's bytes (``finish_reason``), its framing included


class _SignatureFacts:
    """What every Predict call reads from one signature of one loaded version, worked out once.

    Reading a SignatureDef (its input names, dtypes and dims, its outputs) and
    binding keyword arguments to the function's structured signature cost more,
    per call, than the checks themselves; these facts are kept per loaded
    function (weakly: an unloaded version's facts go with it).

    Args:
        loaded: the version.
        signature: the requested signature name.
        fn: the function that answers it (``loaded.signature(signature)``: the XLA twin when XLA is on).
    """

    __slots__ = ("inputs", "expected", "outputs", "output_names", "vocab_size", "flat_order", "text_out")

    def __init__(self, loaded: LoadedVersion, signature: str, fn):
        sig_def = loaded.signature_defs[signature]
        self.inputs = tuple(
            (key, sig_def.inputs[key].dtype, tuple(d.size for d in sig_def.inputs[key].tensor_shape.dim))
            for key in sorted(sig_def.inputs)
        )
        self.expected = frozenset(sig_def.inputs)
        self.outputs = tuple(
            (name, tuple(d.size for d in info.tensor_shape.dim), info.dtype) for name, info in sig_def.outputs.items()
        )
        self.output_names = frozenset(sig_def.outputs)
        self.vocab_size = vocab_size(loaded)
        self.flat_order = _flat_order(fn, self.expected)
        self.text_out = "text" in sig_def.outputs


def _flat_order(fn, expected: frozenset) -> tuple[str, ...] | None:
    """The order in which ``fn`` takes its inputs as flat tensors, or None to call it by keywords.

    The flat call skips TensorFlow's per-call binding of keyword arguments to the
    structured signature (the inputs were already checked against the SignatureDef);
    any function whose parameters are not exactly the signature's inputs is called by keywords.
    """
    try:
        order = tuple(fn.function_type.parameters)
        callable(fn._call_flat) and fn.captured_inputs  # noqa: B018  (both exist on this TensorFlow)
    except Exception:  # another TensorFlow: the public structured call
        return None
    return order if set(order) == expected and len(order) == len(expected) else None


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loaded function -> {signature: facts}
_FACTS_LOCK = threading.Lock()


def _signature_facts(loaded: LoadedVersion, signature: str, fn) -> _SignatureFacts:
    """The cached ``_SignatureFacts`` of ``signature``, answered by ``fn``."""
    per_fn = _FACTS.get(fn)
    facts = None if per_fn is None else per_fn.get(signature)
    if facts is None:
        facts = _SignatureFacts(loaded, signature, fn)
        with _FACTS_LOCK:
            _FACTS.setdefault(fn, {})[signature] = facts
    return facts


def vocab_size(loaded: LoadedVersion) -> int | None:
    """The model's number of ids, from its SignatureDefs.

    Args:
        loaded: the version.

    Returns:
        The size of ``step``'s logits (or of ``metadata``'s vocabulary); None if they do not say.
    """
    for signature, output, axis in (("step", "logits", 2), ("metadata", "vocabulary", 0)):
        sig_def = loaded.signature_defs.get(signature)
        if sig_def is not None and output in sig_def.outputs:
            dims = sig_def.outputs[output].tensor_shape.dim
            if len(dims) > axis and dims[axis].size > 0:
                return int(dims[axis].size)
    return None


def _dtype_name(enum_value: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum_value).name
    except TypeError:
        return f"invalid dtype {enum_value}"


def _wire_dtype(value: np.ndarray) -> int:
    """An array's ``DataType``; ``DT_INVALID`` (0, which no signature input has) for one without."""
    try:
        return wire.dtype_of(value)
    except InputError:
        return 0


def _as_array(tensor) -> np.ndarray:
    """An output tensor as an array; a scalar one too (``numpy()`` gives a scalar string as ``bytes``)."""
    value = tensor.numpy()
    if isinstance(value, np.ndarray):
        return value
    return np.array(value, dtype=object) if isinstance(value, bytes) else np.asarray(value)


def _eager(value: np.ndarray):
    """A NumPy array as an eager tensor on this thread's device (what ``tf.constant`` makes, without its checks)."""
    try:
        return tf_ops.EagerTensor(value, tf_context.context().device_name, None)
    except (TypeError, ValueError):
        return tf.constant(value)


class SignatureCall:
    """One signature of one loaded version, looked up once: the function that answers it and its facts.

    Calls of the same version and signature compare equal (the batcher groups them by it).

    Args:
        loaded: the version.
        name: the signature's name.
        fn: the function that answers it (``loaded.signature(name)``).

    Example:

    >>> call = SignatureCall.of(loaded, "generate_text")          # doctest: +SKIP
    >>> call.run(call.check_arrays(inputs, ServingLimits()))      # doctest: +SKIP
    """

    __slots__ = ("loaded", "name", "fn", "facts")

    def __init__(self, loaded: LoadedVersion, name: str, fn: ServedFunction):
        self.loaded, self.name, self.fn = loaded, name, fn
        self.facts = _signature_facts(loaded, name, fn)

    @classmethod
    def of(cls, loaded: LoadedVersion, name: str) -> SignatureCall:
        """Looks ``name`` up on ``loaded`` (its XLA twin where XLA is on).

        Args:
            loaded: the version.
            name: the signature's name.

        Returns:
            The call.

        Raises:
            ServingError: FAILED_PRECONDITION for a signature the version lacks; INTERNAL for one
                that must be compiled while XLA is off (see ``LoadedVersion.signature``).
        """
        return cls(loaded, name, loaded.signature(name))

    def __eq__(self, other) -> bool:
        return isinstance(other, SignatureCall) and other.loaded is self.loaded and other.name == self.name

    def __hash__(self) -> int:
        return hash((id(self.loaded), self.name))

    def __str__(self) -> str:
        return self.name

    @property
    def vocab_size(self) -> int | None:
        """The model's number of ids (None: its SignatureDefs do not say)."""
        return self.facts.vocab_size

    @property
    def output_names(self) -> frozenset:
        """The signature's output names."""
        return self.facts.output_names

    @property
    def vocabulary(self) -> tuple[str, ...] | None:
        """The model's characters in id order, id 0 first (None: not a keras-charrnn model)."""
        return self.loaded.vocabulary

    @property
    def state_names(self) -> tuple[str, ...] | None:
        """The state tensors the model's exported config declares (None: unknown)."""
        return self.loaded.state_names

    @property
    def text_out(self) -> bool:
        """Whether the signature answers with ``text`` (``generate_text``) rather than ``ids``."""
        return self.facts.text_out

    def check_tensors(self, request_inputs, limits: ServingLimits) -> dict[str, np.ndarray]:
        """A request's TensorProtos as arrays, checked against the limits (before expanding) and the signature.

        Args:
            request_inputs: the request's ``inputs`` map (name -> TensorProto).
            limits: this server's limits.

        Returns:
            The inputs as NumPy arrays.

        Raises:
            ServingError: INVALID_ARGUMENT naming the input (or the limit).
        """
        request_limits.check_request_tensors(request_inputs, limits)
        self._check_signature(
            {key: (proto.dtype, [d.size for d in proto.tensor_shape.dim]) for key, proto in request_inputs.items()}
        )
        arrays = {}
        for key, _, _ in self.facts.inputs:
            try:
                arrays[key] = wire.from_tensor_proto(request_inputs[key], max_elements=limits.max_request_elements)
            except (ValueError, TypeError) as exc:  # malformed tensor content (a bug elsewhere stays INTERNAL)
                raise ServingError("INVALID_ARGUMENT", f"input {key!r}: malformed tensor ({exc})") from None
        return arrays

    def check_arrays(self, arrays: dict[str, np.ndarray], limits: ServingLimits) -> dict[str, np.ndarray]:
        """A request's NumPy inputs, checked against the limits and the signature as ``check_tensors`` checks.

        Args:
            arrays: the inputs by name.
            limits: this server's limits.

        Returns:
            ``arrays``.

        Raises:
            ServingError: INVALID_ARGUMENT naming the input (or the limit).
        """
        request_limits.check_request_arrays(arrays, limits)
        self._check_signature({key: (_wire_dtype(value), list(value.shape)) for key, value in arrays.items()})
        return arrays

    def _check_signature(self, given: dict[str, tuple[int, list[int]]]) -> None:
        """Names, dtypes and shapes (``{name: (DataType, shape)}``) against the SignatureDef's inputs."""
        expected, names = self.facts.expected, set(given)
        if names != expected:
            if names - expected:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"unexpected input(s) {sorted(names - expected)} for "
                    f"signature {self.name!r}; it takes {sorted(expected)}",
                )
            raise ServingError(
                "INVALID_ARGUMENT", f"missing input(s) {sorted(expected - names)} for signature {self.name!r}"
            )
        for key, dtype, dims in self.facts.inputs:
            given_dtype, shape = given[key]
            if given_dtype != dtype:
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input {key!r}: expects dtype {tf.dtypes.as_dtype(dtype).name}, got {_dtype_name(given_dtype)}",
                )
            if len(shape) != len(dims) or any(d != -1 and d != s for d, s in zip(dims, shape)):
                want = "[" + ", ".join("?" if d == -1 else str(d) for d in dims) + "]"
                raise ServingError("INVALID_ARGUMENT", f"input {key!r}: expects shape {want}, got {shape}")

    def response_bytes(self, inputs: dict[str, np.ndarray], output_filter=()) -> int:
        """About how many bytes the call's response will take, from the signature's output shapes.

        An unknown first dimension is the call's rows; an unknown second one is its ids per row
        (``step``, ``inspect``) or its largest ``num_chars`` (``generate``); an unknown third one
        is its largest ``logprobs`` (``top_ids``, ``top_logprobs``). ``text`` counts 4 bytes a
        character; other strings (``finish_reason``) a few bytes each.

        Args:
            inputs: the call's checked inputs.
            output_filter: only these outputs (empty: all).

        Returns:
            The estimate, in bytes.
        """
        if not inputs:
            return 0
        rows = next(iter(inputs.values())).shape[0]
        chars = int(inputs["num_chars"].max()) if "num_chars" in inputs and inputs["num_chars"].size else 1
        ids_in = "ids" in inputs and inputs["ids"].ndim == 2 and "num_chars" not in inputs
        length = inputs["ids"].shape[1] if ids_in else chars
        asked = inputs.get("logprobs")
        alternatives = max(int(asked.max()), 0) if asked is not None and asked.size else 1
        unknown = {0: rows, 1: length, 2: alternatives}
        total = 0
        for name, sizes, dtype in self.facts.outputs:
            if output_filter and name not in output_filter:
                continue
            count = 1
            for axis, size in enumerate(sizes):
                count *= size if size >= 0 else unknown.get(axis, 1)
            if dtype == wire.DT_STRING:
                total += count * (UTF8_TEXT_BYTES * chars if name == "text" else SHORT_STRING_BYTES)
            else:
                total += count * request_limits.ITEM_BYTES.get(dtype, 4)
        return total

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calls the function on NumPy inputs; a model-side check failing becomes INVALID_ARGUMENT.

        Inputs that are exactly the signature's (the server's checked calls and batches) go to
        the function as flat tensors; anything else takes TensorFlow's structured call, which checks them.

        Args:
            inputs: the inputs by name.

        Returns:
            The outputs by name, as arrays (strings: ``bytes`` objects).

        Raises:
            ServingError: INVALID_ARGUMENT for inputs the model refuses.
        """
        fn, order = self.fn, self.facts.flat_order
        try:
            if order is not None and len(inputs) == len(order):
                outputs = fn._call_flat([_eager(inputs[key]) for key in order], fn.captured_inputs)
            else:
                outputs = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except KeyError as exc:  # an input the signature takes is missing
            raise ServingError("INVALID_ARGUMENT", f"missing input {exc} for signature {self.name!r}") from None
        except tf.errors.InvalidArgumentError as exc:
            raise ServingError("INVALID_ARGUMENT", graph_error_message(exc.message)) from None
        except (ValueError, TypeError) as exc:
            raise ServingError("INVALID_ARGUMENT", str(exc).strip().splitlines()[0]) from None
        return {k: _as_array(v) for k, v in outputs.items()}


def run_signature(loaded: LoadedVersion, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Looks ``signature`` up on ``loaded`` and runs it on NumPy inputs (see ``SignatureCall``).

    Args:
        loaded: the version.
        signature: the signature's name.
        inputs: the inputs by name.

    Returns:
        The outputs by name.

    Raises:
        ServingError: the signature is missing or refuses the inputs.
    """
    return SignatureCall.of(loaded, signature).run(inputs)


def run_batch(loaded: LoadedVersion, call: SignatureCall, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batcher's ``run``: one merged batch of calls of ``call``'s version and signature.

    Args:
        loaded: the version (``call.loaded``).
        call: the signature, looked up by the first call of the batch.
        inputs: the merged inputs.

    Returns:
        The outputs by name.
    """
    return call.run(inputs)
