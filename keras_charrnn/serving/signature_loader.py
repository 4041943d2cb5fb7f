"""Loads only the functions a SavedModel's serving signatures reach: a lean ``tf.saved_model.load`` for serving.

Its one job: give the model server, for a SavedModel version, an object whose
``signatures`` return the same outputs, bit for bit, as those of
``tf.saved_model.load`` (the same FunctionDefs run on the same kernels, variables
and constants), while building nothing else; anything it does not handle itself
(several MetaGraphs or other tags, which ``version_loader.load_version`` routes away,
signatures that capture tables, assets or other resources, TF1 SavedModels, a
damaged model, or a TensorFlow whose private APIs this relies on changed) is
loaded by ``tf.saved_model.load`` instead.

Why: ``tf.saved_model.load`` rebuilds every function of a SavedModel as a Python
graph, the module's own ``tf.function``s too, half of them never called by a
signature. For the bundled ``saved_models/shakespeare/1`` (LSTM 2x512) a replica's
resident memory grows by about 170 MB on load with it, by about 20 MB (12 MB of it
the weights) with this loader; loading takes 0.2 s instead of 1.7 s (issue #12,
BENCHMARKS.md "serving overhead profile").

Functions are registered under names derived from their content (a hash of the
FunctionDefs), shared by every loaded version with the same graph and
unregistered when the last of them is unloaded. TensorFlow keeps each function's
XLA executables for as long as the process lives, keyed by its name: under
names of their own per load, every new version of a model (new weights, same
graph) compiled again and kept another copy (about 30 MB per reload of the
bundled model); under content names it reuses the executables, which take the
weights as inputs.

It relies on private TensorFlow APIs (checked at import and by a probe call at the
first load; if any is gone or behaves otherwise, every load falls back):
``tensorflow.python.eager.context`` (``Context.add_function_def``, ``call_function``,
``remove_function``), ``tensorflow.python.framework.ops.uid``, ``op_def_registry.get``,
``tensorflow.python.saved_model.nested_structure_coder.decode_proto`` and
``tensorflow.python.saved_model.function_deserialization.fix_node_def``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import types
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import tensorflow as tf
from tensorflow.core.framework import function_pb2, types_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2

from keras_charrnn.xla import function_callees

try:  # private APIs: without them, every load goes through tf.saved_model.load
    from tensorflow.python.eager import context as tf_context
    from tensorflow.python.framework import op_def_registry
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.saved_model import nested_structure_coder
    from tensorflow.python.saved_model.function_deserialization import fix_node_def
except ImportError as _exc:  # pragma: no cover - depends on the TensorFlow release
    _MISSING_API = f"{type(_exc).__name__}: {_exc}"
else:
    _MISSING_API = ""

log = logging.getLogger("charrnn.serve")

_registered: Counter[str] = Counter()  # function name -> loaded models using it (see the module docstring)
_registered_lock = threading.Lock()


class ServedFunction(Protocol):
    """A signature's function as the server calls it: TensorFlow's ``ConcreteFunction`` or the lean
    loader's ``SignatureFunction``; by keywords, or flat (``_call_flat`` with ``captured_inputs``)."""

    @property
    def captured_inputs(self) -> Sequence[Any]: ...

    def _call_flat(self, args: Any, captured_inputs: Any) -> Any: ...

    def __call__(self, **inputs: Any) -> Any: ...


class SignatureModule(Protocol):
    """A loaded SavedModel as the server reads it: ``tf.saved_model.load``'s object or a ``SignatureModel``."""

    @property
    def signatures(self) -> Mapping[str, ServedFunction]: ...


