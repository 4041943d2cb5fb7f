"""How long a replica takes to start serving the bundled model, with and without XLA's persistent cache.

A replica compiles its models' XLA loops while it replays the warm-up records, the
larger part of a start-up. TensorFlow can keep the executables in a folder
(``TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=DIR``); a replica restarted on
the same machine loads them instead (``signature_loader`` gives a graph's functions
the same names in every process, which is what the cache is keyed by). Interleaved:
a start without the cache, a start with it (the first fills it; the medians leave it
out), ``--repeats`` times; each measured from ``charrnn serve`` started to the
version AVAILABLE and the port open, in wall time and the process's CPU time.

    python bench/restart.py [--repeats 5] [--no_write]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import ServerProcess  # noqa: E402

CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def start_once(cache: str | None) -> tuple[float, float]:
    """Starts ``charrnn serve`` on the bundled model, waits until it serves, stops it; returns (wall s, CPU s)."""
    flags = [f for f in os.environ.get("TF_XLA_FLAGS", "").split() if not f.startswith(CACHE_FLAG)]
    os.environ["TF_XLA_FLAGS"] = " ".join(flags + ([f"{CACHE_FLAG}={cache}"] if cache else []))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    server = ServerProcess(["--model_name", "shakespeare", "--model_base_path", ROOT / "saved_models" / "shakespeare"])
    ready = time.perf_counter() - started
    server.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ready, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args()
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="charrnn-xla-cache-") as cache:
        filling = start_once(cache)
        for _ in range(args.repeats):
            cold.append(start_once(None))
            warm.append(start_once(cache))
            print(
                f"without cache {cold[-1][0]:.1f} s ({cold[-1][1]:.1f} CPU-s), with {warm[-1][0]:.1f} s "
                f"({warm[-1][1]:.1f} CPU-s)",
                flush=True,
            )
        size = sum(f.stat().st_size for f in Path(cache).iterdir()) / 2**20

    def row(name: str, runs) -> str:
        wall, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
        return f"| {name} | {wall:.1f} s | {cpu:.1f} s |"

    body = "\n".join(
        [
            "`charrnn serve` on the bundled model (LSTM 2x512, its 8 warm-up records, XLA twins compiled at load),",
            f"from the command to the port open and the version AVAILABLE; medians of {args.repeats} interleaved",
            "starts (`bench/restart.py`).",
            "",
            "| start | wall | CPU |",
            "|---|---|---|",
            row("without a persistent XLA cache", cold),
            row("with `--tf_xla_persistent_cache_directory` (filled by an earlier start)", warm),
            "",
            f"The start that filled the cache: {filling[0]:.1f} s ({filling[1]:.1f} CPU-s); the cache holds "
            f'{size:.1f} MB. README, "Serve", says how to use it.',
        ]
    )
    print(body)
    if not args.no_write:
        update_section("restart", "## Server start-up: XLA's persistent compilation cache\n\n" + body)


if __name__ == "__main__":
    main()
