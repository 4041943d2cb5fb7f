"""Import cost of the gRPC client vs tensorflow-serving-api's messages (fresh process each, median of 5).

python bench/client_import.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from report import update_section

PROBE = (
    "import resource, sys, time; t = time.perf_counter(); import {mod}; "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
    "'tensorflow' in sys.modules)"
)
MODULES = {
    "keras_charrnn.serving.client": "keras-charrnn gRPC client",
    "tensorflow_serving.apis.predict_pb2": "tensorflow-serving-api messages",
}


def measure(module: str, repeats: int = 5) -> tuple[float, float, bool]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(mod=module)], capture_output=True, text=True, check=True
        ).stdout.split()
        runs.append((float(out[0]), float(out[1]), out[2] == "True"))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2]


def main() -> None:
    rows = ["| import | time (s, median of 5) | peak RSS (MB) | imports TensorFlow |", "|---|---|---|---|"]
    results = {}
    for module, label in MODULES.items():
        seconds, mb, tf_loaded = measure(module)
        results[module] = seconds
        rows.append(f"| `{module}` ({label}) | {seconds:.3f} | {mb:.0f} | {'yes' if tf_loaded else 'no'} |")
        print(rows[-1])
    light, heavy = results.values()
    rows.append("")
    rows.append(f"The client imports {heavy / light:.1f}x faster. Goal: under 0.3 s and 100 MB, without TensorFlow.")
    update_section("client_import", "## Client import\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
