"""Training: text file -> vocabulary -> TBPTT batches -> ``model.fit`` -> run folder.

A run folder holds everything about one training run::

    RUN_DIR/config.json   the TrainConfig and the corpus it trained on
    RUN_DIR/vocab.json    the vocabulary
    RUN_DIR/state.npz     latest full training state (resume from here)
    RUN_DIR/best.keras    best model by validation loss
    RUN_DIR/log.csv       one row per epoch: loss, bpc, perplexity, val_*
    RUN_DIR/curves.png    the bpc curves
    RUN_DIR/tensorboard/  TensorBoard logs (with ``tensorboard=True``)

The defaults are ``TrainConfig``'s, in ``config.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import keras
import numpy as np

from keras_charrnn.batching import TBPTTBatches, split_train_val
from keras_charrnn.callbacks import CharMetrics, EpochSummary, PlotCurves, ResetStates, TrainingCheckpoint
from keras_charrnn.checkpoint import Progress, load_checkpoint
from keras_charrnn.config import TrainConfig
from keras_charrnn.errors import CharRNNError
from keras_charrnn.fileio import atomic_write_text
from keras_charrnn.model import build_model, reset_states
from keras_charrnn.vocab import Vocabulary, read_corpus


def make_optimizer(config: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """Adam with the config's learning rate, schedule and gradient clipping.

    Args:
        config: supplies ``lr``, ``lr_schedule``, ``clip_norm`` and ``clip_value``.
        total_steps: batches in the whole run (the cosine schedule's length).

    Returns:
        A ``keras.optimizers.Adam``; clipping by global norm uses Keras'
        ``global_clipnorm``, clipping by value its ``clipvalue``.
    """
    lr = config.lr
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=max(total_steps, 1), alpha=0.1)
    return keras.optimizers.Adam(learning_rate=lr, global_clipnorm=config.clip_norm, clipvalue=config.clip_value)


def model_from_config(config: TrainConfig, vocab_size: int) -> keras.Model:
    """The stateful training model that ``config`` describes."""
    return build_model(vocab_size, cell=config.cell, units=config.units, layers=config.layers,
                       embedding_dim=config.embedding_dim, dropout=config.dropout,
                       batch_size=config.batch_size, seq_len=config.seq_len)


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> keras.Model:
    """Compiles a char model: cross-entropy on logits, in nats per character."""
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def prepare_data(text: str, config: TrainConfig, vocab: Vocabulary | None = None,
                 name: str = "corpus") -> tuple[Vocabulary, TBPTTBatches, TBPTTBatches | None]:
    """Encodes a corpus and lays it out for truncated BPTT.

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
                           name=f"{name} (validation part, --val-frac {config.val_frac})")
    return vocab, train, val


