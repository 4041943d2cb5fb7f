"""Validation loss reached under a wall-clock budget with the project's default settings.

Trains ``charrnn train``'s defaults (TrainConfig) on CORPUS (last 10% held
out) for about ``--minutes``: a short probe measures the speed, the number of
epochs is set so the learning-rate schedule spans the budget, and a time
budget stops training at the limit (Keras still validates the stopped epoch). Reports the best validation
loss in nats/char and bits/char.

    python bench/quality.py ../shared/data/tinyshakespeare.txt --minutes 10
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()

    from keras_charrnn.callbacks import TimeBudget
    from keras_charrnn.config import TrainConfig
    from keras_charrnn.metrics import bits_per_char
    from keras_charrnn.train import prepare_data, train
    from keras_charrnn.vocab import read_corpus

    import csv

    import keras

    config = TrainConfig()
    _, batches, _ = prepare_data(read_corpus(args.corpus), config)
    budget = args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        # Probe: time batches 5..k of a short run, so the schedule can span the budget.
        stamps = []
        clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: stamps.append(time.perf_counter()))
        probe = TrainConfig(**{**config.__dict__, "epochs": 1, "checkpoint_every": 0})
        train(args.corpus, f"{tmp}/probe", probe, callbacks=[clock, TimeBudget(30)], verbose=0)
        per_batch = (stamps[-1] - stamps[4]) / (len(stamps) - 5)
        # Round up: the schedule spans the budget or a little more, and the time budget ends the
        # last epoch early (Keras still validates a stopped epoch).
        config.epochs = max(1, math.ceil(budget / (per_batch * len(batches))))
        print(f"{per_batch:.3f}s per batch: {config.epochs} epochs of {len(batches)} batches span the budget")
        start = time.perf_counter()
        train(args.corpus, f"{tmp}/run", config, callbacks=[TimeBudget(budget)], verbose=0)
        minutes = (time.perf_counter() - start) / 60
        rows = list(csv.DictReader(open(f"{tmp}/run/log.csv")))
    best = min(float(r["val_loss"]) for r in rows)
    c = config
    body = ("## Quality under a time budget\n\n"
            f"`python bench/quality.py {os.path.basename(args.corpus)} --minutes {args.minutes:g}`: the defaults "
            f"({c.cell} {c.layers}x{c.units}, embedding {c.embedding_dim}, dropout {c.dropout}, batch {c.batch_size}, "
            f"seq_len {c.seq_len}, Adam {c.lr:g} with a {c.lr_schedule} schedule over {c.epochs} epochs, clip-norm "
            f"{c.clip_norm}), last 10% held out.\n\n"
            "| trained (min) | epochs done | best val loss (nats/char) | best val bpc |\n|---|---|---|---|\n"
            f"| {minutes:.1f} | {len(rows)} | {best:.3f} | {bits_per_char(best):.3f} |\n\n"
            "Goal: <= 1.47 nats/char (2.12 bpc) within 10 minutes on this CPU.")
    print(body)
    update_section("quality", body)


if __name__ == "__main__":
    main()
