"""Training speed (characters/second) of every cell at 2x128 and 2x512: Keras fit on the TensorFlow and JAX
backends vs PyTorch, and the fraction of this machine's FLOP limit each reaches, in one run.

All three train the same model (embedding 64, two recurrent layers of ``units``, dense logits, no dropout)
on truncated-BPTT batches of tinyshakespeare (batch 64 x seq_len 100), Adam 2e-3 with global-norm clipping
at 5, the hidden state carried from batch to batch and reset at each epoch's start:

- Keras: the package's own path, the one ``charrnn train`` takes: a ``TrainConfig``, ``train._build``
  (``model_from_config`` + ``make_optimizer`` + ``compile_model``), then ``model.fit`` over
  ``TBPTTBatches`` with the ``ResetStates`` callback. Each backend runs in its own subprocess, since
  ``KERAS_BACKEND`` is fixed when Keras is imported.
- PyTorch (``pip install 'keras-charrnn[bench]'``, torch 2.13 CPU): ``Embedding -> nn.LSTM/GRU/RNN(tanh)``
  (2 layers) ``-> Linear``, cross-entropy, ``clip_grad_norm_(5)``, Adam; skipped when not installed.

The three worker processes stay alive for the whole run and are driven in turn, one timed repetition of
each backend after the other, so a change in the machine's load hits every backend alike. Each model is
first warmed up (trace/compile, then a short timed fit that sizes the repetitions to about
``--rep-seconds``); the figure is the median of ``--repeats`` repetitions.

FLOP limit: the median rate of a large float32 ``tf.matmul`` (2048^3, 2*n^3 FLOP), measured in the
TensorFlow worker before and after the models; the higher of the two is the limit.
Training FLOP per character = 3 x forward matmul FLOP (the backward pass costs two matmuls per forward one):

    forward = 2 * (sum over layers of  g * units * (d_in + units)  +  units * vocab)

with g = 4 (LSTM), 3 (GRU), 1 (SimpleRNN) gate matmuls, d_in = 64 for the first layer and ``units`` above it;
the embedding lookup and element-wise ops are not counted. About 20 MFLOP for a 2x512 LSTM.

    python bench/train_throughput.py [--quick] [--no-write] [--backends tensorflow,jax,torch]
    python bench/train_throughput.py --device gpu   # on a CUDA machine: Keras JAX, Keras torch (cuDNN), PyTorch
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

BATCH, SEQ, EMB, LAYERS, LR, CLIP = 64, 100, 64, 2, 2e-3, 5.0
CELLS = ("lstm", "gru", "rnn")  # the cells PyTorch has too
GOALS = {"lstm": 1.0, "gru": 1.3, "rnn": 1.3}  # issue 13: fastest backend vs PyTorch
BACKENDS = ("tensorflow", "jax", "keras-torch", "torch")  # "torch" is PyTorch itself, the reference
CPU_BACKENDS = ("tensorflow", "jax", "torch")
GPU_BACKENDS = ("jax", "keras-torch", "torch")  # the GPU machine has no TensorFlow (see main)
LABELS = {"tensorflow": "Keras TF", "jax": "Keras JAX", "keras-torch": "Keras torch", "torch": "PyTorch"}
KERAS_BACKEND = {"tensorflow": "tensorflow", "jax": "jax", "keras-torch": "torch", "torch": "tensorflow"}
PEAK_N = 2048
MARK = "@@bench "  # prefixes a worker's replies on its stdout; anything else there is passed through


def train_flop_per_char(cell: str, units: int, vocab: int, layers: int = LAYERS, emb: int = EMB) -> float:
    """Training FLOP per character: 3 x the forward matmul FLOP (see the module docstring).

    Args:
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"``.
        units: units per recurrent layer.
        vocab: vocabulary size (the logits' width).
        layers: stacked recurrent layers.
        emb: embedding size (the first layer's input).

    Returns:
        FLOP per trained character.

    Example:

    >>> round(train_flop_per_char("lstm", 512, 65) / 1e6, 1)
    19.9
    """
    from keras_charrnn.cell_types import cell_spec  # pure Python: no TensorFlow on the GPU machine either

    spec = cell_spec(cell)
    forward = sum(spec.flops_per_char(emb if i == 0 else units, units) for i in range(layers)) + 2 * units * vocab
    return 3 * forward


# ------------------------------------------------------------------------------------------------- workers


class KerasRunner:
    """One Keras model trained the way ``charrnn train`` does, on this process' backend."""

    def __init__(self, ids: np.ndarray, vocab: int, cell: str, units: int):
        import keras

        from keras_charrnn import train as train_module
        from keras_charrnn.callbacks import ResetStates
        from keras_charrnn.config import TrainConfig
        from keras_charrnn.tbptt import TBPTTBatches

        self.keras, self.reset = keras, ResetStates
        config = TrainConfig(
            cell=cell,
            units=units,
            layers=LAYERS,
            embedding_dim=EMB,
            dropout=0.0,
            batch_size=BATCH,
            seq_len=SEQ,
            lr=LR,
            lr_schedule="constant",
            clip_norm=CLIP,
            epochs=1,
        )
        config.validate()
        self.data = TBPTTBatches(ids, BATCH, SEQ)

        class Vocab:  # _build reads only .size
            size = vocab

        self.model = train_module._build(config, Vocab(), len(self.data))
        self.info = {"backend": keras.backend.backend(), "jit_compile": getattr(self.model, "jit_compile", None)}

    def fit(self, batches: int) -> None:
        """One ``fit`` epoch over the first ``batches`` batches (states reset at its start)."""
        data = self.data

        class Head(self.keras.utils.PyDataset):
            def __init__(self):
                super().__init__(workers=1, use_multiprocessing=False)

            def __len__(self):
                return batches

            def __getitem__(self, i):
                return data[i]

        self.model.fit(Head(), shuffle=False, verbose=0, callbacks=[self.reset()])
        self.keras.ops.convert_to_numpy(self.model.trainable_variables[0])  # waits for an accelerator's queue


class TorchRunner:
    """The same model in PyTorch, trained with the same batches, loss, clipping and optimizer."""

    def __init__(self, ids: np.ndarray, vocab: int, cell: str, units: int):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(vocab, EMB)
                self.rnn = rnn_cls(EMB, units, LAYERS, batch_first=True)  # nn.RNN: tanh
                self.out = torch.nn.Linear(units, vocab)

            def forward(self, x, h):
                y, h = self.rnn(self.emb(x), h)
                return self.out(y), h

        self.torch, self.vocab, self.net = torch, vocab, Net().to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=LR)
        n = (len(ids) - 1) // (BATCH * SEQ) * BATCH * SEQ
        self.x = torch.from_numpy(ids[:n].reshape(BATCH, -1).astype(np.int64)).to(self.device)
        self.y = torch.from_numpy(ids[1 : n + 1].reshape(BATCH, -1).astype(np.int64)).to(self.device)
        self.info = {
            "backend": "torch",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
        }

    def fit(self, batches: int) -> None:
        """One epoch over the first ``batches`` batches, the hidden state carried (detached) between them."""
        torch, h = self.torch, None
        for b in range(batches):
            window = slice(b * SEQ, (b + 1) * SEQ)
            logits, h = self.net(self.x[:, window], h)
            h = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), self.y[:, window].reshape(-1))
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), CLIP)
            self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def matmul_gflops(product, n: int, repeats: int = 15) -> float:
    """The rate of ``product()`` (one n x n x n float32 matmul, finished when it returns) in GFLOP/s: the
    median of ``repeats`` timed calls after 3 warm-up ones."""
    times = []
    for _ in range(3 + repeats):
        t = time.perf_counter()
        product()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times[3:]) / 1e9


