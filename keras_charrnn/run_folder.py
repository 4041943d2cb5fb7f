"""The run folder: everything one training run writes, and the one place its file names are spelled.

::

    RUN_DIR/config.json   the TrainConfig, the corpus it trained on (files, hash), the vocabulary size, the backend
    RUN_DIR/vocab.json    the vocabulary
    RUN_DIR/state.npz     latest full training state (resume from here; see checkpoint.py)
    RUN_DIR/best.keras    best model by validation loss
    RUN_DIR/log.csv       one row per epoch: loss, bpc, perplexity, val_*
    RUN_DIR/curves.png    the bpc curves
    RUN_DIR/samples.txt   text sampled during training (each epoch end or every ``sample_every`` batches)
    RUN_DIR/tensorboard/  TensorBoard logs (with ``tensorboard=True``)

Example:

>>> run = RunFolder("runs/tiny")                      # doctest: +SKIP
>>> model = run.load_model("best"); vocab = run.vocab()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keras_charrnn.config import TrainConfig, resume_changes
from keras_charrnn.corpus import find_files
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.fileio import atomic_write_text
from keras_charrnn.versions import is_version_dir
from keras_charrnn.vocab import Vocabulary

# Keras (and checkpoint.py and model.py, which import it) is imported only where a model or a checkpoint is
# read, so the paths, the records and the checks of ``check_training_inputs`` need no TensorFlow: the CLI runs
# them before it imports TensorFlow, and a typo is answered at once.
if TYPE_CHECKING:
    import keras

    from keras_charrnn.checkpoint import Progress

# Outputs of a previous run in the same folder that a new run must not append to or mistake for its own.
_STALE_ON_NEW_RUN = ("log_path", "curves_path", "best_path", "samples_path")


class RunFolder:
    """The files of one training run.

    Args:
        path: the run folder (it need not exist yet).

    Attributes:
        path, config_path, vocab_path, state_path, best_path, log_path,
        curves_path, samples_path, tensorboard_dir: ``pathlib.Path`` of each part.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.vocab_path = self.path / "vocab.json"
        self.state_path = self.path / "state.npz"
        self.best_path = self.path / "best.keras"
        self.log_path = self.path / "log.csv"
        self.curves_path = self.path / "curves.png"
        self.samples_path = self.path / "samples.txt"
        self.tensorboard_dir = self.path / "tensorboard"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        """Whether ``path`` is a training run folder.

        Args:
            path: any path.

        Returns:
            True when it holds ``config.json`` and is not a SavedModel folder.
        """
        run = RunFolder(path)
        return run.config_path.is_file() and not is_version_dir(run.path)

    def has_checkpoint(self) -> bool:
        """Whether a training state has been saved (the folder holds a run, started or done)."""
        return self.state_path.exists()

    def check_new_run(self) -> None:
        """Checks that a new run may start here, without writing anything.

        Raises:
            ConfigError: the folder already holds a run.
            InputError: the folder cannot be made or written: a file stands at its path or at a
                parent's, or the nearest existing folder is read-only (``start``'s message).
        """
        if self.has_checkpoint():
            raise ConfigError(f"{self.path} already holds a run; resume it or choose another run_dir")
        existing = self.path
        while not existing.exists() and existing != existing.parent:  # the nearest path that exists
            existing = existing.parent
        if not existing.exists():
            return
        if not existing.is_dir():
            code = errno.EEXIST if existing == self.path else errno.ENOTDIR  # what mkdir would raise
        elif not os.access(existing, os.W_OK | os.X_OK):
            code = errno.EACCES
        else:
            return
        raise self._cannot_write(OSError(code, os.strerror(code)))

    def _cannot_write(self, exc: OSError) -> InputError:
        return InputError(f"{self.path}: cannot write the run folder ({exc.strerror or exc})")

    def resumed_config(self, changes: Mapping[str, Any]) -> tuple[TrainConfig, dict[str, tuple]]:
        """The config of the run to resume here, with the allowed changes applied.

        Args:
            changes: config fields to change (see ``config.resume_changes``).

        Returns:
            ``(config, changed)`` as ``config.resume_changes`` gives them.

        Raises:
            InputError: nothing to resume (no ``config.json``), or it is unreadable.
            ConfigError: a change would alter the run.
        """
        if not self.config_path.is_file():
            raise InputError(f"{self.path}: nothing to resume (no {self.config_path.name}); start without resume")
        return resume_changes(self.config(), changes)

    def _read_config_file(self) -> dict:
        if not self.config_path.is_file():
            raise InputError(f"{self.path}: not a run folder (no {self.config_path.name})")
        try:
            record = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            from keras_charrnn.checkpoint import unreadable

            raise unreadable(self.config_path, "run config", exc) from None
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise InputError(f"{self.config_path}: not a run config (no 'config' object)")
        return record

    def record(self) -> dict:
        """``config.json``'s content plus where training stands.

        Returns:
            The dict of ``config.json`` (``config``, ``corpus``, ``vocab_size``) with
            ``best_val_loss`` and ``epochs_done`` added from the checkpoint (None before one).

        Raises:
            InputError: not a run folder, or a file of it is unreadable.
        """
        record = self._read_config_file()
        progress = self.progress() if self.state_path.is_file() else None
        record["best_val_loss"] = progress.best_val_loss if progress else None
        record["epochs_done"] = progress.epoch if progress else None
        return record

    def progress(self) -> Progress:
        """The progress record of the latest checkpoint (raises InputError if missing or corrupt)."""
        from keras_charrnn.checkpoint import read_progress

        return read_progress(self.state_path)

    def config(self) -> TrainConfig:
        """The run's ``TrainConfig`` (raises InputError if ``config.json`` is missing or malformed)."""
        saved = self._read_config_file()["config"]
        try:
            return TrainConfig(**saved)
        except TypeError as exc:
            raise InputError(f"{self.config_path}: malformed config ({exc})") from None

    def corpus_sha256(self) -> str | None:
        """The SHA-256 of the corpus the run trained on, as recorded in ``config.json``."""
        return self._read_config_file().get("corpus", {}).get("sha256")

    def corpus_path(self) -> str | None:
        """The path of the corpus the run trained on, as recorded in ``config.json``."""
        return self._read_config_file().get("corpus", {}).get("path")

    def backend(self) -> str | None:
        """The Keras backend the run trains on, as recorded in ``config.json``.

        Returns:
            ``"tensorflow"``, ``"jax"``, ...; None for a run from before 0.2.0, which recorded none.

        Raises:
            InputError: not a run folder, or ``config.json`` is unreadable.
        """
        backend = self._read_config_file().get("backend")
        return backend if isinstance(backend, str) else None

    def corpus_record(self) -> dict:
        """The corpus record of ``config.json``: ``path``, ``files``, ``skipped``, ``separator``, ``chars``,
        ``sha256``."""
        return dict(self._read_config_file().get("corpus", {}))

    def update_config(self, config: TrainConfig) -> None:
        """Rewrites the config of ``config.json`` (after a resume changed some fields), keeping the rest.

        Args:
            config: the run's new config.

        Raises:
            InputError: not a run folder, or it cannot be written.
        """
        record = self._read_config_file()
        record["config"] = dataclasses.asdict(config)
        try:
            atomic_write_text(self.config_path, json.dumps(record, indent=2))
        except OSError as exc:
            raise InputError(f"{self.config_path}: cannot write ({exc.strerror or exc})") from None

    def update_record(self, **sections: Any) -> None:
        """Adds or replaces top-level sections of ``config.json`` (e.g. ``budget=...``, what a time budget chose),
        keeping the rest.

        Args:
            **sections: JSON-serialisable values by section name (not ``config``, ``corpus`` or ``vocab_size``).

        Raises:
            InputError: not a run folder, or it cannot be written.
        """
        record = self._read_config_file()
        record.update(sections)
        try:
            atomic_write_text(self.config_path, json.dumps(record, indent=2))
        except OSError as exc:
            raise InputError(f"{self.config_path}: cannot write ({exc.strerror or exc})") from None

    def vocab(self) -> Vocabulary:
        """The run's vocabulary (raises InputError if missing or malformed)."""
        return Vocabulary.load(self.vocab_path)

    def start(self, config: TrainConfig, corpus: dict, vocab: Vocabulary, backend: str | None = None) -> None:
        """Begins a new run here: writes the vocabulary and the config, removes a previous run's outputs.

        Args:
            config: the run's hyper-parameters.
            corpus: what was trained on (``corpus.CorpusScan.record``: ``path``, ``files``, ``chars``, ``sha256``...).
            vocab: the run's vocabulary.
            backend: the Keras backend it trains on (recorded, so that a resume keeps it).

        Raises:
            InputError: the folder cannot be written (a file stands there, no permission).
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            vocab.save(self.vocab_path)
            atomic_write_text(
                self.config_path,
                json.dumps(
                    {
                        "config": dataclasses.asdict(config),
                        "corpus": corpus,
                        "vocab_size": vocab.size,
                        "backend": backend,
                    },
                    indent=2,
                ),
            )
            for name in _STALE_ON_NEW_RUN:
                getattr(self, name).unlink(missing_ok=True)
        except OSError as exc:
            raise self._cannot_write(exc) from None

    def load_model(self, which: str = "best") -> keras.Model:
        """Loads the run's model.

        Args:
            which: ``"best"`` (``best.keras``; the latest weights when there is none yet)
                or ``"latest"`` (the weights of ``state.npz``).

        Returns:
            The Keras model: ``best.keras`` as saved, or the stateful training model
            with the checkpoint's weights, hidden states and optimizer restored.

        Raises:
            ConfigError: ``which`` is neither "best" nor "latest".
            InputError: the folder, its config or the model file is missing or corrupt
                (the message names the file).
        """
        if which not in ("best", "latest"):
            raise ConfigError(f"which must be 'best' or 'latest', got {which!r}")
        if which == "best" and self.best_path.is_file():
            return self._load_best()
        from keras_charrnn.checkpoint import load_checkpoint
        from keras_charrnn.model import compile_model, make_optimizer, model_from_config

        config = self.config()
        model = model_from_config(config, self.vocab().size)
        compile_model(model, make_optimizer(config, 1))
        load_checkpoint(self.state_path, model)
        return model

    def _load_best(self) -> keras.Model:
        import keras

        from keras_charrnn.checkpoint import UNREADABLE, unreadable

        try:
            return keras.models.load_model(self.best_path, compile=False)
        except UNREADABLE as exc:
            raise unreadable(self.best_path, "model", exc) from None


def check_training_inputs(
    corpus: str | os.PathLike,
    run: RunFolder,
    config: TrainConfig | None = None,
    resume: bool = False,
    changes: Mapping[str, Any] | None = None,
) -> tuple[TrainConfig, dict[str, tuple]]:
    """The checks ``train.train`` makes before it reads the corpus; no Keras, so ``charrnn train`` makes
    them before it imports TensorFlow.

    The corpus is only looked up (``corpus.find_files``), not read: its UTF-8 and its length are
    checked where it is read.

    Args:
        corpus: a file, a folder or a glob pattern.
        run: the run folder (of a new run: the folder this process writes).
        config: a new run's hyper-parameters (default: ``TrainConfig()``); ignored with ``resume``.
        resume: continue the run in ``run``.
        changes: with ``resume``, config fields to change.

    Returns:
        ``(config, changed)``: the config to train with, validated, and ``{field: (old, new)}``
        of a resume's changes (empty for a new run).

    Raises:
        ConfigError: a hyper-parameter is invalid, ``run`` already holds a run, or ``changes``
            would alter a resumed run.
        InputError: no corpus files, nothing to resume, or a new run folder that cannot be written.
    """
    if resume:
        config, changed = run.resumed_config(changes or {})
    else:
        run.check_new_run()
        config, changed = config or TrainConfig(), {}
    find_files(corpus)
    config.validate()
    return config, changed
