"""XLA twins: the must-compile copies of the generating signatures, and how callers fall back from them.

A stock ``tensorflow_model_server`` runs with XLA:CPU JIT off (it calls
``tensorflow::DisableXlaCompilation()`` unless started with
``--xla_cpu_compilation_enabled=true``), and then every function marked
must-compile (``jit_compile=True``, the ``_XlaMustCompile`` attribute) fails
with ``INTERNAL: XLA compilation disabled``. So the default signatures of an
export never reach a must-compile function; ``generate_xla`` and
``generate_text_xla`` are XLA-compiled twins with the same inputs, outputs and
numerics, which callers try first and leave, once, on that error.

This module needs no TensorFlow (the gRPC client imports it).
"""

from __future__ import annotations

from collections.abc import Iterable

XLA_SUFFIX = "_xla"
TWINNED = ("generate", "generate_text", "generate_v2", "generate_text_v2")  # the signatures with an XLA twin
XLA_DISABLED_MESSAGE = "XLA compilation disabled"  # TensorFlow's error when XLA JIT is off (code INTERNAL)
MUST_COMPILE_ATTR = "_XlaMustCompile"


def xla_twin(signature: str) -> str:
    """The name of ``signature``'s XLA-compiled twin.

    Args:
        signature: a signature name, e.g. ``"generate_text"``.

    Returns:
        e.g. ``"generate_text_xla"``.
    """
    return signature + XLA_SUFFIX


def is_xla_unavailable(message: str) -> bool:
    """Whether an error message is the one a server without XLA JIT gives for a must-compile function.

    Args:
        message: the error's text (a gRPC status' details, a TensorFlow error's message).

    Returns:
        True for TensorFlow's ``XLA compilation disabled``.
    """
    return XLA_DISABLED_MESSAGE in (message or "")


def _func_names(attr) -> Iterable[str]:
    """The function names an ``AttrValue`` refers to (``func`` and ``list.func``)."""
    if attr.HasField("func"):
        yield attr.func.name
    if attr.HasField("list"):
        for f in attr.list.func:
            yield f.name


def reachable_functions(meta_graph, signature: str) -> set[str]:
    """The names of the library functions a signature's outputs reach, calls and loop bodies included.

    Args:
        meta_graph: a ``MetaGraphDef`` (from ``saved_model_pb2.SavedModel``).
        signature: a signature name of it.

    Returns:
        The function names (empty when the signature computes nothing through functions).
    """
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    nodes = {n.name: n for n in meta_graph.graph_def.node}
    pending = []
    for info in meta_graph.signature_def[signature].outputs.values():
        node = nodes.get(info.name.split(":")[0].lstrip("^"))
        if node is not None:
            pending.extend(function_callees(node, library))
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        for node in library[name].node_def:
            pending.extend(function_callees(node, library))
    return seen


def function_callees(node, library) -> list[str]:
    """The library functions a graph node calls: those its attributes name (loop bodies, ``f`` of a
    ``PartitionedCall``) and its op when that is a library function.

    Args:
        node: a ``NodeDef``.
        library: function name -> ``FunctionDef`` of the graph's library.

    Returns:
        The names (an attribute may name a function missing from ``library``; callers check).
    """
    names = [n for attr in node.attr.values() for n in _func_names(attr)]
    if node.op in library:  # a direct call of a library function
        names.append(node.op)
    return names


def must_compile_functions(meta_graph, signature: str) -> set[str]:
    """The functions a signature reaches that are marked must-compile (``_XlaMustCompile`` true).

    Both the function's own attribute and the attribute of any call node inside a
    reached function count.

    Args:
        meta_graph: a ``MetaGraphDef``.
        signature: a signature name of it.

    Returns:
        Their names; empty when the signature runs without XLA.

    Example:

    >>> must_compile_functions(meta_graph, "serving_default")  # doctest: +SKIP
    set()
    """
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    marked = set()
    for name in reachable_functions(meta_graph, signature):
        function = library[name]
        if MUST_COMPILE_ATTR in function.attr and function.attr[MUST_COMPILE_ATTR].b:
            marked.add(name)
        for node in function.node_def:
            if MUST_COMPILE_ATTR in node.attr and node.attr[MUST_COMPILE_ATTR].b:
                marked.add(f"{name}/{node.name}")
    nodes = {n.name: n for n in meta_graph.graph_def.node}
    for info in meta_graph.signature_def[signature].outputs.values():
        node = nodes.get(info.name.split(":")[0])
        if node is not None and MUST_COMPILE_ATTR in node.attr and node.attr[MUST_COMPILE_ATTR].b:
            marked.add(node.name)
    return marked


def must_compile_signatures(meta_graph) -> set[str]:
    """The signatures of a MetaGraph that a server without XLA JIT cannot run.

    Args:
        meta_graph: a ``MetaGraphDef``.

    Returns:
        Their names.
    """
    return {
        name
        for name in meta_graph.signature_def
        if not name.startswith("__") and must_compile_functions(meta_graph, name)
    }