def peak_matmul(n: int = PEAK_N, repeats: int = 15) -> float:
    """This machine's float32 matmul rate in GFLOP/s: the median of ``repeats`` timed ``tf.matmul``s of n x n."""
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    b = tf.random.uniform((n, n), dtype=tf.float32)
    return matmul_gflops(lambda: tf.matmul(a, b).numpy(), n, repeats)


def peak_matmul_torch(n: int = 8192, repeats: int = 15) -> dict:
    """The GPU's float32 matmul rates in GFLOP/s through PyTorch (median of ``repeats`` n x n products):
    ``{"gflops": float32 proper, "gflops_tf32": with TF32 tensor cores}`` (on the CPU if there is no GPU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = n if device == "cuda" else PEAK_N
    a, b = (torch.rand((n, n), device=device) for _ in range(2))

    def product():
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    rates = {}
    for key, tf32 in (("gflops", False), ("gflops_tf32", True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        rates[key] = matmul_gflops(product, n, repeats)
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
    return rates


def worker(backend: str, ids_path: str, vocab: int) -> None:
    """Serves commands (JSON lines on stdin), one reply each (a ``MARK``ed JSON line on stdout).

    Commands: ``{"op": "setup", "cell", "units", "rep_seconds"}`` builds and warms up a model and picks the
    batches per repetition; ``{"op": "rep"}`` times one repetition (chars/s); ``{"op": "peak"}`` measures
    the matmul rate (TensorFlow worker); ``{"op": "quit"}``.
    """
    ids = np.load(ids_path)
    runner, batches = None, 0
    if backend != "torch":
        import keras  # noqa: F401  (import before replying "ready", so imports are not timed)
    else:
        import torch  # noqa: F401
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "peak":
                reply = peak_matmul_torch() if backend == "torch" else {"gflops": peak_matmul()}
            elif cmd["op"] == "setup":
                runner = None
                cls = TorchRunner if backend == "torch" else KerasRunner
                t = time.perf_counter()
                runner = cls(ids, vocab, cmd["cell"], cmd["units"])
                runner.fit(2)  # trace / compile
                compile_s = time.perf_counter() - t
                t = time.perf_counter()
                runner.fit(3)
                rate = 3 / (time.perf_counter() - t)  # batches/s, warm
                limit = len(runner.data) if backend != "torch" else runner.x.shape[1] // SEQ
                batches = max(3, min(limit, math.ceil(rate * cmd["rep_seconds"])))
                reply = dict(runner.info, compile_s=compile_s, batches=batches)
            elif cmd["op"] == "rep":
                t = time.perf_counter()
                runner.fit(batches)
                reply = {"chars_per_s": batches * BATCH * SEQ / (time.perf_counter() - t)}
            else:
                reply = {"error": f"unknown op {cmd['op']!r}"}
        except Exception as e:  # reported in the table, the run goes on
            reply = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
        print(MARK + json.dumps(reply), flush=True)


# ---------------------------------------------------------------------------------------------- driver


class Worker:
    """A worker subprocess for one backend."""

    def __init__(self, backend: str, ids_path: str, vocab: int):
        env = dict(os.environ, KERAS_BACKEND=KERAS_BACKEND[backend])
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.backend, self.error = backend, None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                backend,
                "--ids",
                ids_path,
                "--vocab",
                str(vocab),
                "--batch",
                str(BATCH),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.error = self._read().get("error")

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            sys.stderr.write(line)
        return {"error": f"worker exited with {self.proc.wait()}"}

    def ask(self, **cmd) -> dict:
        """Sends one command, returns the reply (``{"error": ...}`` when the worker failed or died)."""
        if self.error:
            return {"error": self.error}
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": f"worker exited with {self.proc.wait()}"}
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.ask(op="quit")
        self.proc.wait()


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt"
        ),
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per model and backend (median)")
    parser.add_argument("--rep-seconds", type=float, default=3.0, help="about how long one repetition trains")
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated subset of "
        + ",".join(BACKENDS)
        + " (default: "
        + ",".join(CPU_BACKENDS)
        + "; with --device gpu "
        + ",".join(GPU_BACKENDS)
        + ")",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: train on the machine's CUDA GPU (cuDNN where the backend has it), the limit is "
        "PyTorch's float32 matmul there, and the section is 'Training throughput, GPU'",
    )
    parser.add_argument("--quick", action="store_true", help="2x128 only, 2 repetitions of about 1 s")
    parser.add_argument("--no-write", action="store_true", help="print the section, don't write BENCHMARKS.md")
    parser.add_argument("--batch", type=int, default=BATCH, help="streams per batch (default: %(default)s)")
    parser.add_argument("--sizes", default="128,512", help="units per layer, comma-separated (default: %(default)s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    globals()["BATCH"] = args.batch  # read by the runners and the section
    if args.worker:
        return worker(args.worker, args.ids, args.vocab)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from keras_charrnn.corpus import read_text
    from keras_charrnn.vocab import Vocabulary

    sizes = (128,) if args.quick else tuple(int(u) for u in args.sizes.split(","))
    repeats, rep_seconds = (2, 1.0) if args.quick else (args.repeats, args.rep_seconds)
    gpu = args.device == "gpu"
    backends = [
        b.strip() for b in (args.backends or ",".join(GPU_BACKENDS if gpu else CPU_BACKENDS)).split(",") if b.strip()
    ]
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backends: choose from {', '.join(BACKENDS)}, got {args.backends!r}")
    load_start = os.getloadavg()
    text = read_text(args.corpus)
    vocab = Vocabulary.from_text(text)
    ids = np.asarray(vocab.encode(text), dtype=np.int32)

    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.npy")
        np.save(ids_path, ids)
        started = time.perf_counter()
        workers = {b: Worker(b, ids_path, vocab.size) for b in backends}
        peak_backend = "torch" if gpu else "tensorflow"
        peak_worker = workers.get(peak_backend) or Worker(peak_backend, ids_path, vocab.size)
        peak_replies = [peak_worker.ask(op="peak")]
        results: dict[tuple[str, int, str], dict] = {}
        try:
            for units in sizes:
                for cell in CELLS:
                    for b, w in workers.items():
                        results[cell, units, b] = info = w.ask(
                            op="setup", cell=cell, units=units, rep_seconds=rep_seconds
                        )
                        info["reps"] = []
                    for _ in range(repeats):  # interleaved: one repetition of each backend in turn
                        for b, w in workers.items():
                            info = results[cell, units, b]
                            if "error" not in info:
                                reply = w.ask(op="rep")
                                if "error" in reply:
                                    info["error"] = reply["error"]
                                else:
                                    info["reps"].append(reply["chars_per_s"])
                    line = [f"{cell} 2x{units}:"]
                    for b in backends:
                        info = results[cell, units, b]
                        info["median"] = None if "error" in info else statistics.median(info["reps"])
                        line.append(
                            f"{LABELS[b]} {fmt(info['median'])}" + (f" ({info['error']})" if "error" in info else "")
                        )
                    print("  ".join(line), flush=True)
            peak_replies.append(peak_worker.ask(op="peak"))
        finally:
            for w in {id(w): w for w in [*workers.values(), peak_worker]}.values():
                w.close()
        elapsed = time.perf_counter() - started
    load_end = os.getloadavg()

    suffix = "" if BATCH == 64 else f"_batch {BATCH}"  # another batch gets its own section
    peaks = [r.get("gflops") for r in peak_replies]
    measured = [p for p in peaks if p]
    peak = max(measured) if measured else None
    if gpu:  # cuDNN and XLA run float32 matmuls on TF32 tensor cores by default: that rate is the limit
        strict = peak
        peaks = [r.get("gflops_tf32") for r in peak_replies]
        peak = max((p for p in peaks if p), default=None)
        device = next((results[k]["device"] for k in results if results[k].get("device")), "GPU")
        limit_text = (
            f"{fmt(peak)} GFLOP/s, float32 `torch.matmul` 8192^3 with TF32 tensor cores on the {device} "
            f"(median of 15; {' / '.join(fmt(p) for p in peaks)} before / after the models). cuDNN's RNNs "
            f"and XLA's dots use TF32 for float32 by default on this GPU, so that is the limit; strict "
            f"float32 reaches {fmt(strict)} GFLOP/s"
        )
    else:
        limit_text = (
            f"{fmt(peak)} GFLOP/s (float32 `tf.matmul` {PEAK_N}^3, median of 15; "
            f"{' / '.join(fmt(p) for p in peaks)} before / after the models)"
        )
    body = section(
        results,
        backends,
        sizes,
        vocab.size,
        repeats,
        rep_seconds,
        limit_text if peak else "not measured",
        peak,
        load_start,
        load_end,
        elapsed,
        ("Training throughput, GPU" if gpu else "Training throughput") + suffix.replace("_", ", "),
    )
    print(body)
    if args.no_write:
        print("(--no-write: BENCHMARKS.md not changed)")
    else:
        from report import update_section

        update_section(("train_throughput_gpu" if gpu else "train_throughput") + suffix.replace(" ", ""), body)


def section(
    results: dict,
    backends: list[str],
    sizes: tuple[int, ...],
    vocab: int,
    repeats: int,
    rep_seconds: float,
    limit_text: str,
    peak: float | None,
    load_start,
    load_end,
    elapsed: float,
    title: str = "Training throughput",
) -> str:
    """The BENCHMARKS.md section: chars/s, fraction of the FLOP limit and ratio vs PyTorch, then the goals."""
    keras_backends = [b for b in backends if b != "torch"]
    has_torch = "torch" in backends
    head = ["cell", "size", "MFLOP/char"] + [f"{LABELS[b]} chars/s (% of limit)" for b in backends]
    head += [f"{LABELS[b]} / PyTorch" for b in keras_backends] if has_torch else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    goals = ["| cell | size | fastest Keras backend | vs PyTorch | goal | met |", "|---|---|---|---|---|---|"]
    for units in sizes:
        for cell in CELLS:
            flop = train_flop_per_char(cell, units, vocab)
            cells = [cell, f"2x{units}", f"{flop / 1e6:.1f}"]
            for b in backends:
                info = results[cell, units, b]
                if info.get("median") is None:
                    cells.append("error: " + info.get("error", "?").replace("|", "/"))
                else:
                    share = f" ({100 * info['median'] * flop / (peak * 1e9):.0f}%)" if peak else ""
                    cells.append(f"{info['median']:,.0f}{share}")
            torch_speed = results[cell, units, "torch"].get("median") if has_torch else None
            ratios = {}
            for b in keras_backends if has_torch else []:
                speed = results[cell, units, b].get("median")
                ratios[b] = speed / torch_speed if speed and torch_speed else None
                cells.append(fmt(ratios[b], ".2f") + ("x" if ratios[b] else ""))
            rows.append("| " + " | ".join(cells) + " |")
            speeds = {b: results[cell, units, b].get("median") for b in keras_backends}
            speeds = {b: s for b, s in speeds.items() if s}
            if speeds:
                best = max(speeds, key=speeds.get)
                r = ratios.get(best)
                met = "n/a" if r is None else ("yes" if r >= GOALS[cell] else "no")
                goals.append(
                    f"| {cell} | 2x{units} | {LABELS[best]} | {fmt(r, '.2f')}{'x' if r else ''} | "
                    f">= {GOALS[cell]:.1f}x | {met} |"
                )
    torch_version = next((results[k]["torch"] for k in results if "torch" in results[k]), "2.13")
    jit = {b: results[c, u, b]["jit_compile"] for (c, u, b) in results if "jit_compile" in results[c, u, b]}
    return (
        f"## {title}\n\n"
        f"Batch {BATCH} x seq_len {SEQ}, embedding {EMB}, {LAYERS} layers, no dropout, Adam {LR:g}, "
        f"clip-norm {CLIP:g}; "
        f"vocabulary {vocab}. Keras: the package's `charrnn train` path (`train._build`, `fit` over `TBPTTBatches`), "
        f"one subprocess per backend (jit_compile: {', '.join(f'{b} {v}' for b, v in sorted(jit.items())) or 'n/a'}); "
        f"PyTorch {torch_version}, `nn.LSTM`/`nn.GRU`/`nn.RNN`, `clip_grad_norm_`. "
        f"Median of {repeats} timed repetitions (each about "
        f"{rep_seconds:g} s of training) after warm-up, the backends interleaved repetition by "
        f"repetition. Run took {elapsed:.0f} s; load average {load_start[0]:.2f} at the start, "
        f"{load_end[0]:.2f} at the end.\n\n"
        f"FLOP limit: {limit_text}. % of limit = chars/s x training FLOP/char / limit, with training FLOP/char = "
        "3 x 2 x (sum over layers of g x units x (d_in + units) + units x vocab), g = 4 LSTM, 3 GRU, 1 SimpleRNN "
        f"(d_in = {EMB} for the first layer, units above); the embedding lookup and element-wise ops are not "
        "counted.\n\n"
        + "\n".join(rows)
        + "\n\nGoals (issue 13), the fastest Keras backend per model vs PyTorch:\n\n"
        + "\n".join(goals)
    )


if __name__ == "__main__":
    main()