class SignatureFunction:
    """One signature of a loaded SavedModel: its function, run by name in TensorFlow's eager runtime.

    ``tf.saved_model.load`` rebuilds every function of a SavedModel as a Python graph, the
    module's own ``tf.function``s too (170 MB resident for the bundled 2x512 model, half of
    it for functions no signature calls). ``load_signatures`` instead registers the
    FunctionDefs the signatures reach with the eager context and calls them as TensorFlow's
    own concrete functions do (``context.call_function``): the same kernels run on the same
    inputs, so outputs are bit for bit those of ``tf.saved_model.load`` (20 MB resident, 12 MB
    of it the weights).

    Called with the signature's inputs as keyword arguments (bound and converted as
    TensorFlow's structured call does); ``function_type.parameters``, ``captured_inputs`` and
    ``_call_flat`` are the flat call of TensorFlow's ``ConcreteFunction``, which the server uses.
    """

    def __init__(self, function_name: str, inputs: dict, outputs: tuple[str, ...], captured: list, owner):
        self.name = function_name
        self._name = function_name.encode()
        self._specs = inputs  # input name -> TensorSpec, in the function's flat order
        self._outputs = outputs  # output names, in the function's flat order
        self.function_type = types.SimpleNamespace(parameters=dict.fromkeys(inputs))
        self.captured_inputs = captured  # variable handles and constants, after the inputs
        self._owner = owner  # its functions stay registered while a signature of it is in use

    @property
    def structured_input_signature(self) -> tuple:
        """``((), {input name: TensorSpec})``, as a signature's ``ConcreteFunction`` gives it."""
        return (), dict(self._specs)

    def _call_flat(self, args, captured_inputs) -> dict:
        """Runs the function on its flat inputs (in ``function_type.parameters`` order), then the captured ones."""
        outputs = tf_context.context().call_function(self._name, list(args) + list(captured_inputs), len(self._outputs))
        return dict(zip(self._outputs, outputs))

    def __call__(self, **inputs) -> dict:
        """Runs the signature.

        Args:
            **inputs: every input of the signature by name: tensors, or values converted to its dtype.

        Returns:
            The signature's outputs by name (eager tensors).

        Raises:
            TypeError: an input is missing, unknown, or can not be converted to its spec.
        """
        missing = [name for name in self._specs if name not in inputs]
        if missing:
            raise TypeError(f"{self.name}: missing a required argument: {missing[0]!r}")
        unexpected = sorted(set(inputs) - set(self._specs))
        if unexpected:
            raise TypeError(f"{self.name}: got an unexpected keyword argument {unexpected[0]!r}")
        flat = []
        for name, spec in self._specs.items():
            value = inputs[name]
            if not isinstance(value, tf.Tensor):  # as TensorFlow binds them: converted to the spec, or refused
                try:
                    value = tf.convert_to_tensor(value, dtype=spec.dtype)
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"{self.name}: input {name!r}: {exc}") from None
                if not spec.shape.is_compatible_with(value.shape):
                    raise TypeError(f"{self.name}: input {name!r}: can not cast shape {value.shape} to {spec.shape}")
            flat.append(value)  # a tensor goes as it is: the function itself checks it, as TensorFlow's does
        return self._call_flat(flat, self.captured_inputs)


class SignatureModel:
    """A SavedModel loaded by ``load_signatures``: ``signatures`` by name, and the variables they use."""

    def __init__(self):
        self.signatures: dict[str, SignatureFunction] = {}
        self.variables: list = []


class _NotLoadable(Exception):
    """The SavedModel holds something ``load_signatures`` does not restore itself."""


def load_signatures(path: Path, meta_graph) -> SignatureModule:
    """Loads a SavedModel's signatures: only the functions they reach, and their variables and constants.

    A SavedModel whose signatures capture anything but variables and constants (tables,
    assets, other resources), or that lacks an object graph, is loaded by
    ``tf.saved_model.load`` instead; so is one this fails on, so its errors are TensorFlow's,
    and every one when the private TensorFlow APIs this relies on are missing or changed.

    Args:
        path: the version folder.
        meta_graph: its ``serve`` MetaGraphDef.

    Returns:
        An object with ``signatures`` (name -> function called with keyword tensors): a
        ``SignatureModel``, or the module ``tf.saved_model.load`` returns.
    """
    unusable = _eager_functions_unusable()
    if unusable:
        log.warning("%s: loaded with tf.saved_model.load (this TensorFlow's private APIs changed: %s)", path, unusable)
        return tf.saved_model.load(str(path), tags=["serve"])
    try:
        return _load_signatures(path, meta_graph)
    except _NotLoadable as exc:
        log.debug("%s: loaded with tf.saved_model.load (%s)", path, exc)
    except Exception as exc:  # a damaged model: TensorFlow's loader gives the error it reports
        log.debug("%s: loaded with tf.saved_model.load (%s: %s)", path, type(exc).__name__, exc)
    return tf.saved_model.load(str(path), tags=["serve"])


