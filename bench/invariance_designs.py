"""Ways to make a matrix product batch-invariant: which hold on which kernels, and what each costs.

Each design computes ``x @ w`` for ``x`` [M, K]; a design holds when every row of every
product of M = 1..64 rows is bitwise the row computed alone. Each design is checked in
a subprocess per emulated machine (oneDNN on or off, the instruction set capped to AVX2,
AVX or SSE4.1 for oneDNN and XLA, one or two intra-op threads), in graph mode and under
XLA, on three shapes a model reaches ([*, 512] x [512, 2048], [*, 64] x [64, 2048],
[*, 512] x [512, 66]). Then, in one process, each design's time per product at 1 and 64
rows, [*, 512] x [512, 2048], inside a 64-step loop as generation runs it (median of 7),
as a ratio to a plain ``tf.matmul``; and this CPU's peak ``tf.matmul`` rate.

    python bench/invariance_designs.py [--no_write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

MACHINES = {
    "default": {},
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
    "AVX": {"ONEDNN_MAX_CPU_ISA": "AVX", "XLA_FLAGS": "--xla_cpu_max_isa=AVX"},
    "SSE4.1": {"ONEDNN_MAX_CPU_ISA": "SSE41", "XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"},
    "1 thread, oneDNN off": {"TF_NUM_INTRAOP_THREADS": "1", "TF_ENABLE_ONEDNN_OPTS": "0"},
    "1 thread, AVX2": {
        "TF_NUM_INTRAOP_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    },
}
SHAPES = [(512, 2048), (64, 2048), (512, 66)]
COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 23, 24, 25, 31, 32, 33, 47, 48, 49, 63, 64]

DESIGNS = {
    "plain": "one `tf.matmul` (not invariant: the reference)",
    "pad4": "one `tf.matmul`, rows padded to a multiple of 4 (the graph-mode design before)",
    "rows": "one row per product: `BatchMatMulV2` of [M, 1, K] by `w` (the graph-mode design now)",
    "row_loop": "one row per product, a loop over rows (the XLA design now)",
    "tiles4": "fixed tiles of 4 rows, a loop over tiles",
    "tiles8": "fixed tiles of 8 rows, a loop over tiles",
    "tiles32": "fixed tiles of 32 rows, a loop over tiles (the XLA design before, above 32 rows)",
    "batched_tiles4": "fixed tiles of 4 rows as one `BatchMatMulV2` [M/4, 4, K] by `w`",
}


def design(name: str):
    """The function ``(x, w) -> x @ w`` of a design."""
    import tensorflow as tf

    def tiles(rows: int, batched: bool = False):
        def product(x, w):
            k, n = w.shape
            m = tf.shape(x)[0]
            count = tf.maximum((m + rows - 1) // rows, 1)
            blocks = tf.reshape(tf.pad(x, [[0, count * rows - m], [0, 0]]), [count, rows, k])
            if batched:
                y = tf.linalg.matmul(blocks, w)
            else:
                y = tf.map_fn(lambda block: tf.matmul(block, w), blocks, parallel_iterations=1)
            return tf.reshape(y, [-1, n])[:m]

        return product

    def pad4(x, w):
        m = tf.shape(x)[0]
        return tf.matmul(tf.pad(x, [[0, (m + 3) // 4 * 4 - m], [0, 0]]), w)[:m]

    return {
        "plain": tf.matmul,
        "pad4": pad4,
        "rows": lambda x, w: tf.linalg.matmul(x[:, None, :], w)[:, 0, :],
        "row_loop": tiles(1),
        "tiles4": tiles(4),
        "tiles8": tiles(8),
        "tiles32": tiles(32),
        "batched_tiles4": tiles(4, batched=True),
    }[name]


def check(names: list[str]) -> dict:
    """In this process (its machine set by the environment): per design and mode, the failing (K, N, M)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(3)
    result = {}
    for name in names:
        product = design(name)
        for mode in ("graph", "xla"):
            bad = []
            for k, n in SHAPES:
                w = tf.constant(rng.normal(0, 0.05, (k, n)).astype(np.float32))
                fn = tf.function(
                    lambda x, w=w, product=product: product(x, w),
                    jit_compile=mode == "xla",
                    input_signature=[tf.TensorSpec([None, k])],
                )
                pool = rng.uniform(-1, 1, (64, k)).astype(np.float32)
                alone = np.concatenate([fn(pool[r : r + 1]).numpy() for r in range(64)])
                for count in COUNTS:
                    rows = rng.integers(0, 64, count)
                    if not np.array_equal(fn(pool[rows]).numpy(), alone[rows]):
                        bad.append([k, n, count])
            result[f"{name}/{mode}"] = bad
    return result


