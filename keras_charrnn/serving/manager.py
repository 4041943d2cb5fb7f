"""Model manager: which versions of which models are loaded, following TF Serving's rules.

Each model has a base path whose numeric sub-folders are versions, and a
version policy (``latest { num_versions: N }`` by default with N=1, ``all``,
or ``specific { versions: ... }``). A poller rescans the base paths: versions
the policy wants are loaded (and warmed up) before the versions they replace
are unloaded; a version that fails to load never replaces one that serves, and
its error is kept for GetModelStatus. Requests hold a reference to the
``LoadedVersion`` they run on, so unloading never drops a call in flight.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus
from tensorflow_serving.config import model_server_config_pb2

from keras_charrnn.errors import ConfigError, InputError, ServingError
from keras_charrnn.serving import monitoring
from keras_charrnn.versions import list_versions

log = logging.getLogger("charrnn.serve")

State = ModelVersionStatus.State  # TF Serving's version states: START, LOADING, AVAILABLE, UNLOADING, END


@dataclass
class LoadedVersion:
    """One loaded version of a model: its signatures and their SignatureDefs."""

    name: str
    version: int
    path: Path
    module: object
    signature_defs: dict  # name -> tensorflow.core.protobuf.meta_graph_pb2.SignatureDef

    def signature(self, name: str):
        if name not in self.signature_defs or name not in self.module.signatures:
            raise ServingError("FAILED_PRECONDITION",
                               f'Serving signature name: "{name}" not found in signature def '
                               f"(model {self.name} version {self.version} has: {', '.join(sorted(self.signature_defs))})")
        return self.module.signatures[name]


@dataclass
class VersionStatus:
    """Where one version stands: a ``ModelVersionStatus.State`` value and, after a failed load, why.

    ``error_code`` is a ``tensorflow.error.Code`` name (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``).
    """

    state: int
    error: str = ""  # empty when OK
    error_code: str = ""
    fingerprint: tuple = ()


@dataclass
class ManagedModel:
    """One configured model: its config, the versions loaded and every version's status."""

    config: model_server_config_pb2.ModelConfig
    loaded: dict[int, LoadedVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)


def _fingerprint(path: Path) -> tuple:
    """Changes whenever a file in the version folder changes (to retry a failed load)."""
    items = []
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            items.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


def load_version(name: str, version: int, path: Path, warmup_batch_sizes: list[int] = (1,)) -> LoadedVersion:
    """Loads a SavedModel version and warms it up.

    Each generating signature runs once per batch size, so the XLA-compiled
    sampling loop compiles now, not on a client's call.

    Args:
        name: the model's name.
        version: the version number.
        path: the version folder.
        warmup_batch_sizes: the batch sizes calls will be padded to.

    Returns:
        The loaded version.

    Raises:
        InputError: the folder holds no SavedModel with a ``serve`` MetaGraph
            (TensorFlow's own errors pass through for a corrupt one).
    """
    pb = path / "saved_model.pb"
    if not pb.is_file():
        raise InputError(f"no saved_model.pb in version {version}")
    meta = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    serve = [m for m in meta.meta_graphs if "serve" in m.meta_info_def.tags]
    if not serve:
        raise InputError(f"version {version} has no MetaGraph tagged 'serve'")
    module = tf.saved_model.load(str(path), tags=["serve"])
    loaded = LoadedVersion(name, version, path, module,
                           {k: v for k, v in serve[0].signature_def.items() if not k.startswith("__")})
    for batch in warmup_batch_sizes:
        _warm_up(loaded, batch)
    return loaded


def _warm_up(loaded: LoadedVersion, batch: int) -> None:
    """Calls ``generate`` and ``generate_text`` once with ``batch`` rows."""
    for sig in ("generate", "generate_text"):
        if sig not in loaded.module.signatures:
            continue
        fn = loaded.module.signatures[sig]
        inputs = {}
        for key, spec in fn.structured_input_signature[1].items():
            shape = [batch if d is None else d for d in spec.shape]
            if key == "ids":
                shape = [batch, 1]
            if spec.dtype == tf.string:
                inputs[key] = tf.constant(["\n"] * shape[0])
            elif key in ("num_chars", "top_p"):
                inputs[key] = tf.ones(shape, spec.dtype)
            else:
                inputs[key] = tf.zeros(shape, spec.dtype)
        fn(**inputs)


def wanted_versions(policy: model_server_config_pb2.ModelConfig, on_disk: list[int]) -> list[int]:
    """The versions a model's version policy asks for, out of those on disk.

    Args:
        policy: the model's config; its ``model_version_policy`` is ``latest``
            (``num_versions``, default 1), ``all`` or ``specific``.
        on_disk: the version numbers found.

    Returns:
        The wanted versions, newest first.

    Example:

    >>> wanted_versions(model_server_config_pb2.ModelConfig(), [1, 3, 2])
    [3]
    """
    which = policy.model_version_policy.WhichOneof("policy_choice")
    newest_first = sorted(on_disk, reverse=True)
    if which == "all":
        return newest_first
    if which == "specific":
        return [v for v in newest_first if v in set(policy.model_version_policy.specific.versions)]
    n = policy.model_version_policy.latest.num_versions if which == "latest" else 1
    return newest_first[: max(n, 1)]


