"""Training: corpus (file, folder or glob) -> vocabulary and ids -> TBPTT batches -> ``model.fit`` -> run folder.

What the run folder holds is described in ``run_folder.py``; the defaults are
``TrainConfig``'s, in ``config.py``; how a corpus is read, in ``corpus.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from keras_charrnn.budget import plan_budget
from keras_charrnn.callbacks import CharMetrics, EpochSummary, PlotCurves, ResetStates, SampleText, TrainingCheckpoint
from keras_charrnn.checkpoint import Progress, load_checkpoint
from keras_charrnn.config import SAMPLE_TEMPERATURES, TrainConfig
from keras_charrnn.corpus import Corpus, CorpusScan, encode, scan
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.model import compile_model, make_optimizer, model_from_config, reset_states
from keras_charrnn.run_folder import RunFolder, check_training_inputs
from keras_charrnn.sampling import DEFAULT_PRIME
from keras_charrnn.tbptt import TBPTTBatches, split_train_val
from keras_charrnn.vocab import Vocabulary

__all__ = ["train", "prepare_data", "load_data", "TrainingDiverged"]


class TrainingDiverged(ConfigError):
    """The loss became NaN or infinite; the run folder keeps the last good checkpoint.

    A ``ConfigError``: the remedy is a setting (a lower ``lr`` or ``clip_norm``).
    """


def prepare_data(
    text: str, config: TrainConfig, vocab: Vocabulary | None = None, name: str = "corpus"
) -> tuple[Vocabulary, TBPTTBatches, TBPTTBatches | None]:
    """Encodes a corpus and lays it out for truncated BPTT.

    Args:
        text: the corpus.
        config: supplies ``batch_size``, ``seq_len`` and ``val_frac``.
        vocab: the vocabulary to encode with (default: the corpus's own).
        name: what the corpus is called in error messages.

    Returns:
        ``(vocab, train_batches, val_batches)``; ``val_batches`` is None when
        ``config.val_frac`` is 0.
    """
    vocab = vocab or Vocabulary.from_text(text)
    return (vocab, *_layout(vocab.encode(text), config, name))


def _layout(ids: np.ndarray, config: TrainConfig, name: str) -> tuple[TBPTTBatches, TBPTTBatches | None]:
    """The training and validation batches of encoded ids (views on ``ids``, not copies)."""
    train_ids, val_ids = split_train_val(ids, config.val_frac)
    train = TBPTTBatches(train_ids, config.batch_size, config.seq_len, name=f"{name} (training part)")
    val = None
    if len(val_ids):
        val = TBPTTBatches(
            val_ids, config.batch_size, config.seq_len, name=f"{name} (validation part, val_frac {config.val_frac})"
        )
    return train, val


def load_data(
    corpus: str | os.PathLike, config: TrainConfig, vocab: Vocabulary | None = None, strict: bool = False
) -> tuple[Corpus, TBPTTBatches, TBPTTBatches | None]:
    """Reads a corpus in blocks, encodes it and lays it out for truncated BPTT.

    Peak memory is the id array (1-4 bytes per character, see ``corpus.py``) plus a few blocks.

    Args:
        corpus: a file, a folder or a glob pattern.
        config: supplies ``batch_size``, ``seq_len`` and ``val_frac``.
        vocab: the vocabulary to encode with (default: the corpus's own).
        strict: refuse files that are not UTF-8 instead of skipping them.

    Returns:
        ``(corpus, train_batches, val_batches)``; ``val_batches`` is None when ``val_frac`` is 0.
    """
    found = scan(corpus, strict)
    return _encoded(found, vocab or Vocabulary(found.chars_seen), config)


def _encoded(
    found: CorpusScan, vocab: Vocabulary, config: TrainConfig
) -> tuple[Corpus, TBPTTBatches, TBPTTBatches | None]:
    data = Corpus(encode(found, vocab), vocab, found.record())
    return (data, *_layout(data.ids, config, found.spec))


def _check_same_corpus(run: RunFolder, found: CorpusScan) -> None:
    """Refuses a corpus whose joined text differs from the one the run trained on, naming the files that differ."""
    saved = run.corpus_record()
    if saved.get("sha256") == found.sha256:
        return
    why = ""
    if "files" in saved:
        added = [n for n in found.names if n not in set(saved["files"])]
        missing = [n for n in saved["files"] if n not in set(found.names)]
        parts = [
            f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for label, names in (("new files", added), ("missing files", missing))
            if names
        ]
        why = "; ".join(parts) or "the same files with different text"
        why = f" ({why})"
    raise InputError(f"{found.spec}: not the corpus this run was trained on ({saved.get('path')}){why}")


def _build(config: TrainConfig, vocab: Vocabulary, steps_per_epoch: int, dist: Any = None) -> keras.Model:
    """The compiled training model, seeded by ``config.seed``; under ``dist`` (a ``distribute.Distribution``)
    built in its strategy's scope with the per-replica batch."""
    keras.utils.set_random_seed(config.seed)
    if dist is None:
        model = model_from_config(config, vocab.size)
        return compile_model(model, make_optimizer(config, steps_per_epoch * config.epochs))
    dist.check_batch(config.batch_size)
    with dist.scope():
        model = model_from_config(config, vocab.size, replicas=dist.replicas)
        compile_model(model, make_optimizer(config, steps_per_epoch * config.epochs, dist.optimizer_class()))
    return dist.prepare(model)


def _distribution(strategy: Any) -> Any:
    """A ``distribute.Distribution`` for a strategy (or its name, or an open strategy scope); None without one."""
    if strategy is None and keras.backend.backend() != "tensorflow":
        return None
    from keras_charrnn import distribute  # TensorFlow only

    strategy = distribute.resolve(strategy)
    return None if strategy is None else distribute.Distribution(strategy)


def _callbacks(
    run: RunFolder, config: TrainConfig, progress: Progress, chars_per_batch: int, vocab: Vocabulary
) -> tuple[TrainingCheckpoint, list[keras.callbacks.Callback]]:
    """The package's callbacks for a run, metrics before the loggers that record them.

    Returns:
        ``(checkpoint, callbacks)``; ``checkpoint.diverged`` tells whether training blew up.
    """
    checkpoint = TrainingCheckpoint(run, progress, every=config.checkpoint_every)
    ours = [
        CharMetrics(),
        checkpoint,
        keras.callbacks.CSVLogger(str(run.log_path), append=True),
        PlotCurves(run.curves_path, progress),
        EpochSummary(chars_per_batch, config.epochs),
        SampleText(
            run.samples_path,
            vocab,
            progress,
            chars=config.sample_chars,
            every=config.sample_every,
            prime=DEFAULT_PRIME,
            temperatures=SAMPLE_TEMPERATURES,
            seed=config.seed,
        ),
    ]
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tensorboard=True needs TensorBoard: pip install 'keras-charrnn[tensorboard]'") from None
        ours.append(keras.callbacks.TensorBoard(str(run.tensorboard_dir)))
    return checkpoint, ours


def _fit(
    model: keras.Model,
    train_batches: TBPTTBatches,
    val_batches: TBPTTBatches | None,
    progress: Progress,
    epochs: int,
    checkpoint: TrainingCheckpoint,
    callbacks: list[keras.callbacks.Callback],
    verbose: int | str,
) -> None:
    """Trains from ``progress`` to ``epochs``: first the rest of a half-done epoch, then whole epochs."""
    common = dict(validation_data=val_batches, shuffle=False, verbose=verbose)
    if progress.step > 0:
        # Killed part-way through an epoch: finish it from the saved batch,
        # keeping the restored hidden state, then train the remaining epochs.
        model.fit(
            train_batches.from_batch(progress.step),
            initial_epoch=progress.epoch,
            epochs=progress.epoch + 1,
            callbacks=[ResetStates(skip_first_epoch_reset=True)] + callbacks,
            **common,
        )
    if checkpoint.diverged is None and progress.epoch < epochs:
        model.fit(
            train_batches, initial_epoch=progress.epoch, epochs=epochs, callbacks=[ResetStates()] + callbacks, **common
        )


def _resume(
    run: RunFolder, model: keras.Model, config: TrainConfig, dist: Any, changed: dict[str, tuple], write_config: bool
) -> Progress:
    """Restores a run's last checkpoint into ``model``, records the config changes and says where it resumes.

    Args:
        run: the run folder.
        model: the built model (under ``dist``'s scope when distributed).
        config: the resumed config (changes applied).
        dist: the distribution (``_distribution``), or None on one device.
        changed: ``{field: (old, new)}`` from ``config.resume_changes``.
        write_config: this process writes the run folder (not a non-chief worker).

    Returns:
        The progress the checkpoint records.
    """
    if dist is None:
        progress = load_checkpoint(run.state_path, model)
    else:
        with dist.scope():  # every worker restores (its own rows of the states)
            progress = load_checkpoint(run.state_path, model)
    if changed and write_config:
        run.update_config(config)
    if write_config and run.backend() != keras.backend.backend():  # resumed on another backend: recorded
        run.update_record(backend=keras.backend.backend())
    what = "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    where = f", {progress.step} batches into epoch {progress.epoch + 1}" if progress.step else ""
    print(
        f"resuming {run.path}: {progress.epoch} of {config.epochs} epochs done{where}"
        + (f"; changed: {what}" if what else ""),
        flush=True,
    )
    return progress


def train(
    corpus: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    resume: bool = False,
    callbacks: list[keras.callbacks.Callback] | None = None,
    verbose: int | str = "auto",
    strict: bool = False,
    changes: Mapping[str, Any] | None = None,
    strategy: Any = None,
) -> keras.Model:
    """Trains a character model on a corpus, writing the run folder.

    Args:
        corpus: a UTF-8 text file, a folder or a glob pattern (see ``corpus.py``: files
            joined in sorted order with a blank line between them).
        run_dir: the run folder (created if missing).
        config: hyper-parameters; with ``resume`` the run's saved config is used (see ``changes``).
            With ``time_budget`` set (a new run), ``budget.plan_budget`` probes this machine,
            picks the model size and schedule for the time (keeping the fields that differ from the
            defaults) and stops on time.
        resume: continue the run in ``run_dir`` from its last checkpoint.
        callbacks: extra Keras callbacks, run after the package's own.
        verbose: Keras' progress display (1 bar, 2 one line per epoch, 0 silent: the
            package then prints one line per epoch). ``"auto"``: the bar when standard output is a
            terminal, else 0 (Keras draws its bar with terminal escape codes even into a log file).
        strict: refuse a corpus file that is not UTF-8 (default: skip it with a warning).
        changes: with ``resume``, config fields to change (``{"epochs": 20}``); only
            ``config.RESUMABLE`` fields may change, the change is printed and saved.
        strategy: train under ``tf.distribute`` (TensorFlow backend): ``"mirrored"``,
            ``"multi-worker"`` (see ``distribute.strategy_from_name``) or a strategy; by
            default the strategy whose scope is open, if any. ``config.batch_size`` stays the
            global batch and the run folder is a single-device run's; with several workers
            only the chief writes it (it must be on a volume every worker reads).

    Returns:
        The trained stateful Keras model (its final weights; ``best.keras``
        holds the best by validation loss).

    Raises:
        ConfigError: a hyper-parameter is invalid, ``run_dir`` already holds a run, or
            ``changes`` would alter a resumed run (the message names the fields).
        InputError: the corpus or the run to resume is missing, unreadable or mismatched.
        TrainingDiverged: the loss became NaN or infinite (the last good checkpoint is kept).

    Example:

    >>> model = train("input.txt", "runs/tiny", TrainConfig(units=64, epochs=2))  # doctest: +SKIP
    """
    if config is not None and config.time_budget is not None and not resume and config.schedule_steps is None:
        if strategy is not None:
            raise ConfigError("time_budget works on one device: leave out strategy, or time_budget")
        config, stop = plan_budget(corpus, run_dir, config, strict=strict)  # probes; sets schedule_steps
        callbacks = [stop, *(callbacks or [])]
    dist = _distribution(strategy)  # first: a multi-worker strategy must be made before TensorFlow starts
    run = RunFolder(run_dir)
    writes = run if dist is None else RunFolder(dist.write_dir(run.path))  # non-chief workers: a temporary folder
    # The checks that need no corpus read (the CLI makes them before it imports TensorFlow), then the one read.
    config, changed = check_training_inputs(corpus, run if resume else writes, config, resume, changes)
    found = scan(corpus, strict)
    if resume:
        _check_same_corpus(run, found)
        vocab = run.vocab()
    else:
        vocab = Vocabulary(found.chars_seen)
    data, train_batches, val_batches = _encoded(found, vocab, config)
    model = _build(config, vocab, len(train_batches), dist)
    if dist is not None:
        print(
            f"distributed: {dist.replicas} replicas, batch_size {config.batch_size} = {dist.replicas} x "
            f"{config.batch_size // dist.replicas}"
            + ("" if dist.is_chief else "; this worker writes to a temporary folder, the chief to the run folder"),
            flush=True,
        )

    if resume:
        progress = _resume(run, model, config, dist, changed, write_config=writes is run)
    else:
        writes.start(config, data.record, vocab, backend=keras.backend.backend())
        progress = Progress()
    if progress.epoch >= config.epochs:
        print(f"{run.path}: all {config.epochs} epochs already done")
        return model

    if verbose == "auto" and not sys.stdout.isatty():
        verbose = 0
    checkpoint, ours = _callbacks(writes, config, progress, train_batches.chars_per_batch, vocab)
    _fit(model, train_batches, val_batches, progress, config.epochs, checkpoint, ours + list(callbacks or []), verbose)
    if checkpoint.diverged:
        raise TrainingDiverged(
            f"training diverged: {checkpoint.diverged}; the last good checkpoint is kept "
            f"in {run.path} (lower lr or clip_norm, then resume)"
        )
    reset_states(model)
    if dist is not None:
        dist.cleanup()
    return model
