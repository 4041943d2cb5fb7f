"""The model manager: which versions of which models are loaded, by TF Serving's policies, labels and live config.

Loading one version is ``version_loader``'s job; this module decides which to load and when.
Each model has a base path whose numeric sub-folders are versions, and a version policy
(``latest { num_versions: N }`` by default with N=1, ``all``, or ``specific { versions: ... }``).
A poller rescans the base paths: versions the policy wants are loaded (and warmed up: a
version is AVAILABLE only once its warm-up records have run, see ``keras_charrnn.warmup``)
before the versions they replace are unloaded; a version that fails to load never replaces
one that serves, and its error is kept for GetModelStatus. Requests hold a reference to the
``LoadedVersion`` they run on, so unloading never drops a call in flight.

Version labels (``version_labels`` of a model's config) and live config
(``reload_config``, ``watch_config_file``) follow TF Serving's rules: a label
names an AVAILABLE version (unless ``allow_version_labels_for_unavailable_models``
lets a new label wait for its version), and a config that breaks a rule changes nothing.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import tensorflow as tf
from tensorflow_serving.apis.get_model_status_pb2 import ModelVersionStatus
from tensorflow_serving.config import model_server_config_pb2

from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.serving import monitoring
from keras_charrnn.serving.config_files import model_config_problem, parse_text_proto
from keras_charrnn.serving.version_loader import LoadedVersion, load_error_message, load_version
from keras_charrnn.versions import list_versions

log = logging.getLogger("charrnn.serve")

State = ModelVersionStatus.State  # TF Serving's version states: START, LOADING, AVAILABLE, UNLOADING, END


@dataclass
class VersionStatus:
    """Where one version stands: a ``ModelVersionStatus.State`` value and, after a failed load, why.

    ``error_code`` is a ``tensorflow.error.Code`` name (``"INVALID_ARGUMENT"``, ``"NOT_FOUND"``).
    """

    state: int
    error: str = ""  # empty when OK
    error_code: str = ""
    fingerprint: tuple = ()  # of the folder as it was when the load failed
    failures: int = 0  # failed loads in a row (the retry backoff grows with them)
    retry_at: float = 0.0  # time.monotonic() before which a failed version is not retried


@dataclass
class ManagedModel:
    """One configured model: its config, the versions loaded and every version's status."""

    config: model_server_config_pb2.ModelConfig
    loaded: dict[int, LoadedVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)
    seen: dict[int, tuple] = field(default_factory=dict)  # failed version -> its fingerprint at the last poll


MAX_RETRY_BACKOFF_SECONDS = 60.0  # the longest a changed, failed version waits for its next try