def speed(names: list[str]) -> dict:
    """Per design and mode: median ms per product at 1 and 64 rows, in a 64-step loop; and the matmul peak."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    w = tf.constant(rng.normal(0, 0.05, (512, 2048)).astype(np.float32))
    out = {}
    for mode in ("graph", "xla"):
        for name in names:
            product = design(name)

            @tf.function(jit_compile=mode == "xla")
            def steps(x, product=product):
                for _ in tf.range(64):
                    x = tf.tanh(product(x, w)[:, :512])
                return x

            for rows in (1, 64):
                x = tf.constant(rng.uniform(-1, 1, (rows, 512)).astype(np.float32))
                steps(x)
                times = []
                for _ in range(7):
                    start = time.perf_counter()
                    steps(x).numpy()
                    times.append((time.perf_counter() - start) / 64)
                out[f"{name}/{mode}/{rows}"] = float(np.median(times)) * 1e3
    a = tf.constant(rng.normal(size=(2048, 2048)).astype(np.float32))
    peak = tf.function(lambda: tf.matmul(a, a))
    peak()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        peak().numpy()
        times.append(time.perf_counter() - start)
    out["peak_gflops"] = 2 * 2048**3 / float(np.median(times)) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no_write", action="store_true", help="print the report only (no BENCHMARKS.md)")
    parser.add_argument("--child", choices=["check", "speed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = list(DESIGNS)
    if args.child:
        print(json.dumps(check(names) if args.child == "check" else speed(names)))
        return

    def child(kind: str, env: dict) -> dict:
        done = subprocess.run(
            [sys.executable, __file__, "--child", kind],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    held = {}
    for machine, env in MACHINES.items():
        held[machine] = child("check", env)
        print(machine, {k: len(v) for k, v in held[machine].items()}, flush=True)
    times = child("speed", {})
    rows = []
    for name in DESIGNS:
        for mode in ("graph", "xla"):
            verdict = [m for m in MACHINES if held[m][f"{name}/{mode}"]]
            ratio = [times[f"{name}/{mode}/{r}"] / times[f"plain/{mode}/{r}"] for r in (1, 64)]
            rows.append(
                f"| {name} | {mode} | {'holds on all' if not verdict else 'differs: ' + ', '.join(verdict)} "
                f"| {times[f'{name}/{mode}/1']:.3f} ({ratio[0]:.2f}×) "
                f"| {times[f'{name}/{mode}/64']:.3f} ({ratio[1]:.2f}×) |"
            )
    body = "\n".join(
        [
            "## Batch-invariant products: the designs measured",
            "",
            "`python bench/invariance_designs.py`: each design of `x @ w` checked row by row against the row alone "
            f"for M in {COUNTS[0]}..{COUNTS[-1]} rows on three shapes, in a subprocess per emulated machine "
            f"({', '.join(MACHINES)}); then its time per [M, 512] x [512, 2048] product inside a 64-step loop "
            "(median of 7, ms, and the ratio to plain `tf.matmul` in the same mode).",
            "",
            *[f"- **{name}**: {what}" for name, what in DESIGNS.items()],
            "",
            "| design | mode | bitwise per row, M = 1..64 | 1 row ms (× plain) | 64 rows ms (× plain) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"This CPU's peak `tf.matmul` rate in the same run: {times['peak_gflops']:.0f} GFLOP/s (2048², float32).",
        ]
    )
    print(body)
    if not args.no_write:
        update_section("invariance_designs", body)


if __name__ == "__main__":
    main()
