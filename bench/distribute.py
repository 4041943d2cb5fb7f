"""Distributed training throughput: characters/s of 1 and 2 workers, and the scaling efficiency.

Both runs train the same model with the same *global* batch through ``charrnn train``:

- 1 worker: a plain single-device run, pinned to core 0 (``taskset -c 0``);
- 2 workers: ``--distribute multi-worker``, two processes on 127.0.0.1 with ``TF_CONFIG``,
  pinned to cores 0 and 1 (each replica gets half of every batch).

The speed is the chars/s of the last epoch (the first includes tracing and compilation),
as the chief prints it. Scaling efficiency = chars/s(2 workers) / (2 x chars/s(1 worker)).
With ``--gpus`` it compares one GPU with ``--distribute mirrored`` on every GPU instead.

    python bench/distribute.py [CORPUS] [--units 256 --batch-size 64 --seq-len 100 --chars 300000]

Writes the "distribute" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' server helpers
from report import update_section  # noqa: E402
from servers import free_ports  # noqa: E402

SPEED = re.compile(r"epoch (\d+)/(\d+):.*?([\d,]+) chars/s")


def _corpus(path: str | None, chars: int, folder: Path) -> Path:
    """The corpus cut to ``chars`` characters (tinyshakespeare if present, else generated words)."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    source = Path(path) if path else default
    if source.is_file():
        text = source.read_text(encoding="utf-8")
    else:
        import random

        rng = random.Random(0)
        words = "the of and to in a is that for it as with was on be by this are at from".split()
        text = " ".join(rng.choice(words) for _ in range(chars // 3))
    out = folder / "corpus.txt"
    out.write_text((text * (chars // max(len(text), 1) + 1))[:chars], encoding="utf-8")
    return out


def _train_cmd(corpus: Path, out: Path, args, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "keras_charrnn.cli",
        "train",
        str(corpus),
        "--out",
        str(out),
        "--units",
        str(args.units),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--epochs",
        str(args.epochs),
        "--val-frac",
        "0",
        "--dropout",
        "0",
        "--checkpoint-every",
        "0",
        "--sample-chars",
        "0",
        "--quiet",
        *extra,
    ]


def _last_speed(output: str) -> float:
    speeds = [float(m.group(3).replace(",", "")) for m in SPEED.finditer(output)]
    if not speeds:
        raise SystemExit(f"no chars/s line in the output:\n{output[-3000:]}")
    return speeds[-1]


def one_worker(corpus: Path, folder: Path, args, env: dict | None = None, pin: bool = True) -> float:
    cmd = (["taskset", "-c", "0"] if pin else []) + _train_cmd(corpus, folder / "one", args)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return _last_speed(done.stdout)


def two_workers(corpus: Path, folder: Path, args) -> float:
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        cmd = ["taskset", "-c", str(i)] + _train_cmd(corpus, folder / "two", args, "--distribute", "multi-worker")
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "TF_CONFIG": tf_config},
            )
        )
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("\n".join(o[-3000:] for o in outputs))
    return _last_speed(outputs[0])  # the chief's line; chars/s counts the global batch


def mirrored_gpus(corpus: Path, folder: Path, args) -> float:
    done = subprocess.run(
        _train_cmd(corpus, folder / "gpus", args, "--distribute", "mirrored"), capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return _last_speed(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", nargs="?", default=None, help="text file (default: tinyshakespeare, else generated)")
    p.add_argument("--units", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch (default 64)")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--epochs", type=int, default=2, help="the last one is timed (default 2)")
    p.add_argument("--chars", type=int, default=300_000, help="corpus size (default 300,000)")
    p.add_argument("--gpus", action="store_true", help="1 GPU vs every GPU (mirrored) instead of 1 vs 2 CPU workers")
    args = p.parse_args()
    if not args.gpus and shutil.which("taskset") is None:
        raise SystemExit("taskset not found (util-linux)")

    folder = Path(tempfile.mkdtemp(prefix="bench-distribute-"))
    try:
        corpus = _corpus(args.corpus, args.chars, folder)
        model = f"2x{args.units} LSTM, global batch {args.batch_size} x {args.seq_len}, Adam with clip-norm"
        if args.gpus:
            import tensorflow as tf

            n = len(tf.config.list_physical_devices("GPU"))
            one = one_worker(corpus, folder, args, env={"CUDA_VISIBLE_DEVICES": "0"}, pin=False)
            many = mirrored_gpus(corpus, folder, args)
            rows = [("1 GPU", one, 1.0), (f"{n} GPUs (mirrored)", many, many / (n * one))]
        else:
            one = one_worker(corpus, folder, args)
            two = two_workers(corpus, folder, args)
            rows = [
                ("1 worker (taskset -c 0)", one, 1.0),
                ("2 workers (MultiWorkerMirroredStrategy, 127.0.0.1, taskset -c 0 / -c 1)", two, two / (2 * one)),
            ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    body = (
        f"### Distributed training\n\n{model}; chars/s of the last of {args.epochs} epochs, "
        f"through `charrnn train`.\n\n| setup | chars/s | scaling efficiency |\n|---|---|---|\n"
    )
    body += "".join(f"| {name} | {speed:,.0f} | {eff:.0%} |\n" for name, speed, eff in rows)
    for name, speed, eff in rows:
        print(f"{name}: {speed:,.0f} chars/s, efficiency {eff:.0%}")
    update_section("distribute", body)


if __name__ == "__main__":
    main()
