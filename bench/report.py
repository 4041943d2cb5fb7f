"""Writes a benchmark's results into its own section of BENCHMARKS.md (between markers)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def median_of(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def update_section(name: str, body: str) -> None:
    """Replaces the section ``name`` of BENCHMARKS.md with ``body`` (adding it if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = f"_Measured {time.strftime('%Y-%m-%d')} on {machine()}._\n\n"
    block = f"{start}\n{stamp}{body.rstrip()}\n{end}"
    text = PATH.read_text() if PATH.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    PATH.write_text(text)
    print(f"updated section {name!r} of {PATH}")
