"""Peak memory of reading, encoding and laying out a large corpus for training, per character.

Writes an N-MB corpus (a folder of files, mostly ASCII with some accented
characters and dashes, like a source tree with comments) to a temporary folder, then in a
fresh process imports TensorFlow and the package, notes the resident memory
(the baseline), resets the peak (``/proc/self/clear_refs``), and runs what
``charrnn train`` runs before the model: ``train.load_data`` (scan: UTF-8 check, vocabulary,
hash; encode in blocks; TBPTT layout) and one batch. It reports the peak
resident memory above the baseline, per character of the corpus, and what
stays held afterwards.

    python bench/corpus_memory.py            # 200 MB
    python bench/corpus_memory.py --mb 50
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from report import update_section

GOAL = 8.0  # bytes per character above TensorFlow's own memory

PROBE = r"""
import json, sys, time

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

import tensorflow, keras  # noqa: F401
from keras_charrnn.config import TrainConfig
from keras_charrnn.train import load_data

baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak, to the current RSS
    reset = True
except OSError:
    reset = False
start = time.perf_counter()
corpus, train_batches, val_batches = load_data(sys.argv[1], TrainConfig())
x, y = train_batches[0]
seconds = time.perf_counter() - start
print(json.dumps({"chars": int(corpus.ids.size), "dtype": str(corpus.ids.dtype), "vocab": corpus.vocab.size,
                  "files": len(corpus.record["files"]), "baseline": baseline, "peak": status("VmHWM"),
                  "held": status("VmRSS"), "reset": reset, "seconds": seconds}))
"""


def make_corpus(folder: Path, megabytes: int, files: int = 20) -> None:
    """Writes ``files`` files of about ``megabytes / files`` MB each."""
    rng = random.Random(0)
    words = (
        "def return self value for in if else the of and to a is that it with as was on be by this "
        "café naïve résumé — “quoted” über déjà"
    ).split()
    lines = []
    for _ in range(20000):
        lines.append("    " * rng.randint(0, 3) + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
    block = ("\n".join(lines) + "\n").encode("utf-8")
    per_file = megabytes * (1 << 20) // files
    for i in range(files):
        with open(folder / f"file_{i:03d}.txt", "wb") as f:
            for _ in range(per_file // len(block)):
                f.write(block)
            f.write(block[: per_file % len(block)].decode("utf-8", "ignore").encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        make_corpus(folder, args.mb)
        out = subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    per_char = (r["peak"] - r["baseline"]) / r["chars"]
    held = (r["held"] - r["baseline"]) / r["chars"]
    mb = 1 << 20
    rows = [
        "| corpus | characters | ids | TF baseline RSS | peak above baseline | per character | held after | time |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['files']} files, {args.mb} MB, vocabulary {r['vocab']} | {r['chars']:,} | {r['dtype']} "
        f"| {r['baseline'] / mb:.0f} MB | {(r['peak'] - r['baseline']) / mb:.0f} MB | **{per_char:.2f} bytes** "
        f"| {held:.2f} bytes/char | {r['seconds']:.1f} s |",
    ]
    print("\n".join(rows))
    note = "" if r["reset"] else " (the peak could not be reset after the import, so it may include the import's)"
    body = (
        "## Corpus memory\n\n"
        "`python bench/corpus_memory.py`: peak resident memory of reading a folder corpus, building the "
        "vocabulary, encoding it and laying it out for truncated BPTT (`train.load_data`, everything "
        "`charrnn train` does before the model), above the process's memory after importing TensorFlow "
        f"and the package{note}.\n\n" + "\n".join(rows) + "\n\n"
        f"Goal: under {GOAL:.0f} bytes per character above TensorFlow's own memory (before: about 20). "
        f"{'Met' if per_char < GOAL else 'Not met'}. The corpus is read in 4 MB blocks twice (check, vocabulary "
        "and hash; then encoding straight into one array of the smallest id type), so the peak is that array "
        "(1 byte per character for a vocabulary under 256, 2 under 65,536) plus a few blocks; a memory-mapped "
        "ids file would not lower it further, so there is none."
    )
    update_section("corpus_memory", body)


if __name__ == "__main__":
    main()
