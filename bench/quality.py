"""Held-out loss under a wall-clock budget: ``--time-budget`` against a plain Keras 2x256 LSTM, same time, same run.

For each corpus, tinyshakespeare and Python source (the ``.py`` files of the installed packages, every
k-th in sorted order so that every package contributes, joined until ``--code-mb`` MB; made by this
bench), with the last 10% held out:

1. ``--time-budget``: ``train(corpus, run, TrainConfig(time_budget=MINUTES))``, the package's probe,
   rule and stop (``keras_charrnn/budget.py``); its wall time T counts the corpus reading, the probe,
   building and the final validation.
2. The baseline, what a Keras user writes: Embedding(64) -> LSTM(256) -> LSTM(256) -> Dense, stateless,
   ``compile(optimizer="adam")`` (1e-3, no schedule, no clipping), ``fit`` on shuffled 100-character
   windows of the training part in batches of 64, validated on the held-out 100-character windows
   after each epoch, and stopped after the batch that passes T (from the moment it starts building;
   Keras then validates the stopped epoch, so the baseline gets T plus one validation).

Both are scored on the same held-out text the same two ways, each with its best validation epoch's
weights (the budget run's ``best.keras``; the baseline's weights kept at its best epoch):

- *windows*: 100-character windows, each from a zero state (read in pieces of the budget run's seq_len
  if that divides 100, else windows of its seq_len), mean nats per character (the baseline's own
  validation);
- *streams*: the held-out text cut into the budget run's batch of contiguous streams (``TBPTTBatches``), read 100
  characters at a time with the state carried, as ``charrnn train`` validates (the baseline's weights in a
  stateful twin).

The budget run's own validation loss, as ``charrnn train`` reported it, is shown too.

With ``--cells A,B`` it compares cell types instead (e.g. the layer-normalised LSTM against the plain one):
each cell gets a ``--time-budget`` run of the same size (``--layers`` x ``--units``, kept by the budget, which
picks only the batch shape, dropout and schedule) and the same wall-clock budget, one after the other in the
same process, scored the same two ways.

    python bench/quality.py --minutes 10              # writes BENCHMARKS.md's "quality" section
    python bench/quality.py --minutes 0.3 --no-write  # a smoke test
    python bench/quality.py --cells lstm,lnlstm --layers 2 --units 256 --minutes 10  # "quality_cells"
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
WINDOW = 100
VAL_FRAC = 0.1


def make_code_corpus(path: Path, megabytes: float) -> Path:
    """Writes Python source of the installed packages to ``path``: every k-th ``.py`` file in sorted order,
    k chosen so the whole spans every package, joined with blank lines until ``megabytes`` MB."""
    root = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    target = int(megabytes * 1e6)
    stride = max(1, int(total / target))
    parts, size = [], 0
    for p in files[::stride]:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text.encode("utf-8"))
        if size >= target:
            break
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return path


def windows(ids, length: int):
    """Non-overlapping ``(x, y)`` windows of ``length`` characters (targets one character on)."""
    import numpy as np

    n = (len(ids) - 1) // length
    x = np.asarray(ids[: n * length], dtype=np.int32).reshape(n, length)
    y = np.asarray(ids[1 : n * length + 1], dtype=np.int32).reshape(n, length)
    return x, y


def _nats(model, x, y) -> float:
    """The summed negative log-likelihood (nats) of targets ``y`` under the model's logits for ``x`` (one batch,
    the model's state carried in and out)."""
    import numpy as np

    logits = np.asarray(model.predict_on_batch(x), dtype=np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -float(np.take_along_axis(logp, y[..., None], -1).sum())


def score_stateful(model, x, y) -> float:
    """Mean nats/char of a stateful fixed-batch model on windows, each from a zero state; a window longer
    than the model's seq_len (a multiple of it) is read in pieces with the state carried within it."""
    from keras_charrnn.model import reset_states

    batch, seq = model.input_shape[0], model.input_shape[1]
    total, count = 0.0, 0
    for i in range(0, len(x) - batch + 1, batch):
        reset_states(model)
        for j in range(0, x.shape[1], seq):
            total += _nats(model, x[i : i + batch, j : j + seq], y[i : i + batch, j : j + seq])
            count += y[i : i + batch, j : j + seq].size
    return total / count


def score_streams(model, ids, seq_len: int) -> float:
    """Mean nats/char of a stateful fixed-batch model on held-out text cut into its batch's contiguous
    streams (``TBPTTBatches``, as ``charrnn train`` validates), the state carried from window to window."""
    from keras_charrnn.model import reset_states
    from keras_charrnn.tbptt import TBPTTBatches

    batches = TBPTTBatches(ids, model.input_shape[0], seq_len)
    reset_states(model)
    total, count = 0.0, 0
    for i in range(len(batches)):
        x, y = batches[i]
        total += _nats(model, x, y)
        count += y.size
    return total / count


def budget_run(corpus: Path, seconds: float, out: Path, **given) -> dict:
    """The package's ``--time-budget`` run on ``corpus``: its wall time, choice and held-out losses.

    ``given`` are ``TrainConfig`` fields the budget keeps (``cell``, ``layers``, ``units``), as flags given to
    ``charrnn train --time-budget`` are; it picks the rest."""
    from keras_charrnn.budget import plan_budget
    from keras_charrnn.config import TrainConfig
    from keras_charrnn.corpus import load_corpus
    from keras_charrnn.run_folder import RunFolder
    from keras_charrnn.tbptt import split_train_val
    from keras_charrnn.train import train

    start = time.perf_counter()
    config, stop = plan_budget(corpus, out, TrainConfig(time_budget=seconds, val_frac=VAL_FRAC, **given), set(given))
    train(corpus, out, config, callbacks=[stop], verbose=0)
    elapsed = time.perf_counter() - start
    run = RunFolder(out)
    record = run.record()
    data = load_corpus(corpus)
    _, val_ids = split_train_val(data.ids, VAL_FRAC)
    model = run.load_model("best")
    seq = model.input_shape[1]
    x, y = windows(val_ids, WINDOW if WINDOW % seq == 0 else seq)
    return {
        "seconds": elapsed,
        "own_val_loss": record["best_val_loss"],
        "window_val_loss": score_stateful(model, x, y),
        "stream_val_loss": score_streams(model, val_ids, model.input_shape[1]),
        "budget": record["budget"],
        "config": record["config"],
        "epochs_done": record["epochs_done"],
        "window": x.shape[1],
    }


def baseline_run(corpus: Path, seconds: float, window: int, rows: int = 64) -> dict:
    """A plain Keras 2x256 LSTM trained for ``seconds`` of wall time: its best held-out losses (the streams
    scored ``rows`` at a time, the budget run's batch)."""
    import keras

    from keras_charrnn.corpus import load_corpus
    from keras_charrnn.tbptt import split_train_val

    start = time.perf_counter()
    data = load_corpus(corpus)
    train_ids, val_ids = split_train_val(data.ids, VAL_FRAC)
    x, y = windows(train_ids, window)
    xv, yv = windows(val_ids, window)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            keras.layers.Embedding(data.vocab.size, 64),
            keras.layers.LSTM(256, return_sequences=True),
            keras.layers.LSTM(256, return_sequences=True),
            keras.layers.Dense(data.vocab.size),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Deadline(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if time.perf_counter() - start >= seconds:
                self.model.stop_training = True

    class KeepBest(keras.callbacks.Callback):  # the weights of the best validation epoch, as best.keras is
        best, weights = float("inf"), None

        def on_epoch_end(self, epoch, logs=None):
            if logs["val_loss"] < self.best:
                self.best, self.weights = logs["val_loss"], self.model.get_weights()

    keep = KeepBest()
    history = model.fit(
        x,
        y,
        batch_size=64,
        epochs=10_000,
        shuffle=True,
        validation_data=(xv, yv),
        callbacks=[Deadline(), keep],
        verbose=0,
    )
    elapsed = time.perf_counter() - start
    # The same weights in a stateful model of ``rows`` rows, to score the held-out streams as the budget run's.
    twin = keras.Sequential(
        [
            keras.Input(batch_shape=(rows, window), dtype="int32"),
            keras.layers.Embedding(data.vocab.size, 64),
            keras.layers.LSTM(256, return_sequences=True, stateful=True),
            keras.layers.LSTM(256, return_sequences=True, stateful=True),
            keras.layers.Dense(data.vocab.size),
        ]
    )
    twin.set_weights(keep.weights)
    return {
        "seconds": elapsed,
        "window_val_loss": min(history.history["val_loss"]),
        "stream_val_loss": score_streams(twin, val_ids, window),
        "epochs": len(history.history["val_loss"]),
        "params": model.count_params(),
    }


def _versus(ours: dict, base: dict, key: str) -> str:
    """``ours / base`` for one score, the lower in bold, with bits per character."""
    from keras_charrnn.metrics import bits_per_char

    a, b = ours[key], base[key]
    fa, fb = f"{a:.3f} ({bits_per_char(a):.2f})", f"{b:.3f} ({bits_per_char(b):.2f})"
    return f"**{fa}** / {fb}" if a < b else f"{fa} / **{fb}**"


def compare_cells(corpora, cells: list[str], layers: int, units: int, seconds: float, tmp: Path) -> list[str]:
    """Table rows of one ``--time-budget`` run per cell type and corpus, all of ``layers`` x ``units`` and
    ``seconds``; the lowest score per corpus in bold."""
    from keras_charrnn.errors import ConfigError
    from keras_charrnn.metrics import bits_per_char

    lines = []
    for name, corpus in corpora:
        runs = {}
        for cell in cells:
            print(f"== {name}: --cell {cell} --layers {layers} --units {units} --time-budget {seconds:g}s", flush=True)
            try:
                runs[cell] = budget_run(
                    corpus, seconds, tmp / f"{cell}_{name[:6]}", cell=cell, layers=layers, units=units
                )
            except ConfigError as exc:  # a budget too short for this corpus
                runs[cell] = {"refused": str(exc)}
        scored = [r for r in runs.values() if "refused" not in r]
        for cell, r in runs.items():
            if "refused" in r:
                lines.append(f"| {name} | {cell} | refused: {r['refused']} | | | | |")
                continue
            c, b = r["config"], r["budget"]
            scores = []
            for key in ("window_val_loss", "stream_val_loss"):
                score = f"{r[key]:.3f} ({bits_per_char(r[key]):.2f})"
                scores.append(f"**{score}**" if r[key] == min(other[key] for other in scored) else score)
            lines.append(
                f"| {name} | {cell} | {c['layers']}x{c['units']}, {b['picked']['params']:,} params, "
                f"batch {c['batch_size']}, seq {c['seq_len']}, dropout {c['dropout']:g}, {r['epochs_done']} epochs "
                f"({b['picked']['chars_per_s']:,.0f} chars/s) | {r['seconds']:.0f} s | {scores[0]} | {scores[1]} | "
                f"{r['own_val_loss']:.3f} |"
            )
    return lines


def cells_section(lines: list[str], cells: list[str], layers: int, units: int, minutes: float) -> str:
    """BENCHMARKS.md's "quality_cells" section around ``compare_cells``' rows."""
    return (
        "## Cell types under the same time budget\n\n"
        f"`python bench/quality.py --cells {','.join(cells)} --layers {layers} --units {units} --minutes {minutes:g}`: "
        f"`charrnn train --cell CELL --layers {layers} --units {units} --time-budget {minutes:g}m` for each cell, one "
        "after the other on the same machine (the budget keeps the size and picks the batch shape, dropout and "
        "schedule), last 10% of each corpus held out, each run's best validation epoch, scored as in \"Quality under a "
        'time budget" (*windows*, *streams*; mean nats/char, bits/char in brackets, the lowest per corpus in bold; '
        "*own*: the run's validation loss as `charrnn train` reported it).\n\n"
        "| corpus | cell | model and schedule | wall time | windows | streams | own |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="the time budget of each run (default: 10)")
    parser.add_argument("--shakespeare", type=Path, default=SHAKESPEARE, help="tinyshakespeare.txt")
    parser.add_argument("--code-mb", type=float, default=3.0, help="size of the Python source corpus (default: 3)")
    parser.add_argument("--no-write", action="store_true", help="print the table only, not into BENCHMARKS.md")
    parser.add_argument(
        "--cells", help="compare these cell types (e.g. lstm,lnlstm) at --layers x --units and the same budget"
    )
    parser.add_argument("--layers", type=int, default=2, help="with --cells: recurrent layers (default: 2)")
    parser.add_argument("--units", type=int, default=256, help="with --cells: units per layer (default: 256)")
    args = parser.parse_args()
    seconds = args.minutes * 60

    from keras_charrnn.errors import ConfigError

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        code = make_code_corpus(Path(tmp) / "python_source.txt", args.code_mb)
        corpora = [("tinyshakespeare", args.shakespeare), (f"Python source ({args.code_mb:g} MB)", code)]
        if args.cells:
            cells = args.cells.split(",")
            body = cells_section(
                compare_cells(corpora, cells, args.layers, args.units, seconds, Path(tmp)),
                cells,
                args.layers,
                args.units,
                args.minutes,
            )
            print(body)
            if not args.no_write:
                update_section("quality_cells", body)
            return
        for name, corpus in corpora:
            print(f"== {name}: --time-budget {seconds:g}s", flush=True)
            try:
                ours = budget_run(corpus, seconds, Path(tmp) / f"run_{len(rows)}")
            except ConfigError as exc:  # a budget too short for this corpus
                print(f"== {name}: refused: {exc}", flush=True)
                rows.append((name, {"refused": str(exc)}, None))
                continue
            print(f"== {name}: plain Keras 2x256 LSTM for {ours['seconds']:.1f}s", flush=True)
            base = baseline_run(corpus, ours["seconds"], ours["window"], ours["config"]["batch_size"])
            rows.append((name, ours, base))

    lines = []
    for name, ours, base in rows:
        if base is None:
            lines.append(f"| {name} | | refused: {ours['refused']} | | | | | |")
            continue
        c, b = ours["config"], ours["budget"]
        lines.append(
            f"| {name} | {b['train_chars'] + b['val_chars']:,} | {c['cell']} {c['layers']}x{c['units']}, batch "
            f"{c['batch_size']}, seq {c['seq_len']}, dropout {c['dropout']:g}, {ours['epochs_done']} epochs "
            f"({b['picked']['chars_per_s']:,.0f} chars/s, {b['picked']['chars_per_param']:.1f} chars/param) | "
            f"{ours['seconds']:.0f} s (probe {b['probe_seconds']:.0f} s) | {base['seconds']:.0f} s, {base['epochs']} "
            f"epochs | {_versus(ours, base, 'window_val_loss')} | {_versus(ours, base, 'stream_val_loss')} | "
            f"{ours['own_val_loss']:.3f} |"
        )
    shakespeare = rows[0][1].get("stream_val_loss", float("inf"))
    beaten = {
        key: all(b is not None and o[key] < b[key] for _, o, b in rows)
        for key in ("window_val_loss", "stream_val_loss")
    }
    body = (
        "## Quality under a time budget\n\n"
        f"`python bench/quality.py --minutes {args.minutes:g}`: `charrnn train --time-budget {args.minutes:g}m` "
        "(the probe and rule of `keras_charrnn/budget.py`) against a plain Keras 2x256 LSTM (Adam 1e-3, "
        "shuffled 100-char windows, batch 64) trained for the same wall time in the same run; last 10% "
        "of each corpus held out; each model's best validation epoch. Both models are scored the same two "
        "ways on the same held-out text: *windows*, 100-char windows each from a zero state (how the "
        "Keras model is trained and validated; a sampler that starts from a prime starts this way too); "
        "*streams*, the text cut into the budget run's batch of contiguous streams, read 100 characters at "
        "a time with the state "
        "carried (how `charrnn train` validates, and how a session that goes on generating reads its "
        "context). Mean nats/char (bits/char in brackets), budget run / Keras, the lower in bold; "
        "*own*: the budget run's validation loss as `charrnn train` reported it.\n\n"
        "| corpus | chars | --time-budget chose | wall time | Keras 2x256 time | windows | streams | own |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Goals: tinyshakespeare <= 1.47 nats/char in 10 minutes (here {shakespeare:.3f} on the streams, "
        f"{'met' if shakespeare <= 1.47 and args.minutes <= 10 else 'not met'}); better than the Keras "
        f"2x256 LSTM on every corpus: on the windows {'met' if beaten['window_val_loss'] else 'not met'}, "
        f"on the streams {'met' if beaten['stream_val_loss'] else 'not met'}."
    )
    print(body)
    if not args.no_write:
        update_section("quality", body)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
