"""Keras callbacks for training stateful character models with ``fit``.

They work beside any other Keras callback:

- ``ResetStates``: zero the hidden state at each epoch start and around validation.
- ``CharMetrics``: add bits per character and perplexity to the epoch logs.
- ``TrainingCheckpoint``: keep the latest full training state and the best model;
  stop, keeping the last good checkpoint, if the loss becomes NaN or infinite.
- ``PlotCurves``: draw the loss/bpc curves to a PNG after every epoch.
- ``EpochSummary``: training speed per epoch: in Keras' progress bar, or one line when it is off.
- ``SampleText``: print a short sample at a few temperatures and append it to samples.txt.
- ``TimeBudget``: stop after a wall-clock budget.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from keras_charrnn.checkpoint import Progress, save_checkpoint, snapshot, write_checkpoint
from keras_charrnn.config import SAMPLE_TEMPERATURES
from keras_charrnn.fileio import atomic_write
from keras_charrnn.metrics import bits_per_char, perplexity
from keras_charrnn.model import get_states, reset_states, set_states
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.sampling import DEFAULT_PRIME

if TYPE_CHECKING:
    from keras_charrnn.export import CharRNNModule


class ResetStates(keras.callbacks.Callback):
    """Zeroes every stateful layer's hidden state at epoch start and around validation.

    Args:
        skip_first_epoch_reset: keep the state at the start of the first epoch
            (used when resuming part-way through an epoch with a restored state).
    """

    def __init__(self, skip_first_epoch_reset: bool = False):
        super().__init__()
        self._skip = skip_first_epoch_reset

    def on_epoch_begin(self, epoch, logs=None):
        if self._skip:
            self._skip = False
            return
        reset_states(self.model)

    def on_test_begin(self, logs=None):
        self._saved = get_states(self.model)
        reset_states(self.model)

    def on_test_end(self, logs=None):
        # Validation runs at epoch end; the next epoch starts from zeros anyway,
        # but a mid-epoch evaluation (e.g. a user's callback) must not disturb
        # the training streams, so their state is put back.
        set_states(self.model, self._saved)


class CharMetrics(keras.callbacks.Callback):
    """Adds ``bpc``, ``perplexity``, ``val_bpc`` and ``val_perplexity`` to epoch logs.

    Keras' loss is the mean cross-entropy in nats per character; place this
    callback before loggers (CSVLogger, TensorBoard) so they record the new keys.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for prefix in ("", "val_"):
            loss = logs.get(prefix + "loss")
            if loss is not None:
                logs[prefix + "bpc"] = bits_per_char(float(loss))
                logs[prefix + "perplexity"] = perplexity(float(loss))


class TrainingCheckpoint(keras.callbacks.Callback):
    """Keeps the latest training state and the best model of a run folder.

    Every ``every`` batches and at each epoch end it writes ``state.npz``
    (see ``checkpoint.py``); at each epoch end where the validation loss
    (or, without validation, the training loss) improves it writes
    ``best.keras``. Both writes are atomic.

    Divergence: the loss a batch reports was computed before that batch's
    update, so weights are only known good once the *next* loss is finite.
    A mid-epoch checkpoint is therefore taken in memory after batch k and
    written after batch k+1 if its loss is finite; at epoch end the
    validation loss (or, without validation, finite weights) vouches for the
    last update. A NaN or infinite loss stops training and nothing from the
    bad update is written, so the last good state survives.

    Args:
        run: the run folder.
        progress: where the run starts (restored when resuming).
        every: batches between checkpoints within an epoch (0: epoch ends only).
    """

    def __init__(self, run: RunFolder, progress: Progress, every: int = 100):
        super().__init__()
        self.run = run
        self.progress = progress
        self.every = every
        self.diverged: str | None = None
        self._pending: dict | None = None  # a snapshot waiting for the next batch's loss

    def _stop(self, why: str) -> None:
        self.diverged = why
        self._pending = None
        self.model.stop_training = True

    def _loss_is_finite(self, logs, key: str, where: str) -> bool:
        loss = (logs or {}).get(key)
        if loss is not None and not math.isfinite(float(loss)):
            label = "loss" if key == "loss" else "validation loss"
            self._stop(f"{label} became {float(loss)} at {where}")
            return False
        return True

    def _weights_are_finite(self) -> bool:
        return all(np.isfinite(v.numpy()).all() for v in self.model.trainable_variables)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.progress.epoch:
            self.progress.epoch, self.progress.step = epoch, 0
        self._pending = None

    def on_train_batch_end(self, batch, logs=None):
        if self.diverged:
            return
        self.progress.step += 1
        if not self._loss_is_finite(logs, "loss", f"epoch {self.progress.epoch + 1}, batch {self.progress.step}"):
            return
        if self._pending is not None:  # this batch's finite loss vouches for the previous update
            write_checkpoint(self.run.state_path, self._pending)
            self._pending = None
        if self.every and self.progress.step % self.every == 0:
            self._pending = snapshot(self.model, self.progress)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._pending = None  # superseded by the epoch-end checkpoint, or from a bad update
        where = f"the end of epoch {epoch + 1}"
        if self.diverged or not self._loss_is_finite(logs, "loss", where):
            return
        if not self._loss_is_finite(logs, "val_loss", where):
            return
        if not self._weights_are_finite():
            self._stop(f"weights became non-finite at {where}")
            return
        val = logs.get("val_loss", logs.get("loss"))
        self.progress.history.append({k: float(v) for k, v in logs.items()})
        if val is not None and (self.progress.best_val_loss is None or val < self.progress.best_val_loss):
            self.progress.best_val_loss = float(val)
            atomic_write(self.run.best_path, self.model.save, suffix=".keras")
        self.progress.epoch, self.progress.step = epoch + 1, 0
        save_checkpoint(self.run.state_path, self.model, self.progress)


