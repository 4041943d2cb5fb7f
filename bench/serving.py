"""Serving speed: gRPC vs in-process latency, and aggregate throughput with batching on and off.

For a 2x128 and a 2x512 LSTM (random weights; speed does not depend on them),
in one run: p50/p99 latency and characters/second of sessions making 1- and
64-character calls in-process and through ``charrnn serve`` over loopback gRPC;
then aggregate characters/second of 1, 8 and 64 concurrent sessions (64
characters per call) with batching off and on.

    python bench/serving.py [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import ServerProcess  # noqa: E402  (the tests' model-server process)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def session_latencies(session, chars: int, calls: int) -> list[float]:
    session.generate(chars)  # warm
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        session.generate(chars)
        out.append(time.perf_counter() - t)
    return out


def aggregate(client, model: str, sessions: int, calls: int, chars: int = 64) -> float:
    def run(seed):
        s = client.session(model, prime="a", seed=seed)
        for _ in range(calls):
            s.generate(chars)

    run(0)
    t = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(run, range(sessions)))
    return sessions * calls * chars / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per latency measurement")
    args = parser.parse_args()

    from keras_charrnn.export import save_savedmodel
    from keras_charrnn.model import build_model
    from keras_charrnn.inprocess import load
    from keras_charrnn.serving.client import SamplingClient
    from keras_charrnn.vocab import Vocabulary

    vocab = Vocabulary([chr(c) for c in range(32, 97)])
    latency_rows = ["| model | chars/call | in-process p50 / p99 (ms) | gRPC p50 / p99 (ms) | in-process chars/s | "
                    "gRPC chars/s | gRPC / in-process |", "|---|---|---|---|---|---|---|"]
    batch_rows = ["| model | sessions | batching off (chars/s) | batching on (chars/s) | on: x one session |",
                  "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "batching.txt"
        params.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 2000 }\n"
                          "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 16 }\n")
        for units in (128, 512):
            name = f"lstm{units}"
            model = build_model(vocab.size, cell="lstm", units=units, batch_size=1, seq_len=1)
            save_savedmodel(model, vocab, f"{tmp}/{name}/1")
            local = load(f"{tmp}/{name}")
            for flags, label in (([], "off"), (["--enable_batching", "--batching_parameters_file", str(params)], "on")):
                with ServerProcess(["--model_name", name, "--model_base_path", f"{tmp}/{name}", *flags]) as server:
                    client = SamplingClient(f"127.0.0.1:{server.port}", timeout=120)
                    if label == "off":
                        for chars in (1, 64):
                            calls = args.calls if chars == 1 else max(20, args.calls // 4)
                            mine = session_latencies(local.session("a", seed=1), chars, calls)
                            grpc_ = session_latencies(client.session(name, prime="a", seed=1), chars, calls)
                            cps = lambda lat: chars * len(lat) / sum(lat)  # noqa: E731
                            latency_rows.append(
                                f"| LSTM 2x{units} | {chars} | {percentile(mine, 50) * 1e3:.2f} / "
                                f"{percentile(mine, 99) * 1e3:.2f} | {percentile(grpc_, 50) * 1e3:.2f} / "
                                f"{percentile(grpc_, 99) * 1e3:.2f} | {cps(mine):,.0f} | {cps(grpc_):,.0f} | "
                                f"{cps(grpc_) / cps(mine):.2f}x |")
                            print(latency_rows[-1], flush=True)
                    for sessions in (1, 8, 64):
                        calls = 8 if sessions < 64 else 4
                        speed = aggregate(client, name, sessions, calls)
                        if label == "off":
                            batch_rows.append([f"LSTM 2x{units}", sessions, speed])
                        else:
                            row = next(r for r in batch_rows if isinstance(r, list) and r[0] == f"LSTM 2x{units}"
                                       and r[1] == sessions)
                            row.append(speed)
                        print(name, label, sessions, f"{speed:,.0f}", flush=True)
                    client.close()
    table = batch_rows[:2]
    for row in batch_rows[2:]:
        one = next(r for r in batch_rows[2:] if r[0] == row[0] and r[1] == 1)[3]
        table.append(f"| {row[0]} | {row[1]} | {row[2]:,.0f} | {row[3]:,.0f} | {row[3] / one:.1f}x |")
    body = ("## Serving\n\n"
            "Sessions through `charrnn serve` over loopback gRPC (the `generate_text` signature, state carried by the "
            "client) next to the same sessions in-process; latency percentiles over "
            f"{args.calls} calls (1 char) and {max(20, args.calls // 4)} calls (64 chars).\n\n" + "\n".join(latency_rows) +
            "\n\nAggregate throughput of concurrent sessions, 64 characters per call "
            "(batching: max_batch_size 64, batch_timeout_micros 2000, 2 batch threads):\n\n" + "\n".join(table) +
            "\n\nGoals: 64-character calls >= 0.9x in-process; 64 sessions on 2x512 with batching >= 15x one session.")
    update_section("serving", body)


if __name__ == "__main__":
    main()
