"""Training: text file -> vocabulary -> TBPTT batches -> ``model.fit`` -> run folder.

What the run folder holds is described in ``run_folder.py``; the defaults are
``TrainConfig``'s, in ``config.py``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import keras

from keras_charrnn.callbacks import CharMetrics, EpochSummary, PlotCurves, ResetStates, TrainingCheckpoint
from keras_charrnn.checkpoint import Progress, load_checkpoint
from keras_charrnn.config import TrainConfig
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.model import compile_model, make_optimizer, model_from_config, reset_states
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.tbptt import TBPTTBatches, split_train_val
from keras_charrnn.vocab import Vocabulary, read_corpus

__all__ = ["train", "prepare_data", "TrainingDiverged"]


class TrainingDiverged(ConfigError):
    """The loss became NaN or infinite; the run folder keeps the last good checkpoint.

    A ``ConfigError``: the remedy is a setting (a lower ``lr`` or ``clip_norm``).
    """


def prepare_data(text: str, config: TrainConfig, vocab: Vocabulary | None = None,
                 name: str = "corpus") -> tuple[Vocabulary, TBPTTBatches, TBPTTBatches | None]:
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
    train_ids, val_ids = split_train_val(vocab.encode(text), config.val_frac)
    train = TBPTTBatches(train_ids, config.batch_size, config.seq_len, name=f"{name} (training part)")
    val = None
    if len(val_ids):
        val = TBPTTBatches(val_ids, config.batch_size, config.seq_len,
                           name=f"{name} (validation part, val_frac {config.val_frac})")
    return vocab, train, val


def _corpus_record(path: Path, text: str) -> dict:
    return {"path": str(path), "chars": len(text), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _resumed_setup(run: RunFolder, corpus: Path, text: str) -> tuple[TrainConfig, Vocabulary]:
    """The saved config and vocabulary of the run to resume; checks it trained on this corpus."""
    if not run.config_path.is_file():
        raise InputError(f"{run.path}: nothing to resume (no {run.config_path.name}); start without resume")
    if run.corpus_sha256() != _corpus_record(corpus, text)["sha256"]:
        raise InputError(f"{corpus}: not the corpus this run was trained on ({run.corpus_path()})")
    return run.config(), run.vocab()


def _new_setup(run: RunFolder, config: TrainConfig | None) -> TrainConfig:
    """The config of a new run; refuses a folder that already holds one."""
    if run.has_checkpoint():
        raise ConfigError(f"{run.path} already holds a run; resume it or choose another run_dir")
    return config or TrainConfig()


def _build(config: TrainConfig, vocab: Vocabulary, steps_per_epoch: int) -> keras.Model:
    """The compiled training model, seeded by ``config.seed``."""
    keras.utils.set_random_seed(config.seed)
    model = model_from_config(config, vocab.size)
    return compile_model(model, make_optimizer(config, steps_per_epoch * config.epochs))


def _callbacks(run: RunFolder, config: TrainConfig, progress: Progress,
               chars_per_batch: int) -> tuple[TrainingCheckpoint, list[keras.callbacks.Callback]]:
    """The package's callbacks for a run, metrics before the loggers that record them.

    Returns:
        ``(checkpoint, callbacks)``; ``checkpoint.diverged`` tells whether training blew up.
    """
    checkpoint = TrainingCheckpoint(run, progress, every=config.checkpoint_every)
    ours = [CharMetrics(), checkpoint, keras.callbacks.CSVLogger(str(run.log_path), append=True),
            PlotCurves(run.curves_path, progress), EpochSummary(chars_per_batch, config.epochs)]
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tensorboard=True needs TensorBoard: pip install 'keras-charrnn[tensorboard]'") from None
        ours.append(keras.callbacks.TensorBoard(str(run.tensorboard_dir)))
    return checkpoint, ours


def _fit(model: keras.Model, train_batches: TBPTTBatches, val_batches: TBPTTBatches | None,
         progress: Progress, epochs: int, checkpoint: TrainingCheckpoint,
         callbacks: list[keras.callbacks.Callback], verbose: int | str) -> None:
    """Trains from ``progress`` to ``epochs``: first the rest of a half-done epoch, then whole epochs."""
    common = dict(validation_data=val_batches, shuffle=False, verbose=verbose)
    if progress.step > 0:
        # Killed part-way through an epoch: finish it from the saved batch,
        # keeping the restored hidden state, then train the remaining epochs.
        model.fit(train_batches.from_batch(progress.step), initial_epoch=progress.epoch, epochs=progress.epoch + 1,
                  callbacks=[ResetStates(skip_first_epoch_reset=True)] + callbacks, **common)
    if checkpoint.diverged is None and progress.epoch < epochs:
        model.fit(train_batches, initial_epoch=progress.epoch, epochs=epochs,
                  callbacks=[ResetStates()] + callbacks, **common)


def train(corpus: str | os.PathLike, run_dir: str | os.PathLike, config: TrainConfig | None = None,
          resume: bool = False, callbacks: list[keras.callbacks.Callback] | None = None,
          verbose: int | str = "auto") -> keras.Model:
    """Trains a character model on a text file, writing the run folder.

    Args:
        corpus: a UTF-8 text file.
        run_dir: the run folder (created if missing).
        config: hyper-parameters; with ``resume`` the run's saved config is used.
        resume: continue the run in ``run_dir`` from its last checkpoint.
        callbacks: extra Keras callbacks, run after the package's own.
        verbose: Keras' progress display (1 bar, 2 one line per epoch, 0 silent).

    Returns:
        The trained stateful Keras model (its final weights; ``best.keras``
        holds the best by validation loss).

    Raises:
        ConfigError: a hyper-parameter is invalid, or ``run_dir`` already holds a run.
        InputError: the corpus or the run to resume is missing, unreadable or mismatched.
        TrainingDiverged: the loss became NaN or infinite (the last good checkpoint is kept).

    Example:

    >>> model = train("input.txt", "runs/tiny", TrainConfig(units=64, epochs=2))  # doctest: +SKIP
    """
    corpus, run = Path(corpus), RunFolder(run_dir)
    text = read_corpus(corpus)
    if resume:
        config, vocab = _resumed_setup(run, corpus, text)
    else:
        config, vocab = _new_setup(run, config), None
    config.validate()
    vocab, train_batches, val_batches = prepare_data(text, config, vocab, name=str(corpus))
    model = _build(config, vocab, len(train_batches))

    if resume:
        progress = load_checkpoint(run.state_path, model)
    else:
        run.start(config, _corpus_record(corpus, text), vocab)
        progress = Progress()
    if progress.epoch >= config.epochs:
        print(f"{run.path}: all {config.epochs} epochs already done")
        return model

    checkpoint, ours = _callbacks(run, config, progress, train_batches.chars_per_batch)
    _fit(model, train_batches, val_batches, progress, config.epochs, checkpoint, ours + list(callbacks or []), verbose)
    if checkpoint.diverged:
        raise TrainingDiverged(f"training diverged: {checkpoint.diverged}; the last good checkpoint is kept "
                               f"in {run.path} (lower lr or clip_norm, then resume)")
    reset_states(model)
    return model
