"""Serving speed: gRPC vs in-process latency, and aggregate throughput with batching on and off.

For a 2x128 and a 2x512 LSTM (random weights; speed does not depend on them),
in one run: p50/p99 latency and characters/second of sessions making 1- and
64-character calls in-process and through ``charrnn serve`` over loopback gRPC;
then aggregate characters/second of 1, 8 and 64 concurrent sessions (64
characters per call) with batching off and on. Issue 12's figures come from the
same run: the per-call overhead (gRPC p50 minus in-process p50, 1-character
calls), the 64-character ratio, the 64-session throughput against this CPU's
FLOP limit (a large ``tf.matmul``'s rate times characters per FLOP of the
model), single-stream in-process generation against the batch-1 matrix-vector
limit, and the resident memory of the 2x512 replica after the batched load.

Two references put the figures in proportion: Python gRPC's own round trip
(an echo server answering the same response bytes, no model), and the model
alone at 64 rows (one in-process call of the batch the server would run).

    python bench/serving.py [--calls 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import ServerProcess  # noqa: E402  (the tests' model-server process)

from keras_charrnn.serving import wire  # noqa: E402  (TF Serving's messages; imports no TensorFlow)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def latencies(call, calls: int) -> list[float]:
    """Seconds each of ``calls`` calls of ``call()`` took, after one to warm up."""
    call()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def session_latencies(session, chars: int, calls: int) -> list[float]:
    return latencies(lambda: session.generate(chars), calls)


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


def echo_server(response_path: str) -> None:
    """Serves Predict over loopback with a thread-pool gRPC server, as ``charrnn serve`` does, answering
    every call with the bytes in ``response_path`` at once; prints the port and runs until killed."""
    from concurrent import futures

    import grpc

    payload = Path(response_path).read_bytes()
    service, method = wire.PREDICT.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(  # no (de)serializers: bytes in, bytes out
        service, {method: grpc.unary_unary_rpc_method_handler(lambda request, context: payload)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def predict_stub(channel):
    """Predict on ``channel`` with TF Serving's messages, as ``SamplingClient`` calls it."""
    return channel.unary_unary(
        wire.PREDICT,
        request_serializer=wire.PredictRequest.SerializeToString,
        response_deserializer=wire.PredictResponse.FromString,
    )


