"""Single-stream in-process generation speed vs the NumPy matmul limit, for 2x128 and 2x512 LSTMs.

The limit is the time of the model's per-character matrix products alone at
batch 1 (embedding row, each layer's input and recurrent matmuls, the output
layer) in NumPy: no framework can sample faster than its own matmuls.

    python bench/generate.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from report import update_section  # noqa: E402

VOCAB = 66
CHARS = 2000


def numpy_limit(weights: list[np.ndarray], units: int, layers: int, repeats: int = 5) -> float:
    """Characters per second of the bare matmuls, batch 1 (median of runs)."""
    emb = weights[0]
    layer_w = [weights[1 + 3 * i : 4 + 3 * i] for i in range(layers)]
    dense_w = weights[-2]
    x0 = emb[:1]

    def run():
        hs = [np.zeros((1, units), np.float32) for _ in range(layers)]
        t = time.perf_counter()
        for _ in range(CHARS):
            x = x0
            for i, (k, r, b) in enumerate(layer_w):
                z = x @ k + hs[i] @ r + b
                hs[i] = z[:, :units]
                x = hs[i]
            _ = x @ dense_w
        return CHARS / (time.perf_counter() - t)

    return statistics.median(run() for _ in range(repeats))


def main() -> None:
    from keras_charrnn.export import save_savedmodel
    from keras_charrnn.model import build_model
    from keras_charrnn.inprocess import load
    from keras_charrnn.vocab import Vocabulary

    vocab = Vocabulary([chr(c) for c in range(32, 32 + VOCAB - 1)])
    rows = [
        "| model | XLA | in-process generate (chars/s, median) | NumPy matmul limit (chars/s) | fraction of limit |",
        "|---|---|---|---|---|",
    ]
    for units in (128, 512):
        model = build_model(vocab.size, cell="lstm", units=units, layers=2, batch_size=1, seq_len=1)
        limit = numpy_limit(model.get_weights(), units, 2)
        for xla in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                save_savedmodel(model, vocab, f"{tmp}/1", xla=xla)
                m = load(f"{tmp}/1")
                m.generate("a", 64, seed=0)  # compile
                speeds = []
                for seed in range(5):
                    t = time.perf_counter()
                    m.generate("a", CHARS, seed=seed)
                    speeds.append(CHARS / (time.perf_counter() - t))
                speed = statistics.median(speeds)
            rows.append(
                f"| LSTM 2x{units} | {'on' if xla else 'off'} | {speed:,.0f} | {limit:,.0f} | {speed / limit:.0%} |"
            )
            print(rows[-1], flush=True)
    body = (
        "## In-process generation (single stream)\n\n"
        f"`CharRNN.generate` of {CHARS} characters in calls of up to 4096, batch 1, temperature 0.8; "
        "the sampling loop runs inside the graph.\n\n"
        + "\n".join(rows)
        + "\n\nGoal: >= 50% of the limit for 2x512 and >= 25% for 2x128."
    )
    update_section("generate", body)


if __name__ == "__main__":
    main()