def _corpus_record(path: Path, text: str) -> dict:
    return {"path": str(path), "chars": len(text), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def train(corpus: str | os.PathLike, run_dir: str | os.PathLike, config: TrainConfig | None = None,
          resume: bool = False, callbacks: list[keras.callbacks.Callback] | None = None,
          verbose: int | str = "auto") -> keras.Model:
    """Trains a character model on a text file, writing the run folder.

    Args:
        corpus: a UTF-8 text file.
        run_dir: the run folder (created if missing).
        config: hyper-parameters; with ``resume`` the run's saved config is used.
        resume: continue the run in ``run_dir`` from its last checkpoint.
        callbacks: extra Keras callbacks, run beside the package's own.
        verbose: Keras' progress display (1 bar, 2 one line per epoch, 0 silent).

    Returns:
        The trained stateful Keras model (its final weights; ``best.keras``
        holds the best by validation loss).

    Example:

    >>> model = train("input.txt", "runs/tiny", TrainConfig(units=64, epochs=2))  # doctest: +SKIP
    """
    corpus, run_dir = Path(corpus), Path(run_dir)
    text = read_corpus(corpus)
    config_path = run_dir / "config.json"
    if resume:
        if not config_path.is_file():
            raise CharRNNError(f"{run_dir}: nothing to resume (no config.json); start without --resume")
        saved = json.loads(config_path.read_text())
        config = TrainConfig(**saved["config"])
        if saved["corpus"]["sha256"] != _corpus_record(corpus, text)["sha256"]:
            raise CharRNNError(f"{corpus}: not the corpus this run was trained on ({saved['corpus']['path']})")
        vocab = Vocabulary.load(run_dir / "vocab.json")
    else:
        config = config or TrainConfig()
        if (run_dir / "state.npz").exists():
            raise CharRNNError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        vocab = None
    config.validate()
    vocab, train_batches, val_batches = prepare_data(text, config, vocab, name=str(corpus))

    keras.utils.set_random_seed(config.seed)
    model = model_from_config(config, vocab.size)
    steps_per_epoch = len(train_batches)
    compile_model(model, make_optimizer(config, steps_per_epoch * config.epochs))

    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        progress = load_checkpoint(run_dir / "state.npz", model)
    else:
        progress = Progress()
        vocab.save(run_dir / "vocab.json")
        atomic_write_text(config_path, json.dumps(
            {"config": dataclasses.asdict(config), "corpus": _corpus_record(corpus, text),
             "vocab_size": vocab.size}, indent=2))
        for stale in ("log.csv", "curves.png", "best.keras"):
            (run_dir / stale).unlink(missing_ok=True)
    if progress.epoch >= config.epochs:
        print(f"{run_dir}: all {config.epochs} epochs already done")
        return model

    checkpoint = TrainingCheckpoint(run_dir, progress, every=config.checkpoint_every)
    ours = [CharMetrics(), checkpoint, keras.callbacks.CSVLogger(str(run_dir / "log.csv"), append=True),
            PlotCurves(run_dir / "curves.png", progress),
            EpochSummary(train_batches.chars_per_batch, config.epochs)]
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise CharRNNError("--tensorboard needs TensorBoard: pip install 'keras-charrnn[tensorboard]'") from None
        ours.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    extra = list(callbacks or [])

    if progress.step > 0:
        # Killed part-way through an epoch: finish it from the saved batch,
        # keeping the restored hidden state, then train the remaining epochs.
        model.fit(train_batches.from_batch(progress.step), validation_data=val_batches,
                  initial_epoch=progress.epoch, epochs=progress.epoch + 1, shuffle=False, verbose=verbose,
                  callbacks=[ResetStates(skip_first_epoch_reset=True)] + ours + extra)
    if checkpoint.diverged is None and progress.epoch < config.epochs:
        model.fit(train_batches, validation_data=val_batches, initial_epoch=progress.epoch,
                  epochs=config.epochs, shuffle=False, verbose=verbose,
                  callbacks=[ResetStates()] + ours + extra)
    if checkpoint.diverged:
        raise CharRNNError(f"training diverged: {checkpoint.diverged}; the last good checkpoint is kept "
                           f"in {run_dir} (lower --lr or --clip-norm, then --resume)")
    reset_states(model)
    return model


def load_run(run_dir: str | os.PathLike, which: str = "best") -> tuple[keras.Model, Vocabulary, dict]:
    """Loads a trained model, its vocabulary and its config record from a run folder.

    Args:
        run_dir: the run folder.
        which: ``"best"`` (``best.keras``) or ``"latest"`` (weights of ``state.npz``).

    Returns:
        ``(model, vocab, record)`` where ``record`` is ``config.json``'s content
        plus the best validation loss.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CharRNNError(f"{run_dir}: not a run folder (no config.json)")
    record = json.loads(config_path.read_text())
    vocab = Vocabulary.load(run_dir / "vocab.json")
    if which == "best" and (run_dir / "best.keras").is_file():
        model = keras.models.load_model(run_dir / "best.keras", compile=False)
    else:
        config = TrainConfig(**record["config"])
        model = model_from_config(config, vocab.size)
        compile_model(model, make_optimizer(config, 1))
        load_checkpoint(run_dir / "state.npz", model)
    state_path = run_dir / "state.npz"
    if state_path.is_file():
        with np.load(state_path) as data:
            progress = json.loads(str(data["progress"]))
        record["best_val_loss"] = progress.get("best_val_loss")
        record["epochs_done"] = progress.get("epoch")
    return model, vocab, record