def _fingerprint(path: Path) -> tuple:
    """Changes whenever a file in the version folder changes (to retry a failed load)."""
    items = []
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.stat(os.path.join(root, f))
            except OSError:  # removed while we looked
                continue
            items.append((os.path.relpath(os.path.join(root, f), path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


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
        xla: run the XLA-compiled twins of the signatures (TF Serving's ``xla_cpu_compilation_enabled``).
        allow_version_labels_for_unavailable_models: let a new version label name a version
            that is not loaded yet (TF Serving's setting of that name).
        on_change: called (no arguments) after every poll, e.g. to update the server's health.
        on_remove: called with the names of the models a config reload removed.

    Raises:
        ConfigError: the config cannot be served (``model_config_problem``: no models, a model
            without a name or base_path, a platform other than tensorflow, a bad version label).
    """

    def __init__(
        self,
        config: model_server_config_pb2.ModelServerConfig,
        poll_seconds: float = 1.0,
        xla: bool = True,
        allow_version_labels_for_unavailable_models: bool = False,
        on_change: Callable[[], None] | None = None,
        on_remove: Callable[[list[str]], None] | None = None,
    ):
        problem = model_config_problem(config)
        if problem:
            raise ConfigError(problem)
        self.models: dict[str, ManagedModel] = {mc.name: ManagedModel(mc) for mc in config.model_config_list.config}
        self.poll_seconds = poll_seconds
        self.xla = xla
        self.allow_version_labels_for_unavailable_models = allow_version_labels_for_unavailable_models
        self.on_change = on_change
        self.on_remove = on_remove
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.config = model_server_config_pb2.ModelServerConfig()  # the config in force
        self.config.CopyFrom(config)
        self._config_lock = threading.RLock()  # keeps a config reload and a version poll apart
        self._config_file_text: str | None = None  # the config file's text last applied (or refused for good)
        self._config_file_error = ""  # the last reason logged for refusing it (logged once)

    def start(self) -> None:
        """Loads what the policies want now, then keeps polling in the background."""
        self.poll()
        self.check_labels_at_start()
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
                with self._config_lock:  # a config reload swaps the models: never in the middle of a poll
                    self.poll()
            except Exception:  # the poller must survive anything a file system does
                log.exception("version poll failed")

    def poll(self) -> None:
        """One rescan of every base path: load wanted versions, then unload the rest.

        A version that failed to load is tried again once its files have changed
        and then stayed the same for one poll (a copy in progress is not loaded
        half-way), no sooner than its backoff allows.
        """
        unloaded = 0
        for name, model in self.models.items():
            base = Path(model.config.base_path)
            folders = list_versions(base)
            on_disk = list(folders)
            if not on_disk and not model.loaded:
                log.warning("model %s: no versions under %s", name, base)
            retry = self._retryable(model, folders)
            # Try the newest wanted versions first; a failed one falls back to an older one under `latest`.
            tried: set[int] = set()
            while True:
                target = [
                    v for v in self._targets(model, on_disk, retry=retry) if v not in model.loaded and v not in tried
                ]
                if not target:
                    break
                tried.add(target[0])
                retry.discard(target[0])
                self._try_load(model, target[0], folders[target[0]])
            keep = set(self._targets(model, on_disk, only_loaded=True))
            for version in list(model.loaded):
                if version not in keep:
                    with self._lock:
                        model.loaded.pop(version)
                        model.status[version] = VersionStatus(State.END)
                    unloaded += 1
                    log.info("model %s: unloaded version %d", name, version)
            for version in list(model.seen):
                if version not in folders:
                    model.seen.pop(version)
        if unloaded:
            gc.collect()  # a version's variables and functions are freed now, not at some later collection
        log.debug("version poll done")  # tests count polls by it
        if self.on_change is not None:
            self.on_change()

    def _retryable(self, model: ManagedModel, folders: dict[int, Path]) -> set[int]:
        """Failed versions whose files changed since the failure and were stable since the last poll."""
        now, ready = time.monotonic(), set()
        for version, status in list(model.status.items()):
            if not status.error or version not in folders:
                continue
            current = _fingerprint(folders[version])
            previous, model.seen[version] = model.seen.get(version), current
            if current != status.fingerprint and current == previous and now >= status.retry_at:
                ready.add(version)
        return ready

    def _targets(
        self, model: ManagedModel, on_disk: list[int], only_loaded: bool = False, retry: AbstractSet[int] = frozenset()
    ) -> list[int]:
        """Wanted versions, skipping ones that failed to load (and, under `latest`, reaching past them)."""
        usable = [v for v in on_disk if v in retry or not (model.status.get(v) and model.status[v].error)]
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
        failures = status.failures if status and status.error else 0
        model.status[version] = VersionStatus(State.LOADING)
        started = time.perf_counter()
        try:
            loaded = load_version(name, version, path, self.xla)
        except Exception as exc:  # a corrupt model can raise anything
            monitoring.record_load(path, False, time.perf_counter() - started)
            error = load_error_message(exc, path)  # clients see this: no server paths
            code = "NOT_FOUND" if isinstance(exc, (tf.errors.NotFoundError, FileNotFoundError)) else "INVALID_ARGUMENT"
            backoff = min(max(self.poll_seconds, 0.1) * 2**failures, MAX_RETRY_BACKOFF_SECONDS)
            model.status[version] = VersionStatus(
                State.END, error, code, fingerprint, failures + 1, time.monotonic() + backoff
            )
            model.seen[version] = fingerprint
            log.error(
                "model %s: refused version %d (%s: %s); retried when its files change",
                name,
                version,
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
            )
            return
        monitoring.record_load(path, True, time.perf_counter() - started)
        with self._lock:
            model.loaded[version] = loaded
            model.status[version] = VersionStatus(State.AVAILABLE)
        log.info("model %s: loaded version %d from %s", name, version, path)

    def serving(self) -> dict[str, bool]:
        """Each model's readiness: True while at least one of its versions is AVAILABLE."""
        with self._lock:
            return {name: bool(m.loaded) for name, m in self.models.items()}

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> LoadedVersion:
        """The version that answers a request.

        Args:
            name: the model's name.
            version: a version number, or None for the newest loaded one.
            label: a version label of the model's config (overrides ``version``).

        Returns:
            The loaded version.

        Raises:
            ServingError: NOT_FOUND for an unknown model or a version not loaded (also one a label
                points to); INVALID_ARGUMENT for a label the model's config does not have.
        """
        if label:  # as TF Serving: the label is looked up first, INVALID_ARGUMENT if the model has no such label
            version = self.label_version(name, label)
        model = self.models.get(name)
        if model is None:
            raise ServingError("NOT_FOUND", f"Servable not found for request: model {name!r} is not served")
        with self._lock:
            if version is None:
                if not model.loaded:
                    raise ServingError("NOT_FOUND", f"model {name}: no version is loaded")
                return model.loaded[max(model.loaded)]
            if version not in model.loaded:
                raise ServingError(
                    "NOT_FOUND",
                    f"Servable not found for request: Specific({name}, {version})"
                    f"; loaded versions: {sorted(model.loaded) or 'none'}",
                )
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

    # ----- version labels and live config (TF Serving's ReloadConfig) ---------------------------

    def label_version(self, name: str, label: str) -> int:
        """The version a label of the model's config points to.

        Args:
            name: the model's name.
            label: a key of its config's ``version_labels``.

        Returns:
            The version number (it may not be loaded: ``resolve`` then answers NOT_FOUND).

        Raises:
            ServingError: INVALID_ARGUMENT ("Unrecognized servable version label", as TF Serving)
                when the model is not served or has no such label.
        """
        model = self.models.get(name)
        if model is None or label not in model.config.version_labels:
            raise ServingError("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
        return int(model.config.version_labels[label])

    def labels(self, name: str) -> dict[str, int]:
        """A model's version labels (label -> version); empty for an unknown model."""
        model = self.models.get(name)
        return dict(model.config.version_labels) if model is not None else {}

    def _check_labels(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """TF Serving's rule for ``version_labels``: a label points to an AVAILABLE version.

        With ``allow_version_labels_for_unavailable_models``, a new label (or one that keeps
        its version) may point to a version not loaded yet; moving an existing label still
        needs its new version AVAILABLE, so requests on the label never fail while it loads.

        Raises:
            ServingError: FAILED_PRECONDITION naming the model, label and version.
        """
        for mc in config.model_config_list.config:
            current = self.models.get(mc.name)
            with self._lock:
                available = set(current.loaded) if current is not None else set()
            old_labels = dict(current.config.version_labels) if current is not None else {}
            for label, version in sorted(mc.version_labels.items()):
                if version in available:
                    continue
                if self.allow_version_labels_for_unavailable_models and old_labels.get(label, version) == version:
                    continue
                moving = label in old_labels and old_labels[label] != version
                raise ServingError(
                    "FAILED_PRECONDITION",
                    f"Request to assign label to version {version} of model {mc.name}, which is not currently "
                    f"available for inference (label {label!r}; available versions: {sorted(available) or 'none'}"
                    + (
                        "; moving an existing label needs its new version available even with "
                        "allow_version_labels_for_unavailable_models"
                        if moving and self.allow_version_labels_for_unavailable_models
                        else ""
                    )
                    + ")",
                )

    def check_labels_at_start(self) -> None:
        """Checks the starting config's labels once its versions have loaded.

        (A stock ``tensorflow_model_server`` checks them before loading anything, so there a
        labelled config at start needs ``--allow_version_labels_for_unavailable_models``.)

        Raises:
            ConfigError: a label points to a version that did not load, and
                ``allow_version_labels_for_unavailable_models`` is off.
        """
        if self.allow_version_labels_for_unavailable_models:
            return
        with self._lock:
            loaded = {name: sorted(m.loaded) for name, m in self.models.items()}
        for mc in self.config.model_config_list.config:
            for label, version in sorted(mc.version_labels.items()):
                if version not in loaded.get(mc.name, ()):
                    raise ConfigError(
                        f"model {mc.name}: version_labels {label!r} points to version {version}, "
                        f"which is not available (loaded: {loaded.get(mc.name) or 'none'}); set "
                        f"allow_version_labels_for_unavailable_models to label a version before "
                        f"it loads"
                    )

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Applies a new ``ModelServerConfig`` without a restart, as TF Serving's ReloadConfig.

        Models new in ``config`` are loaded before this returns; models no longer in it are
        removed: new calls get NOT_FOUND, while calls in flight finish on the version they
        hold. Kept models take the new version policy and labels (versions the policy no
        longer wants are unloaded). A config that is invalid, or whose labels break TF
        Serving's rule (see ``_check_labels``), changes nothing.

        Args:
            config: the new config (a ``model_config_list``).

        Raises:
            ServingError: INVALID_ARGUMENT for an invalid config, FAILED_PRECONDITION for a
                label on a version that is not available.

        Example:

        >>> manager.reload_config(read_text_proto("models.config", ModelServerConfig()))  # doctest: +SKIP
        """
        problem = model_config_problem(config)
        if problem:
            raise ServingError("INVALID_ARGUMENT", problem)
        with self._config_lock:
            self._check_labels(config)
            for mc in config.model_config_list.config:
                if mc.name not in self.models and not list_versions(mc.base_path):
                    raise ServingError("INVALID_ARGUMENT", f"model {mc.name}: no version folders under its base_path")
            models: dict[str, ManagedModel] = {}
            for mc in config.model_config_list.config:
                old = self.models.get(mc.name)
                if old is not None and Path(old.config.base_path).resolve() == Path(mc.base_path).resolve():
                    models[mc.name] = old
                else:  # new, or moved to another folder: a fresh start
                    models[mc.name] = ManagedModel(model_server_config_pb2.ModelConfig())
            removed = {name: m for name, m in self.models.items() if models.get(name) is not m}
            with self._lock:
                for mc in config.model_config_list.config:  # kept models take their new policy and labels
                    models[mc.name].config = model_server_config_pb2.ModelConfig()
                    models[mc.name].config.CopyFrom(mc)
                self.models = models  # new calls see the new config from here on
                for model in removed.values():
                    for version in model.loaded:
                        model.status[version] = VersionStatus(State.END)
                    model.loaded.clear()  # calls in flight keep their LoadedVersion until they finish
                self.config.CopyFrom(config)
            for name in removed:
                log.info(
                    "model %s: %s",
                    name,
                    "base_path changed: starting afresh"
                    if name in models
                    else "removed from the config; new calls get NOT_FOUND",
                )
            gone = [name for name in removed if name not in models]
            if gone and self.on_remove is not None:
                self.on_remove(gone)
            self.poll()  # loads the new models and versions, unloads what the new policies drop
        log.info(
            "model config reloaded: %s",
            ", ".join(
                f"{mc.name}" + (f" (labels {dict(sorted(mc.version_labels.items()))})" if mc.version_labels else "")
                for mc in config.model_config_list.config
            ),
        )

    def watch_config_file(self, path: str | Path, poll_seconds: float) -> None:
        """Rereads the config file every ``poll_seconds`` and applies it when it changed.

        A file that does not parse, or is refused by ``reload_config``, leaves the config
        in force and is logged once; one refused only because a label's version is not
        available yet is tried again at each poll (it applies once the version loads).

        Args:
            path: the ``model_config_file``.
            poll_seconds: seconds between reads (0 or less: no watching, as TF Serving).
        """
        if poll_seconds <= 0:
            return
        self._config_file_text = None

        def watch() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.reload_config_file(path)
                except Exception:  # the watcher must survive anything
                    log.exception("config file poll failed")

        threading.Thread(target=watch, name="config-file-poller", daemon=True).start()

    def reload_config_file(self, path: str | Path) -> bool:
        """One read of the config file: applies it if it differs from the config in force.

        Args:
            path: the ``model_config_file``.

        Returns:
            True when a new config was applied.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self._refuse_config_file(
                path, f"cannot read it ({exc.strerror if isinstance(exc, OSError) else exc})", None
            )
            return False
        if text == self._config_file_text:
            return False
        try:
            config = parse_text_proto(text, model_server_config_pb2.ModelServerConfig())
        except ConfigError as exc:
            self._refuse_config_file(path, str(exc), text)
            return False
        if config == self.config:
            self._config_file_text = text
            return False
        try:
            self.reload_config(config)
        except ServingError as exc:
            retry = exc.code == "FAILED_PRECONDITION"  # a label's version may become available later
            self._refuse_config_file(path, exc.message, None if retry else text)
            return False
        self._config_file_text, self._config_file_error = text, ""
        return True

    def _refuse_config_file(self, path, reason: str, text: str | None) -> None:
        """Logs (once per reason) that the config file was not applied; ``text`` is not tried again."""
        if reason != self._config_file_error:
            log.error("model config file %s not applied: %s; the config in force stays", path, reason)
        self._config_file_error = reason
        if text is not None:
            self._config_file_text = text