class PlotCurves(keras.callbacks.Callback):
    """Draws loss and bits-per-character curves to ``path`` (PNG) after every epoch.

    Args:
        path: the PNG file.
        progress: holds the history of every epoch of the run, resumed ones included.
    """

    def __init__(self, path: str | Path, progress: Progress):
        super().__init__()
        self.path = Path(path)
        self.progress = progress

    def on_epoch_end(self, epoch, logs=None):
        history = self.progress.history
        if not history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = range(1, len(history) + 1)
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("bpc", "train"), ("val_bpc", "validation")):
            values = [h.get(key) for h in history]
            if all(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("bits per character")
        ax.set_title("keras-charrnn training")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def _keras_prints(callback: keras.callbacks.Callback) -> bool:
    """Whether ``fit`` shows Keras' progress display (verbose 1 or 2), which prints the epoch logs itself."""
    return (callback.params or {}).get("verbose", 0) != 0


class EpochSummary(keras.callbacks.Callback):
    """Reports each epoch's training speed without repeating what Keras prints.

    With Keras' progress display on (``verbose`` 1 or 2), the bar already shows the
    epoch, the time and every log (``loss``, ``bpc``, ``perplexity``, ``val_*``, added by
    ``CharMetrics``): this callback adds ``chars_per_s`` to the logs, so the bar (and
    callbacks after this one, e.g. TensorBoard) show it too, and prints nothing.
    With ``verbose=0`` it prints the one line per epoch, everything on it::

        epoch 3/14: loss 1.6123  bpc 2.3261  val_loss 1.5880  val_bpc 2.2910  val_ppl 4.89  31,204 chars/s  52s

    Args:
        chars_per_batch: characters trained per batch (batch_size x seq_len).
        total_epochs: the run's epochs.
    """

    def __init__(self, chars_per_batch: int, total_epochs: int):
        super().__init__()
        self.chars_per_batch = chars_per_batch
        self.total_epochs = total_epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._batches = time.perf_counter(), 0
        self._trained = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        self._trained = time.perf_counter() - self._start  # training time, validation left out

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        speed = self._batches * self.chars_per_batch / max(self._trained, 1e-9)
        if logs is not None:
            logs["chars_per_s"] = speed
        if _keras_prints(self):
            return
        logs = logs or {}
        nan = float("nan")
        line = (
            f"epoch {epoch + 1}/{self.total_epochs}: loss {logs.get('loss', nan):.4f}  bpc {logs.get('bpc', nan):.4f}"
        )
        if "val_loss" in logs:
            line += (
                f"  val_loss {logs['val_loss']:.4f}  val_bpc {logs.get('val_bpc', nan):.4f}"
                f"  val_ppl {logs.get('val_perplexity', nan):.2f}"
            )
        line += f"  {speed:,.0f} chars/s  {seconds:.0f}s"
        print(line, flush=True)


class SampleText(keras.callbacks.Callback):
    """Samples the model as it trains: a short text from a fixed prime at a few temperatures.

    At each epoch end (and every ``every`` batches, if not 0) it copies the current
    weights into an exported module (``export.CharRNNModule``, made once) and calls
    its ``generate_text`` signature, the code an exported model samples with, one
    row per temperature, seeded, so samples of different epochs are comparable. It
    reads the weights only: the training model's hidden states, dropout seeds and
    optimizer are untouched, so a resumed run stays exact. Each sample is appended
    to ``path`` and printed (after Keras' bar line, when the bar is on).

    Args:
        path: the text file the samples are appended to (a run folder's ``samples_path``).
        vocab: the model's vocabulary.
        progress: where the run stands (shared with ``TrainingCheckpoint``).
        chars: characters per sample (0: no samples).
        every: batches between samples within an epoch (0: epoch ends only).
        prime: the text every sample continues.
        temperatures: one sample per temperature.
        seed: the sampling seed (the run's seed).
    """

    def __init__(
        self,
        path: str | Path,
        vocab,
        progress: Progress,
        chars: int = 200,
        every: int = 0,
        prime: str = DEFAULT_PRIME,
        temperatures: tuple[float, ...] = SAMPLE_TEMPERATURES,
        seed: int = 0,
    ):
        super().__init__()
        self.path = Path(path)
        self.vocab = vocab
        self.progress = progress
        self.chars, self.every, self.prime = chars, every, prime
        self.temperatures, self.seed = tuple(temperatures), seed
        self._module: CharRNNModule | None = None
        self._held: str | None = None  # an epoch-end sample printed once Keras' bar line is out

    def sample(self) -> list[str]:
        """The texts sampled from the model's current weights, one per temperature (the prime not included)."""
        import tensorflow as tf  # here, not at the top: training on another backend needs no TensorFlow

        from keras_charrnn.export import CharRNNModule

        if self._module is None:
            self._module = CharRNNModule(self.model, self.vocab, jit_compile=False)
        module = self._module
        module.assign_weights(self.model)
        rows = len(self.temperatures)
        zeros = [tf.zeros([rows, module.units]) for _ in module.state_names]
        out = module.generate_text_function(
            tf.constant([self.prime.encode("utf-8")] * rows),
            *zeros,
            tf.fill([rows], self.chars),
            tf.constant(self.temperatures, tf.float32),
            tf.zeros([rows], tf.int32),
            tf.ones([rows], tf.float32),
            tf.fill([rows], tf.constant(self.seed, tf.int64)),
            tf.zeros([rows], tf.int64),
        )
        return [t.decode("utf-8") for t in out["text"].numpy()]

    def _write(self, title: str) -> str:
        texts = self.sample()
        block = f"=== {title} ===\n" + "".join(
            f"--- temperature {t} ---\n{self.prime}{text}\n" for t, text in zip(self.temperatures, texts)
        )
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(block + "\n")
        return block

    def on_epoch_begin(self, epoch, logs=None):
        self._flush()

    def on_train_end(self, logs=None):
        self._flush()

    def _flush(self) -> None:
        if self._held:
            print(self._held, flush=True)
            self._held = None

    def on_train_batch_end(self, batch, logs=None):
        if not (self.chars and self.every) or self.progress.step % self.every:
            return
        if not math.isfinite(float((logs or {}).get("loss", 0.0))):
            return
        if batch + 1 == (self.params or {}).get("steps"):
            return  # the epoch's last batch: its epoch-end sample follows
        block = self._write(f"epoch {self.progress.epoch + 1}, batch {self.progress.step}")
        print(("\n" if _keras_prints(self) else "") + block, flush=True)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        label = "val_loss" if "val_loss" in logs else "loss"
        loss = logs.get(label)
        if not self.chars or (loss is not None and not math.isfinite(float(loss))):
            return  # nothing to sample from diverged weights
        title = f"epoch {epoch + 1} end" + (f", {label} {float(loss):.4f}" if loss is not None else "")
        block = self._write(title)
        if _keras_prints(self):
            self._held = block  # Keras' bar prints the epoch's line after every callback's on_epoch_end
        else:
            print(block, flush=True)


class TimeBudget(keras.callbacks.Callback):
    """Stops training once ``seconds`` of wall-clock time have passed (checked after each batch).

    Args:
        seconds: the budget, counted from the start of ``fit``.
    """

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() - self._start >= self.seconds:
            self.model.stop_training = True
