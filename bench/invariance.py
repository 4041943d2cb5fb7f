"""Batch invariance, bit for bit, the long version; and what it costs in speed.

On the bundled 2x512 LSTM's weights (the model built from this checkout's code),
64 sessions are each run alone, then for every batch size 1..64 a random choice
of them runs together at random rows; sampled ids, every state after every call
and the final logits must be bitwise equal to the session alone (the check of
``tests/test_batch_invariance.py``, with thousands of characters per session),
for the default signatures and for the XLA twins. Then, in the same process, the
speed of ``generate`` at batch 1 and 64 with the invariant matmuls against plain
``tf.matmul`` (same weights), as characters/second and their ratio.

    python bench/invariance.py [--chars 2000] [--sizes 1-64] [--no_write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_batch_invariance import FLAVOURS, bundled_module, invariance_failures  # noqa: E402

import tensorflow as tf  # noqa: E402

from keras_charrnn import cells  # noqa: E402


def plain_matmul_module():
    """The bundled model traced with plain ``tf.matmul`` (the numerics before batch invariance)."""
    invariant = cells.matmul
    cells.matmul = lambda x, w: tf.matmul(x, w)
    try:
        module = bundled_module()
        signatures = module.named_signatures()  # traces now, with the plain matmul
    finally:
        cells.matmul = invariant
    return module, signatures


def chars_per_second(module, signatures, flavour: str, batch: int, chars: int, repeats: int) -> float:
    """Best-of-``repeats`` characters/second of one ``generate`` call of ``chars`` characters per row."""
    name = FLAVOURS[flavour][1]
    inputs = {"ids": tf.fill([batch, 1], 1), **{n: tf.zeros([batch, module.units]) for n in module.state_names},
              "num_chars": tf.fill([batch], chars), "temperature": tf.ones([batch]),
              "top_k": tf.zeros([batch], tf.int32), "top_p": tf.ones([batch]),
              "seed": tf.range(batch, dtype=tf.int64), "position": tf.zeros([batch], tf.int64)}
    signatures[name](**inputs)  # compile / warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        signatures[name](**inputs)["ids"].numpy()
        best = min(best, time.perf_counter() - start)
    return batch * chars / best


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
    parser.add_argument("--repeats", type=int, default=3, help="speed calls per figure (best is kept)")
    parser.add_argument("--no_write", action="store_true", help="print the report only (no BENCHMARKS.md)")
    args = parser.parse_args()
    sizes = parse_sizes(args.sizes)

    module = bundled_module()
    lines, start = [], time.time()
    for flavour in args.flavours.split(","):
        t = time.time()
        failures = invariance_failures(module, flavour, sizes, chars=args.chars, pool=max(sizes),
                                       log=lambda line: print(line, flush=True))
        verdict = "all bitwise equal" if not failures else f"DIFFERS at B={failures}"
        lines.append(f"| {flavour} | {sizes[0]}..{sizes[-1]} ({len(sizes)} sizes) | {args.chars} | {verdict} | "
                     f"{time.time() - t:.0f} s |")
        print(lines[-1], flush=True)

    plain_module, plain_signatures = plain_matmul_module()
    signatures = module.named_signatures()
    speed = []
    for flavour in args.flavours.split(","):
        for batch in (1, 64):
            new = chars_per_second(module, signatures, flavour, batch, args.speed_chars, args.repeats)
            old = chars_per_second(plain_module, plain_signatures, flavour, batch, args.speed_chars, args.repeats)
            speed.append(f"| {flavour} | {batch} | {old:,.0f} | {new:,.0f} | {new / old:.2f}× |")
            print(speed[-1], flush=True)

    body = "\n".join([
        "## Batch invariance (bundled 2×512 LSTM)", "",
        "`python bench/invariance.py`: 64 sessions (own primes of 1–12 characters, seeds, positions, call "
        "lengths) run alone, then for each batch size a random choice of them together at random rows; "
        "sampled ids, states after every call and the final `step` logits compared with `np.array_equal`.", "",
        "| signatures | batch sizes | characters per session | result | time |", "|---|---|---|---|---|", *lines, "",
        f"Speed of `generate` ({args.speed_chars} characters per row, best of {args.repeats}, same process): "
        "plain `tf.matmul` against the batch-invariant `cells.matmul`.", "",
        "| signatures | batch | plain matmul chars/s | invariant chars/s | ratio |", "|---|---|---|---|---|", *speed,
        "", f"Total {time.time() - start:.0f} s."])
    print(body)
    if not args.no_write:
        update_section("invariance", body)


if __name__ == "__main__":
    main()
