"""Training speed (characters/second) of each cell at 2x128 and 2x512, Keras fit vs PyTorch, side by side.

Both train the same model (embedding 64, two recurrent layers, dense logits) on
truncated-BPTT batches of tinyshakespeare (batch 64, seq_len 100), Adam 2e-3
with global-norm clipping at 5, the hidden state carried across batches.
Keras runs the package's own path: ``build_model`` + ``model.fit`` over
``TBPTTBatches``. PyTorch (``pip install 'keras-charrnn[bench]'``) is the
reference a user would otherwise pick; it is skipped when not installed.

    python bench/train_throughput.py [--corpus ../shared/data/tinyshakespeare.txt] [--batches 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from report import update_section  # noqa: E402

BATCH, SEQ, EMB = 64, 100, 64


def keras_speed(ids: np.ndarray, vocab: int, cell: str, units: int, batches: int, repeats: int) -> float:
    import keras

    from keras_charrnn.callbacks import ResetStates
    from keras_charrnn.config import TrainConfig
    from keras_charrnn.model import build_model, compile_model, make_optimizer
    from keras_charrnn.tbptt import TBPTTBatches

    data = TBPTTBatches(ids[: BATCH * SEQ * (batches + 2) + 1], BATCH, SEQ)
    model = build_model(vocab, cell=cell, units=units, layers=2, embedding_dim=EMB, batch_size=BATCH, seq_len=SEQ)
    compile_model(model, make_optimizer(TrainConfig(lr_schedule="constant"), 1))

    class Head(keras.utils.PyDataset):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return data[i]

    model.fit(Head(2), shuffle=False, verbose=0, callbacks=[ResetStates()])  # build and trace

    def run():
        t = time.perf_counter()
        model.fit(Head(batches), shuffle=False, verbose=0, callbacks=[ResetStates()])
        return batches * BATCH * SEQ / (time.perf_counter() - t)

    return statistics.median(run() for _ in range(repeats))


def torch_speed(ids: np.ndarray, vocab: int, cell: str, units: int, batches: int, repeats: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, EMB)
            self.rnn = rnn_cls(EMB, units, 2, batch_first=True)
            self.out = torch.nn.Linear(units, vocab)

        def forward(self, x, h):
            y, h = self.rnn(self.emb(x), h)
            return self.out(y), h

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    n = BATCH * SEQ * (batches + 2)
    x_all = torch.from_numpy(ids[:n].reshape(BATCH, -1).astype(np.int64))
    y_all = torch.from_numpy(ids[1:n + 1].reshape(BATCH, -1).astype(np.int64))

    def epoch(k):
        h = None
        for b in range(k):
            x, y = x_all[:, b * SEQ:(b + 1) * SEQ], y_all[:, b * SEQ:(b + 1) * SEQ]
            logits, h = net(x, h)
            h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()

    epoch(2)

    def run():
        t = time.perf_counter()
        epoch(batches)
        return batches * BATCH * SEQ / (time.perf_counter() - t)

    return statistics.median(run() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                         "tinyshakespeare.txt"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from keras_charrnn.vocab import Vocabulary, read_corpus

    text = read_corpus(args.corpus)
    vocab = Vocabulary.from_text(text)
    ids = vocab.encode(text)
    rows = ["| cell | size | Keras fit (chars/s) | PyTorch (chars/s) | Keras / PyTorch |", "|---|---|---|---|---|"]
    for units in (128, 512):
        for cell in ("lstm", "gru", "rnn"):
            k = keras_speed(ids, vocab.size, cell, units, args.batches, args.repeats)
            t = torch_speed(ids, vocab.size, cell, units, args.batches, args.repeats)
            ratio = f"{k / t:.2f}x" if t else "n/a"
            rows.append(f"| {cell} | 2x{units} | {k:,.0f} | {t:,.0f} | {ratio} |" if t else
                        f"| {cell} | 2x{units} | {k:,.0f} | not installed | n/a |")
            print(rows[-1], flush=True)
    body = ("## Training throughput\n\n"
            f"Batch {BATCH}, seq_len {SEQ}, embedding {EMB}, Adam 2e-3, clip-norm 5; median of {args.repeats} runs of "
            f"{args.batches} batches each, Keras then PyTorch for each model, in one process.\n\n" + "\n".join(rows) +
            "\n\nGoal: >= 1.0x PyTorch for every cell and both sizes.")
    update_section("train_throughput", body)


if __name__ == "__main__":
    main()
