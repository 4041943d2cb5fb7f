"""Loading one version of a model: its signatures, copies of its SignatureDefs, its warm-up records replayed.

A ``LoadedVersion`` is what a request runs on; ``load_version`` makes one from a version
folder as TF Serving does (a warm-up record that fails fails the load), and
``load_error_message`` says why a load failed without any server path in it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from keras_charrnn import warmup
from keras_charrnn.errors import InputError, ServingError, graph_error_message
from keras_charrnn.serving.signature_loader import ServedFunction, SignatureModule, load_signatures
from keras_charrnn.versions import is_version_dir
from keras_charrnn.xla import XLA_DISABLED_MESSAGE, is_xla_unavailable, must_compile_signatures, xla_twin

__all__ = ["LoadedVersion", "load_error_message", "load_version"]

log = logging.getLogger("charrnn.serve")


@dataclass
class LoadedVersion:
    """One loaded version of a model: its signatures and their SignatureDefs."""

    name: str
    version: int
    path: Path
    module: SignatureModule
    signature_defs: dict  # name -> tensorflow.core.protobuf.meta_graph_pb2.SignatureDef
    xla: bool = True  # XLA JIT on: a signature's XLA twin runs in its place (same outputs, faster)
    must_compile: frozenset = frozenset()  # signatures that need XLA JIT (keras_charrnn.xla)
    vocabulary: tuple[str, ...] | None = None  # the characters in id order, id 0 first (None: not a charrnn model)
    state_names: tuple[str, ...] | None = None  # the state tensors its exported config declares (None: unknown)

    def signature(self, name: str) -> ServedFunction:
        """The concrete function that answers signature ``name``: its XLA twin when this server runs XLA.

        Args:
            name: the signature name a request gives.

        Returns:
            The loaded concrete function (called with the signature's inputs as keyword arguments).

        Raises:
            ServingError: FAILED_PRECONDITION when the version has no such signature; INTERNAL when it
                must be compiled and XLA is off (as ``tensorflow_model_server`` answers).
        """
        if name not in self.signature_defs or name not in self.module.signatures:
            raise ServingError(
                "FAILED_PRECONDITION",
                f'Serving signature name: "{name}" not found in signature def '
                f"(model {self.name} version {self.version} has: {', '.join(sorted(self.signature_defs))})",
            )
        if name in self.must_compile and not self.xla:
            raise ServingError("INTERNAL", XLA_DISABLED_MESSAGE)  # what tensorflow_model_server answers without XLA
        twin = xla_twin(name)
        if self.xla and twin in self.signature_defs and twin in self.module.signatures:
            return self.module.signatures[twin]
        return self.module.signatures[name]


_QUOTED_PATH = re.compile(r"""(['"])(?:[A-Za-z]:)?[/\\][^'"]*\1""")  # '/any/path with spaces'
_ABSOLUTE_PATH = re.compile(r"""(?<![\w.<>])(?:[A-Za-z]:)?[/\\][^\s'")]*""")  # /a/path at a word boundary


def load_error_message(exc: BaseException, path: Path) -> str:
    """A failed load's reason for clients: the exception's first line with every file path taken out.

    Args:
        exc: what the load raised.
        path: the version folder (its path, and any other absolute path, becomes ``<path>``).

    Returns:
        ``"TypeName: first line"`` with no server path in it.

    Example:

    >>> load_error_message(OSError("cannot open /srv/m/3/variables/x.index"), Path("/srv/m/4"))
    'OSError: cannot open <path>'
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    for prefix in sorted({str(path), str(path.resolve())}, key=len, reverse=True):
        line = line.replace(prefix, "<path>")
    line = _ABSOLUTE_PATH.sub("<path>", _QUOTED_PATH.sub(r"\1<path>\1", line))
    return f"{type(exc).__name__}: {line}"[:300]


def load_version(name: str, version: int, path: Path, xla: bool = True) -> LoadedVersion:
    """Loads a SavedModel version and replays its warm-up records, as TF Serving does.

    A record that fails fails the load. With ``xla``, a record of a signature
    that has an XLA twin runs the twin (so it compiles now, not on a client's
    call); if the twin fails for want of XLA, the version falls back to the
    plain signatures for good.

    Args:
        name: the model's name.
        version: the version number.
        path: the version folder.
        xla: whether this server runs XLA-compiled functions (``--xla_cpu_compilation_enabled``).

    Returns:
        The loaded version.

    Raises:
        InputError: the folder holds no SavedModel with a ``serve`` MetaGraph
            (TensorFlow's own errors pass through for a corrupt one).
    """
    if not is_version_dir(path):
        raise InputError(f"no saved_model.pb in version {version}")
    meta = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    serve = [m for m in meta.meta_graphs if "serve" in m.meta_info_def.tags]
    if not serve:
        raise InputError(f"version {version} has no MetaGraph tagged 'serve'")
    if len(meta.meta_graphs) == 1 and set(serve[0].meta_info_def.tags) == {"serve"}:
        module = load_signatures(path, serve[0])
    else:  # TensorFlow's loader and its rules (several MetaGraphs, other tags)
        module = tf.saved_model.load(str(path), tags=["serve"])
    signature_defs = {}
    for key, sig_def in serve[0].signature_def.items():
        if not key.startswith("__"):  # copies: a part of the parsed SavedModel would keep all of it alive
            signature_defs[key] = meta_graph_pb2.SignatureDef()
            signature_defs[key].CopyFrom(sig_def)
    loaded = LoadedVersion(
        name, version, path, module, signature_defs, xla, frozenset(must_compile_signatures(serve[0]))
    )
    del meta, serve
    loaded.vocabulary, loaded.state_names = _model_facts(loaded)
    records = warmup.replay(path, lambda signature, inputs: _warm_up(loaded, signature, inputs))
    log.info(
        "model %s version %d: ran %d warm-up record(s)%s",
        name,
        version,
        records,
        "" if loaded.xla or not xla else " (without XLA: the XLA twins failed)",
    )
    return loaded


def _model_facts(loaded: LoadedVersion) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """The vocabulary and state names of a keras-charrnn model, from its ``metadata`` signature (Nones for another)."""
    if "metadata" not in loaded.signature_defs or "metadata" not in loaded.module.signatures:
        return None, None
    try:
        outputs = loaded.module.signatures["metadata"]()
        vocabulary = tuple(c.decode("utf-8") for c in np.asarray(outputs["vocabulary"].numpy()).reshape(-1))
        config = json.loads(np.asarray(outputs["config"].numpy(), dtype=object).reshape(-1)[0].decode("utf-8"))
        return vocabulary, tuple(str(n) for n in config["state_names"])
    except (KeyError, TypeError, ValueError, AttributeError, tf.errors.OpError) as exc:
        log.warning(
            "model %s version %d: its metadata does not say its vocabulary and states (%s)",
            loaded.name,
            loaded.version,
            exc,
        )
        return None, None


def _warm_up(loaded: LoadedVersion, signature: str, inputs: dict) -> None:
    """Runs one warm-up record; a twin failing for want of XLA turns XLA off for the version (once)."""
    tensors = {k: tf.constant(v) for k, v in inputs.items()}
    try:
        loaded.signature(signature)(**tensors)
    except tf.errors.OpError as exc:
        if not (loaded.xla and is_xla_unavailable(exc.message) and signature not in loaded.must_compile):
            raise InputError(f"warm-up record of {signature} failed: {graph_error_message(exc.message)}") from None
        log.warning(
            "model %s version %d: XLA twin failed (%s); serving the plain signatures",
            loaded.name,
            loaded.version,
            exc.message.splitlines()[0],
        )
        loaded.xla = False
        loaded.signature(signature)(**tensors)
