"""What the generation controls cost in process: stops, scores and the new signature against release 0.2's.

One process, the same weights, calls interleaved round-robin (so load on the
machine falls on every variant alike), medians of the repeats. For the bundled
2x512 LSTM and a 2x128 LSTM, plain graph and XLA twin, one row, one call of
``--chars`` characters from a one-character prime:

* ``0.2``: the ``generate_text`` signature (release 0.2's inputs);
* ``v2 plain``: ``generate_text_v2`` at its defaults (no stops, no bias, no scores);
* ``v2 stops``: four stop strings that never match (every step compares them all);
* ``v2 scores``: ``logprobs=0`` (each character's log-probability);
* ``v2 top-10``: ``logprobs=10`` (and ten alternatives per character).

Ratios are characters/second against ``v2 plain`` (the goal: stops within 5%).
This CPU's peak ``tf.matmul`` rate is measured in the same run.

    python bench/generation_controls.py [--chars 1000] [--repeats 9] [--no_write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402
from train_throughput import peak_matmul  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_batch_invariance import bundled_module, random_module  # noqa: E402

import tensorflow as tf  # noqa: E402

from keras_charrnn.generation import inputs_of  # noqa: E402

MODELS = {"2x512": bundled_module, "2x128": lambda: random_module("lstm", units=128)}
NEVER = ("\n\n\n\n", "zzzz", "qqqq", ";;;;")  # stops no sample here contains: matched against at every step
VARIANTS = {
    "0.2": ("generate_text", {}),
    "v2 plain": ("generate_text_v2", {}),
    "v2 stops": ("generate_text_v2", {"stop": NEVER}),
    "v2 scores": ("generate_text_v2", {"logprobs": 0}),
    "v2 top-10": ("generate_text_v2", {"logprobs": 10}),
}


def inputs(module, signature: str, chars: int, values: dict) -> dict:
    """One row of ``signature``'s inputs: a one-character prime, zero states, the table's defaults and ``values``."""
    ctx = {
        "vocab_size": module.vocab_size,
        "max_chars_per_call": chars,
        "max_stops": 4,
        "max_stop_chars": 32,
        "max_logprobs": 10,
    }
    row = {"prime": tf.constant(["\n"]), **{n: tf.zeros([1, module.units]) for n in module.state_names}}
    defaults = {"num_chars": chars, "seed": 1, "temperature": 1.0}
    for spec in inputs_of(signature):
        row[spec.name] = tf.constant(spec.column(1, ctx, values.get(spec.name, defaults.get(spec.name))))
    return row


def measure(name: str, chars: int, repeats: int) -> dict:
    module = MODELS[name]()
    signatures = module.named_signatures()
    seconds: dict = {}
    for flavour in ("", "_xla"):
        calls = {}
        for variant, (signature, values) in VARIANTS.items():
            fn, row = signatures[signature + flavour], inputs(module, signature, chars, values)
            fn(**row)  # compile and warm
            calls[variant] = (fn, row)
        times: dict[str, list[float]] = {v: [] for v in calls}
        for _ in range(repeats):
            for variant, (fn, row) in calls.items():
                start = time.perf_counter()
                fn(**row)["text"].numpy()
                times[variant].append(time.perf_counter() - start)
        seconds["XLA" if flavour else "plain"] = {v: statistics.median(t) for v, t in times.items()}
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args()
    peak = peak_matmul()
    rows = []
    for name in MODELS:
        for flavour, seconds in measure(name, args.chars, args.repeats).items():
            base = seconds["v2 plain"]
            cells = " | ".join(f"{args.chars / s:,.0f} ({base / s:.2f}x)" for s in seconds.values())
            rows.append(f"| {name} | {flavour} | {cells} |")
            print(rows[-1], flush=True)
    head = " | ".join(VARIANTS)
    body = (
        f"One row, one call of {args.chars} characters, median of {args.repeats} interleaved repeats; "
        f"characters/second and (in brackets) the ratio to `v2 plain` (above 1: faster). "
        f"This CPU's peak `tf.matmul` rate in the same run: {peak:.0f} GFLOP/s.\n\n"
        f"| model | flavour | {head} |\n|---|---|" + "---|" * len(VARIANTS) + "\n" + "\n".join(rows) + "\n\n"
        "`0.2`: release 0.2's `generate_text`; `v2 plain`: `generate_text_v2` at its defaults; `v2 stops`: four "
        "stop strings that never match; `v2 scores`: `logprobs=0`; `v2 top-10`: `logprobs=10`. "
        "Written by `bench/generation_controls.py`."
    )
    if not args.no_write:
        update_section(
            "generation_controls", "## Generation controls: what stops and scores cost (issue 24)\n\n" + body
        )


if __name__ == "__main__":
    main()