def raw_predict_latencies(target: str, request, calls: int) -> list[float]:
    """Latencies of one prepared PredictRequest sent ``calls`` times on a plain channel (no session code)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        stub = predict_stub(channel)
        return latencies(lambda: stub(request, timeout=60), calls)


def one_char_request(model: str, units: int, state_names, rows: int = 1):
    """The PredictRequest of a session's 1-character ``generate_text_xla`` call from the zero state
    (``rows`` such rows), and the same inputs as NumPy arrays."""
    import numpy as np

    inputs = {
        "prime": np.array([b"a"] * rows, dtype=object),
        **{n: np.zeros([rows, units], np.float32) for n in state_names},
        "num_chars": np.full([rows], 1, np.int32),
        "temperature": np.full([rows], 0.8, np.float32),
        "top_k": np.zeros([rows], np.int32),
        "top_p": np.ones([rows], np.float32),
        "seed": np.arange(rows, dtype=np.int64),
        "position": np.zeros([rows], np.int64),
    }
    request = wire.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, "generate_text_xla"
    for key, value in inputs.items():
        wire.to_tensor_proto(value, request.inputs[key])
    return request, inputs


def echo_floor(target: str, request, calls: int, tmp: str) -> float:
    """p50 seconds of ``request`` sent to an echo server (this script, ``--echo-server``) that answers
    what ``target`` answers to it: Python gRPC's round trip with the model and the checks taken out."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        response = predict_stub(channel)(request, timeout=60)
    path = Path(tmp) / "echo_response.bin"
    path.write_bytes(response.SerializeToString())
    echo = subprocess.Popen([sys.executable, __file__, "--echo-server", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(echo.stdout.readline())
        return percentile(raw_predict_latencies(f"127.0.0.1:{port}", request, calls), 50)
    finally:
        echo.kill()
        echo.wait()


def model_alone(local, units: int, rows: int, chars: int = 64, repeats: int = 5) -> float:
    """Characters/second of the model alone: ``rows`` rows of ``chars`` characters in one in-process call."""
    import tensorflow as tf

    _, inputs = one_char_request("", units, local.info.state_names, rows)
    inputs["num_chars"][:] = chars
    fn = local.signatures["generate_text_xla"]
    tensors = {k: tf.constant(list(v), tf.string) if v.dtype == object else tf.constant(v) for k, v in inputs.items()}
    fn(**tensors)["text"].numpy()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(**tensors)["text"].numpy()
        times.append(time.perf_counter() - t)
    return rows * chars / percentile(times, 50)


def rss_mb(pid: int) -> tuple[int, int]:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return tuple(int(status.split(f"{key}:")[1].split()[0]) // 1024 for key in ("VmRSS", "VmHWM"))


def matmul_rate(rows: int, inner: int, cols: int, repeats: int) -> float:
    """Single-precision FLOP/s of ``tf.matmul`` [rows, inner] x [inner, cols], best of 5 timed loops.

    The loop runs inside one ``tf.function`` so the rate is the kernel's, not Python's dispatch.
    """
    import tensorflow as tf

    a = tf.random.normal([rows, inner])
    b = tf.random.normal([inner, cols])

    @tf.function
    def loop(a, b):
        acc = tf.zeros([rows, cols])
        for _ in tf.range(repeats):
            acc += tf.matmul(a, b)
        return acc

    loop(a, b).numpy()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        loop(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2.0 * rows * inner * cols * repeats / best


def flops_per_char(model) -> int:
    """Multiply-adds x 2 of one generated character: every 2-D weight but the embedding table."""
    return 2 * sum(
        int(w.shape[0]) * int(w.shape[1]) for w in model.weights if len(w.shape) == 2 and "embedding" not in w.path
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per latency measurement")
    parser.add_argument("--print-only", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    parser.add_argument("--echo-server", metavar="RESPONSE_FILE", help=argparse.SUPPRESS)  # the floor's server
    args = parser.parse_args()
    if args.echo_server:
        return echo_server(args.echo_server)

    from keras_charrnn.export import save_savedmodel
    from keras_charrnn.model import build_model
    from keras_charrnn.inprocess import load
    from keras_charrnn.serving.client import SamplingClient
    from keras_charrnn.vocab import Vocabulary

    vocab = Vocabulary([chr(c) for c in range(32, 97)])
    latency_rows = [
        "| model | chars/call | in-process p50 / p99 (ms) | gRPC p50 / p99 (ms) | in-process chars/s | "
        "gRPC chars/s | gRPC / in-process |",
        "|---|---|---|---|---|---|---|",
    ]
    batch_rows = [
        "| model | sessions | batching off (chars/s) | batching on (chars/s) | on: x one session |",
        "|---|---|---|---|---|",
    ]
    fig: dict[int, dict] = {}  # units -> issue 12's figures
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "batching.txt"
        params.write_text(
            "max_batch_size { value: 64 }\nbatch_timeout_micros { value: 2000 }\n"
            "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 16 }\n"
        )
        for units in (128, 512):
            name = f"lstm{units}"
            model = build_model(vocab.size, cell="lstm", units=units, batch_size=1, seq_len=1)
            save_savedmodel(model, vocab, f"{tmp}/{name}/1")
            local = load(f"{tmp}/{name}")
            fig[units] = {"flops_per_char": flops_per_char(model)}
            for flags, label in (([], "off"), (["--enable_batching", "--batching_parameters_file", str(params)], "on")):
                with ServerProcess(["--model_name", name, "--model_base_path", f"{tmp}/{name}", *flags]) as server:
                    client = SamplingClient(f"127.0.0.1:{server.port}", timeout=120)
                    if label == "off":
                        for chars in (1, 64):
                            calls = args.calls if chars == 1 else max(20, args.calls // 4)
                            mine = session_latencies(local.session("a", seed=1), chars, calls)
                            grpc_ = session_latencies(client.session(name, prime="a", seed=1), chars, calls)
                            cps = lambda lat, chars=chars: chars * len(lat) / sum(lat)  # noqa: E731
                            fig[units][chars] = (percentile(mine, 50), percentile(grpc_, 50), cps(mine), cps(grpc_))
                            latency_rows.append(
                                f"| LSTM 2x{units} | {chars} | {percentile(mine, 50) * 1e3:.2f} / "
                                f"{percentile(mine, 99) * 1e3:.2f} | {percentile(grpc_, 50) * 1e3:.2f} / "
                                f"{percentile(grpc_, 99) * 1e3:.2f} | {cps(mine):,.0f} | {cps(grpc_):,.0f} | "
                                f"{cps(grpc_) / cps(mine):.2f}x |"
                            )
                            print(latency_rows[-1], flush=True)
                        request, _ = one_char_request(name, units, local.info.state_names)
                        target = f"127.0.0.1:{server.port}"
                        fig[units]["raw"] = percentile(raw_predict_latencies(target, request, args.calls), 50)
                        fig[units]["echo"] = echo_floor(target, request, args.calls, tmp)
                        fig[units]["alone64"] = model_alone(local, units, 64)
                    for sessions in (1, 8, 64):
                        # With batching, enough calls per session for the batches to settle after the start;
                        # without, 64 sessions pass the server's concurrency cap and are retried: fewer.
                        calls = 8 if sessions < 64 or label == "on" else 4
                        speed = aggregate(client, name, sessions, calls)
                        if label == "on":
                            fig[units][f"on{sessions}"] = speed
                        if label == "off":
                            batch_rows.append([f"LSTM 2x{units}", sessions, speed])
                        else:
                            row = next(
                                r
                                for r in batch_rows
                                if isinstance(r, list) and r[0] == f"LSTM 2x{units}" and r[1] == sessions
                            )
                            row.append(speed)
                        print(name, label, sessions, f"{speed:,.0f}", flush=True)
                    if label == "on":
                        fig[units]["rss"] = rss_mb(server.proc.pid)
                    client.close()
    matmul = matmul_rate(2048, 2048, 2048, 8)  # the CPU's single-precision peak, near enough
    matvec = {u: matmul_rate(1, 2 * u, 4 * u, 200) for u in fig}  # batch 1, the shape of an LSTM layer's matmul
    issue_rows = ["| figure | 2x128 | 2x512 | goal |", "|---|---|---|---|"]

    def figure(label, fmt, goal):
        issue_rows.append(f"| {label} | {fmt(fig[128], 128)} | {fmt(fig[512], 512)} | {goal} |")

    figure("1-char p50, in-process / gRPC (ms)", lambda f, u: f"{f[1][0] * 1e3:.2f} / {f[1][1] * 1e3:.2f}", "")
    figure(
        "per-call overhead: gRPC p50 - in-process p50 (ms)", lambda f, u: f"{(f[1][1] - f[1][0]) * 1e3:.2f}", "<= 0.3"
    )
    figure(
        "of it: Python gRPC's round trip, an echo server answering the same bytes (p50 ms)",
        lambda f, u: f"{f['echo'] * 1e3:.2f}",
        "",
    )
    figure(
        "of it: the client's session code (session p50 - the same request sent raw, ms)",
        lambda f, u: f"{(f[1][1] - f['raw']) * 1e3:.2f}",
        "",
    )
    figure("64-char calls, gRPC / in-process chars/s", lambda f, u: f"{f[64][3] / f[64][2]:.2f}x", ">= 0.95x")
    figure("FLOP per character (MFLOP)", lambda f, u: f"{f['flops_per_char'] / 1e6:.2f}", "")
    figure("FLOP limit: matmul rate x chars/FLOP (chars/s)", lambda f, u: f"{matmul / f['flops_per_char']:,.0f}", "")
    figure(
        "64 sessions with batching (chars/s, % of limit)",
        lambda f, u: f"{f['on64']:,.0f} ({100 * f['on64'] * f['flops_per_char'] / matmul:.0f}%)",
        ">= 60% (2x512)",
    )
    figure(
        "the model alone: 64 rows in one in-process call (chars/s, % of limit)",
        lambda f, u: f"{f['alone64']:,.0f} ({100 * f['alone64'] * f['flops_per_char'] / matmul:.0f}%)",
        "",
    )
    figure("one session with batching / in-process (64-char calls)", lambda f, u: f"{f['on1'] / f[64][2]:.2f}x", "")
    figure(
        "single-stream in-process (chars/s, % of batch-1 matvec limit)",
        lambda f, u: f"{f[64][2]:,.0f} ({100 * f[64][2] * f['flops_per_char'] / matvec[u]:.0f}%)",
        ">= 75% (2x512)",
    )
    figure(
        "replica RSS after the batched load, now / peak (MB)",
        lambda f, u: f"{f['rss'][0]} / {f['rss'][1]}",
        "<= 700 (2x512)",
    )
    table = batch_rows[:2]
    for row in batch_rows[2:]:
        one = next(r for r in batch_rows[2:] if r[0] == row[0] and r[1] == 1)[3]
        table.append(f"| {row[0]} | {row[1]} | {row[2]:,.0f} | {row[3]:,.0f} | {row[3] / one:.1f}x |")
    body = (
        "## Serving\n\n"
        f"Issue 12's figures (one run; matmul peak {matmul / 1e9:.1f} GFLOP/s, batch-1 matvec "
        + ", ".join(f"2x{u}: {matvec[u] / 1e9:.1f}" for u in sorted(matvec))
        + " GFLOP/s). The machine is shared "
        "and was not idle, so single numbers are noisy; compare figures within this run.\n\n"
        + "\n".join(issue_rows)
        + "\n\n"
        "Sessions through `charrnn serve` over loopback gRPC (the `generate_text` signature, state carried by the "
        "client) next to the same sessions in-process; latency percentiles over "
        f"{args.calls} calls (1 char) and {max(20, args.calls // 4)} calls (64 chars).\n\n"
        + "\n".join(latency_rows)
        + "\n\nAggregate throughput of concurrent sessions, 64 characters per call "
        "(batching: max_batch_size 64, batch_timeout_micros 2000, 2 batch threads):\n\n"
        + "\n".join(table)
        + "\n\nGoals: 64-character calls >= 0.9x in-process; 64 sessions on 2x512 with batching >= 15x one session."
    )
    if args.print_only:
        print(body)
    else:
        update_section("serving", body)


if __name__ == "__main__":
    main()