def _load_signatures(path: Path, meta_graph) -> SignatureModel:
    graph = meta_graph.object_graph_def
    if not graph.nodes:
        raise _NotLoadable("no object graph (a TF1 SavedModel)")
    signature_map = next((c.node_id for c in graph.nodes[0].children if c.local_name == "signatures"), None)
    if signature_map is None:
        raise _NotLoadable("no signatures")
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    entries = {}  # signature -> its concrete function's name
    for child in graph.nodes[signature_map].children:
        node = graph.nodes[child.node_id]
        if (
            node.WhichOneof("kind") != "bare_concrete_function"
            or node.bare_concrete_function.concrete_function_name not in library
        ):
            raise _NotLoadable(f"signature {child.local_name} is not a saved concrete function")
        entries[child.local_name] = node.bare_concrete_function.concrete_function_name

    specs = {}  # signature -> (its inputs by name, its output names): checked before anything is created
    for signature, name in entries.items():
        saved, fdef = graph.concrete_functions[name], library[name]
        args, kwargs = nested_structure_coder.decode_proto(saved.canonicalized_input_signature)
        outputs = nested_structure_coder.decode_proto(saved.output_signature)
        if (
            args
            or not isinstance(kwargs, dict)
            or not isinstance(outputs, dict)
            or not all(isinstance(s, tf.TensorSpec) for s in [*kwargs.values(), *outputs.values()])
        ):
            raise _NotLoadable(f"signature {signature} does not take and give named tensors")
        inputs = {arg.name: kwargs.get(arg.name) for arg in fdef.signature.input_arg[: len(kwargs)]}
        output_names = tuple(sorted(outputs))  # the order TensorFlow flattens a dict in
        if (
            set(inputs) != set(kwargs)
            or len(fdef.signature.input_arg) != len(kwargs) + len(saved.bound_inputs)
            or any(
                arg.type != kwargs[arg.name].dtype.as_datatype_enum for arg in fdef.signature.input_arg[: len(kwargs)]
            )
            or [a.type for a in fdef.signature.output_arg] != [outputs[n].dtype.as_datatype_enum for n in output_names]
        ):
            raise _NotLoadable(f"signature {signature}: its function's arguments are not its inputs")
        specs[signature] = inputs, output_names

    order = _callees_first(entries.values(), library)  # the functions the signatures reach

    model = SignatureModel()
    captured_by_node = _captured_values(
        path, meta_graph, {i for name in entries.values() for i in graph.concrete_functions[name].bound_inputs}
    )
    model.variables = [v for v in captured_by_node.values() if isinstance(v, tf.Variable)]
    suffix = _name_suffix(order, library)
    renamed = {name: types.SimpleNamespace(name=name + suffix) for name in order}
    context = tf_context.context()
    registered: list[str] = []
    weakref.finalize(model, _remove_functions, registered).atexit = False
    for name in order:
        fdef = function_pb2.FunctionDef()
        fdef.CopyFrom(library[name])
        for node in fdef.node_def:
            fix_node_def(node, renamed, suffix)  # calls of the renamed functions; shared_name made unique
        fdef.signature.name = renamed[name].name
        with _registered_lock:
            if not _registered[fdef.signature.name]:  # else registered by a load of the same graph
                context.add_function_def(fdef)
            _registered[fdef.signature.name] += 1
        registered.append(fdef.signature.name)
    for signature, name in entries.items():
        captured = [captured_by_node[i] for i in graph.concrete_functions[name].bound_inputs]
        model.signatures[signature] = SignatureFunction(
            renamed[name].name,
            *specs[signature],
            [v.handle if isinstance(v, tf.Variable) else v for v in captured],
            model,
        )
    return model


def _name_suffix(order: list[str], library: dict) -> str:
    """The suffix the functions ``order`` are registered under: a hash of their FunctionDefs.

    Loads of the same graph share it, so they share the registered functions and their
    XLA executables. It is the same in every process, and so is XLA's key for an executable
    (which names the functions): a persistent XLA cache (``--tf_xla_persistent_cache_directory``)
    finds a restarted server's executables. Functions with ops that name a shared resource
    (``shared_name``: tables, queues) get a suffix of their own per load instead, as
    ``tf.saved_model.load`` gives, so two loads never share such a resource.
    """
    digest = hashlib.sha256()
    for name in sorted(order):  # not the walk's order: a protobuf map's iteration order varies between processes
        for node in library[name].node_def:
            op_def = op_def_registry.get(node.op)
            if op_def is not None and any(attr.name == "shared_name" for attr in op_def.attr):
                return f"_lean{tf_ops.uid()}"
        digest.update(library[name].SerializeToString(deterministic=True))
    return f"_lean_{digest.hexdigest()[:20]}"


def _callees_first(roots, library: dict) -> list[str]:
    """The functions ``roots`` reach in ``library`` (name -> FunctionDef), each after the functions it calls.

    Iterative, not a recursive closure: a closure that calls itself is a reference cycle,
    and with it ``library`` (and so the whole parsed SavedModel, about 15 MB for the bundled
    model) would stay resident until Python's cyclic garbage collector happened to run.

    Raises:
        _NotLoadable: a function calls one that is not in ``library``.
    """
    order: list[str] = []
    seen: set[str] = set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(_callees(root, library)))]
        while stack:
            name, callees = stack[-1]
            callee = next(callees, None)
            if callee is None:
                stack.pop()
                order.append(name)
            elif callee not in seen:
                seen.add(callee)
                stack.append((callee, iter(_callees(callee, library))))
    return order


def _callees(name: str, library: dict) -> list[str]:
    """The library functions function ``name`` calls, in node order; raises _NotLoadable for one not in ``library``."""
    callees = []
    for node in library[name].node_def:
        for callee in function_callees(node, library):
            if callee not in library:
                raise _NotLoadable(f"function {name} calls {callee}, which is not in the library")
            callees.append(callee)
    return callees


