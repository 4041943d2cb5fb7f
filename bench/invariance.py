"""Batch invariance, bit for bit, the long version; and what it costs in speed.

On the bundled 2x512 LSTM's weights (the model built from this checkout's code),
64 sessions are each run alone, then for every batch size 1..64 a random choice
of them runs together at random rows; sampled ids, every state after every call
and the final logits must be bitwise equal to the session alone (the check of
``tests/test_batch_invariance.py``, with thousands of characters per session),
for the default signatures and for the XLA twins. Then, in the same process, the
speed of ``generate`` at batch 1 and 64 with the invariant matmuls against plain
``tf.matmul`` (same weights), as characters/second and their ratio, for the bundled
2x512 and a 2x128 LSTM.

    python bench/invariance.py [--chars 2000] [--sizes 1-64] [--no_write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_batch_invariance import FLAVOURS, bundled_module, invariance_failures, random_module  # noqa: E402

import tensorflow as tf  # noqa: E402

from keras_charrnn import cells  # noqa: E402


MODELS = {"2x512": bundled_module, "2x128": lambda: random_module("lstm", units=128)}


def traced(build, plain: bool):
    """A model and its signatures, traced with plain ``tf.matmul`` (the numerics before batch invariance) or not."""
    invariant, min_rows = cells.matmul, cells.MIN_LOOP_ROWS
    if plain:  # and a lone row runs alone in the XLA sampling loop (no copy beside it)
        cells.matmul, cells.MIN_LOOP_ROWS = (lambda x, w: tf.matmul(x, w)), 1
    try:
        module = build()
        return module, module.named_signatures()  # traces now
    finally:
        cells.matmul, cells.MIN_LOOP_ROWS = invariant, min_rows


def call_seconds(module, signatures, flavour: str, batch: int, chars: int) -> float:
    """Seconds of one ``generate`` call of ``chars`` characters per row (compiled and warmed before)."""
    name = FLAVOURS[flavour][1]
    inputs = {
        "ids": tf.fill([batch, 1], 1),
        **{n: tf.zeros([batch, module.units]) for n in module.state_names},
        "num_chars": tf.fill([batch], chars),
        "temperature": tf.ones([batch]),
        "top_k": tf.zeros([batch], tf.int32),
        "top_p": tf.ones([batch]),
        "seed": tf.range(batch, dtype=tf.int64),
        "position": tf.zeros([batch], tf.int64),
    }
    start = time.perf_counter()
    signatures[name](**inputs)["ids"].numpy()
    return time.perf_counter() - start


# Machines emulated on this one: the same seeded session under other kernels, instruction sets and thread counts.
MACHINES = {
    "default": {},
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
    "1 thread": {"TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"},
}


def session_digest(chars: int) -> dict:
    """Per flavour: a digest of a seeded session's sampled ids and final states (bundled model, batch of 8 rows)."""
    import hashlib

    from test_batch_invariance import make_sessions, run_together

    module = bundled_module()
    sessions = make_sessions(module, 8, chars)
    digests = {}
    for flavour in FLAVOURS:
        rows = run_together(module, flavour, sessions, list(range(8)))
        h = hashlib.sha256()
        for row in rows:
            h.update(row["text"].encode())
            h.update(row["ids"].tobytes())
            for state in row["states"]:
                h.update(state.tobytes())
        digests[flavour] = h.hexdigest()[:16]
    return digests


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        sizes.extend(range(int(low), int(high or low) + 1))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2000, help="characters each session samples")
    parser.add_argument("--sizes", default="1-64", help="batch sizes, e.g. 1-64 or 1,2,33")
    parser.add_argument("--flavours", default="plain,xla", help="signature flavours to check")
    parser.add_argument("--speed_chars", type=int, default=300, help="characters per row in the speed calls")
    parser.add_argument("--repeats", type=int, default=5, help="speed calls per figure (the median is kept)")
    parser.add_argument("--no_write", action="store_true", help="print the report only (no BENCHMARKS.md)")
    parser.add_argument("--digest", type=int, help=argparse.SUPPRESS)  # child: print session_digest(chars)
    args = parser.parse_args()
    if args.digest:
        print(json.dumps(session_digest(args.digest)))
        return
    sizes = parse_sizes(args.sizes)

    module = bundled_module()
    lines, start = [], time.time()
    for flavour in args.flavours.split(","):
        t = time.time()
        failures = invariance_failures(
            module, flavour, sizes, chars=args.chars, pool=max(sizes), log=lambda line: print(line, flush=True)
        )
        verdict = "all bitwise equal" if not failures else f"DIFFERS at B={failures}"
        lines.append(
            f"| {flavour} | {sizes[0]}..{sizes[-1]} ({len(sizes)} sizes) | {args.chars} | {verdict} | "
            f"{time.time() - t:.0f} s |"
        )
        print(lines[-1], flush=True)

    speed = []
    for model, build in MODELS.items():
        pair = {plain: traced(build, plain) for plain in (True, False)}
        for flavour in args.flavours.split(","):
            for batch in (1, 64):
                times = {True: [], False: []}
                for _ in range(args.repeats + 1):  # interleaved; the first round compiles and warms
                    for plain, (module, signatures) in pair.items():
                        times[plain].append(call_seconds(module, signatures, flavour, batch, args.speed_chars))
                old, new = (statistics.median(times[plain][1:]) for plain in (True, False))
                speed.append(
                    f"| {model} | {flavour} | {batch} | {batch * args.speed_chars / old:,.0f} | "
                    f"{batch * args.speed_chars / new:,.0f} | {old / new:.2f}× |"
                )
                print(speed[-1], flush=True)

    across = []
    for machine, env in MACHINES.items():
        done = subprocess.run(
            [sys.executable, __file__, "--digest", str(args.chars)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        )
        digest = json.loads(done.stdout.strip().splitlines()[-1])
        across.append(f"| {machine} | {digest['plain']} | {digest['xla']} |")
        print(across[-1], flush=True)

    body = "\n".join(
        [
            "## Batch invariance (bundled 2×512 LSTM)",
            "",
            "`python bench/invariance.py`: 64 sessions (own primes of 1–12 characters, seeds, positions, call "
            "lengths) run alone, then for each batch size a random choice of them together at random rows; "
            "sampled ids, states after every call and the final `step` logits compared with `np.array_equal`.",
            "",
            "| signatures | batch sizes | characters per session | result | time |",
            "|---|---|---|---|---|",
            *lines,
            "",
            f"Speed of `generate` ({args.speed_chars} characters per row, median of {args.repeats}, interleaved in "
            "one process): plain `tf.matmul` against the batch-invariant `cells.matmul`, same weights; the ratio "
            "is invariant speed / plain speed.",
            "",
            "| model | signatures | batch | plain matmul chars/s | invariant chars/s | ratio |",
            "|---|---|---|---|---|---|",
            *speed,
            "",
            "Across machines, emulated on this one: a digest of 8 seeded sessions' sampled ids and states "
            f"({args.chars} characters each, one batch) under other kernels, instruction sets and thread counts; "
            "equal digests are the same bits.",
            "",
            "| machine | plain signatures | XLA twins |",
            "|---|---|---|",
            *across,
            "",
            f"Total {time.time() - start:.0f} s.",
        ]
    )
    print(body)
    if not args.no_write:
        update_section("invariance", body)


if __name__ == "__main__":
    main()