class ModelManager:
    """Loads, serves and unloads model versions by the server config.

    Args:
        config: TF Serving's ``ModelServerConfig`` (``model_config_list``).
        poll_seconds: how often base paths are rescanned (0: never after start).
    """

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, poll_seconds: float = 1.0):
        self.models: dict[str, ManagedModel] = {}
        for mc in config.model_config_list.config:
            if mc.model_platform not in ("", "tensorflow"):
                raise ConfigError(f"model {mc.name}: model_platform {mc.model_platform!r} is not supported "
                                  f"(only tensorflow)")
            self.models[mc.name] = ManagedModel(mc)
        self.poll_seconds = poll_seconds
        self.warmup_batch_sizes: list[int] = [1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Loads what the policies want now, then keeps polling in the background."""
        self.poll()
        if self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_forever, name="version-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the poller (loaded versions stay usable)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # the poller must survive anything a file system does
                log.exception("version poll failed")

    def poll(self) -> None:
        """One rescan of every base path: load wanted versions, then unload the rest."""
        for name, model in self.models.items():
            base = Path(model.config.base_path)
            folders = list_versions(base)
            on_disk = list(folders)
            if not on_disk and not model.loaded:
                log.warning("model %s: no versions under %s", name, base)
            # Try the newest wanted versions first; a failed one falls back to an older one under `latest`.
            target = self._targets(model, on_disk)
            for version in target:
                if version in model.loaded:
                    continue
                self._try_load(model, version, folders[version])
            keep = set(self._targets(model, on_disk, only_loaded=True))
            for version in list(model.loaded):
                if version not in keep:
                    with self._lock:
                        model.loaded.pop(version)
                        model.status[version] = VersionStatus(State.END)
                    log.info("model %s: unloaded version %d", name, version)

    def _targets(self, model: ManagedModel, on_disk: list[int], only_loaded: bool = False) -> list[int]:
        """Wanted versions, skipping ones that failed to load (and, under `latest`, reaching past them)."""
        usable = [v for v in on_disk if not (model.status.get(v) and model.status[v].error)]
        if only_loaded:
            usable = [v for v in usable if v in model.loaded]
        wanted = wanted_versions(model.config, usable)
        if only_loaded and not wanted and model.loaded:
            return sorted(model.loaded, reverse=True)[:1]  # never leave a model with nothing to serve
        return wanted

    def _try_load(self, model: ManagedModel, version: int, path: Path) -> None:
        name = model.config.name
        status = model.status.get(version)
        fingerprint = _fingerprint(path)
        if status and status.error and status.fingerprint == fingerprint:
            return  # failed before and unchanged since
        model.status[version] = VersionStatus(State.LOADING)
        started = time.perf_counter()
        try:
            loaded = load_version(name, version, path, self.warmup_batch_sizes)
        except Exception as exc:  # a corrupt model can raise anything
            monitoring.record_load(path, False, time.perf_counter() - started)
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            code = "NOT_FOUND" if isinstance(exc, (tf.errors.NotFoundError, FileNotFoundError)) else "INVALID_ARGUMENT"
            model.status[version] = VersionStatus(State.END, error, code, fingerprint)
            log.error("model %s: refused version %d (%s)", name, version, error)
            return
        monitoring.record_load(path, True, time.perf_counter() - started)
        with self._lock:
            model.loaded[version] = loaded
            model.status[version] = VersionStatus(State.AVAILABLE)
        log.info("model %s: loaded version %d from %s", name, version, path)

    def ready(self) -> bool:
        """True when every model has a version that serves."""
        return all(m.loaded for m in self.models.values())

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> LoadedVersion:
        """The version that answers a request.

        Args:
            name: the model's name.
            version: a version number, or None for the newest loaded one.
            label: a version label of the model's config (overrides ``version``).

        Returns:
            The loaded version.

        Raises:
            ServingError: NOT_FOUND for an unknown model, label or version.
        """
        model = self.models.get(name)
        if model is None:
            raise ServingError("NOT_FOUND", f"Servable not found for request: model {name!r} is not served")
        if label:
            if label not in model.config.version_labels:
                raise ServingError("NOT_FOUND", f"model {name}: unknown version label {label!r}")
            version = model.config.version_labels[label]
        with self._lock:
            if version is None:
                if not model.loaded:
                    raise ServingError("NOT_FOUND", f"model {name}: no version is loaded")
                return model.loaded[max(model.loaded)]
            if version not in model.loaded:
                raise ServingError("NOT_FOUND", f"Servable not found for request: Specific({name}, {version})"
                                   f"; loaded versions: {sorted(model.loaded) or 'none'}")
            return model.loaded[version]

    def statuses(self, name: str, version: int | None = None) -> list[tuple[int, VersionStatus]]:
        """Every version's status, as GetModelStatus reports them.

        Args:
            name: the model's name.
            version: only this version (None: all).

        Returns:
            ``(version, status)`` pairs, newest first.

        Raises:
            ServingError: NOT_FOUND for an unknown model or a version never seen.
        """
        model = self.models.get(name)
        if model is None:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        with self._lock:
            items = sorted(model.status.items(), reverse=True)
        if version is not None:
            items = [(v, s) for v, s in items if v == version]
            if not items:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
        return items


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config that ``model_name`` and ``model_base_path`` stand for.

    Args:
        name: the model's name.
        base_path: the folder of its numbered versions.

    Returns:
        A ``ModelServerConfig`` with that one model (default version policy: the latest).
    """
    config = model_server_config_pb2.ModelServerConfig()
    mc = config.model_config_list.config.add()
    mc.name, mc.base_path, mc.model_platform = name, str(Path(base_path).resolve()), "tensorflow"
    return config