def _captured_values(path: Path, meta_graph, node_ids: set[int]) -> dict:
    """The variables (restored from the checkpoint) and constants the signatures capture, by object id."""
    graph = meta_graph.object_graph_def
    values = {}
    variables = [i for i in sorted(node_ids) if graph.nodes[i].WhichOneof("kind") == "variable"]
    constants = {n.name: n for n in meta_graph.graph_def.node if n.op == "Const"}
    for i in sorted(node_ids):
        kind = graph.nodes[i].WhichOneof("kind")
        if kind == "constant":
            node = constants.get(graph.nodes[i].constant.operation)
            if node is None:
                raise _NotLoadable(f"constant {graph.nodes[i].constant.operation} is not in the graph")
            values[i] = tf.constant(tf.make_ndarray(node.attr["value"].tensor))
        elif kind != "variable":
            raise _NotLoadable(f"a signature captures a {kind}")
    if not variables:
        return values
    prefix = str(path / "variables" / "variables")

    def restore(keys: list[str], dtypes: list) -> list:
        return tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), dtypes=dtypes)

    checkpoint = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
        restore(["_CHECKPOINTABLE_OBJECT_GRAPH"], [tf.string])[0].numpy()
    )
    in_checkpoint = {0: 0}  # object graph id -> checkpoint object graph id, matched by child names from the root
    pending = [0]
    while pending:
        saved_id = pending.pop()
        children = {c.local_name: c.node_id for c in checkpoint.nodes[in_checkpoint[saved_id]].children}
        for child in graph.nodes[saved_id].children:
            if child.node_id not in in_checkpoint and child.local_name in children:
                in_checkpoint[child.node_id] = children[child.local_name]
                pending.append(child.node_id)
    keys = []
    for i in variables:
        found = (
            [a.checkpoint_key for a in checkpoint.nodes[in_checkpoint[i]].attributes if a.name == "VARIABLE_VALUE"]
            if i in in_checkpoint
            else []
        )
        if len(found) != 1:
            raise _NotLoadable(f"variable {graph.nodes[i].variable.name} is not in the checkpoint")
        keys.append(found[0])
    tensors = restore(keys, [tf.as_dtype(graph.nodes[i].variable.dtype) for i in variables])  # as TF's saver does
    for i, value in zip(variables, tensors):
        saved = graph.nodes[i].variable
        if not tf.TensorShape(saved.shape).is_compatible_with(value.shape):
            raise _NotLoadable(f"variable {saved.name}: the checkpoint holds another shape")
        values[i] = tf.Variable(value, trainable=saved.trainable, name=saved.name or None)
    return values


def _remove_functions(names: list[str]) -> None:
    """Unregisters an unloaded version's functions from the eager context, those no other load uses."""
    context = tf_context.context()
    for name in names:
        with _registered_lock:
            _registered[name] -= 1
            if _registered[name] > 0:
                continue
            del _registered[name]
            try:
                context.remove_function(name)
            except Exception:  # already gone, or TensorFlow shutting down
                pass


@functools.lru_cache(maxsize=1)
def _eager_functions_unusable() -> str:
    """Why this TensorFlow can not register, call and remove functions as the loader does; empty when it can.

    Run once, at the first load: a pass-through FunctionDef is registered with the eager
    context, called through ``call_function`` and removed, so a private API that changed
    in a TensorFlow upgrade sends loads to ``tf.saved_model.load`` instead of failing calls.
    """
    if _MISSING_API:
        return _MISSING_API
    try:
        fdef = function_pb2.FunctionDef()
        fdef.signature.name = f"charrnn_signature_loader_probe_{tf_ops.uid()}"
        fdef.signature.input_arg.add(name="x", type=types_pb2.DT_FLOAT)
        fdef.signature.output_arg.add(name="y", type=types_pb2.DT_FLOAT)
        fdef.ret["y"] = "x"
        context = tf_context.context()
        context.add_function_def(fdef)
        try:
            outputs = context.call_function(fdef.signature.name.encode(), [tf.constant(1.5)], 1)
        finally:
            context.remove_function(fdef.signature.name)
        if len(outputs) != 1 or float(outputs[0]) != 1.5:
            return f"call_function gave {outputs!r} for a pass-through function"
        if not all(map(callable, (nested_structure_coder.decode_proto, tf_ops.uid, fix_node_def, op_def_registry.get))):
            return "decode_proto, uid, fix_node_def or op_def_registry.get is not a function"
    except Exception as exc:  # any change of the private APIs: TensorFlow's own loader serves
        return f"{type(exc).__name__}: {exc}"
    return ""
