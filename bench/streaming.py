"""Streaming vs unary generation through ``charrnn serve``: time to the first characters and to the last.

For a 2x512 and a 2x128 LSTM (random weights; speed does not depend on them),
one server each (batching on, XLA twins), in one run and interleaved: a
2,000-character generation from a fresh session through

* the gRPC stream (``Session.stream``: segments of 32 characters first, doubling up to 256),
* Server-Sent Events (``POST :stream`` on the REST port, the same segments),
* the unary call (one Predict of 2,000 characters; the server runs it in 256-character segments),

each its median time to the first characters and to the last over ``--repeats``;
then 16 concurrent streams against 16 concurrent unary sessions (each 2,000
characters) in aggregate characters per second. Goals (issue 25): the first
characters within one segment's time; the last within 5% of unary.

    python bench/streaming.py [--chars 2000] [--repeats 7] [--no_write]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import ServerProcess, free_ports  # noqa: E402

SEGMENT = 32  # the first segment; the server doubles it up to 256
CONCURRENT = 16


def grpc_stream(client, model: str, chars: int, seed: int) -> tuple[float, float]:
    """Seconds to the first characters and to the last of a streamed session."""
    start = time.perf_counter()
    first = None
    for _ in client.session(model, "a", seed=seed).stream(chars, chunk=SEGMENT):
        first = first or time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


def unary(client, model: str, chars: int, seed: int) -> tuple[float, float]:
    start = time.perf_counter()
    client.session(model, "a", seed=seed).generate(chars)
    took = time.perf_counter() - start
    return took, took


def sse(rest_port: int, body: bytes, model: str) -> tuple[float, float]:
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=300)
    connection.request("POST", f"/v1/models/{model}:stream", body, {"Content-Type": "application/json"})
    reply = connection.getresponse()
    first = None
    while True:
        line = reply.fp.readline()
        if not line:
            break
        if line.startswith(b"event: segment") and first is None:
            first = time.perf_counter() - start
        if line.startswith((b"event: done", b"event: error")):
            break
    connection.close()
    return first or 0.0, time.perf_counter() - start


def sse_body(client, model: str, chars: int, seed: int) -> bytes:
    """The JSON body of a session's first call (columnar format)."""
    row = client.session(model, "a", seed=seed)._row(chars, -1)

    def jsonable(value):
        if value.dtype != object:
            return value.tolist()
        return [[x.decode() for x in v] if value.ndim == 2 else v.decode() for v in value]

    return json.dumps(
        {"signature_name": "generate_text_v2", "inputs": {k: jsonable(v) for k, v in row.items()}}
    ).encode()


def measure(name: str, base_path: str, units: int, chars: int, repeats: int) -> list[str]:
    """The table rows of one model: each way's first/last characters, then the concurrent aggregate."""
    from keras_charrnn.serving.client import SamplingClient

    rows = []
    (rest,) = free_ports(1)
    flags = ["--enable_batching", "--rest_api_port", rest, "--max_concurrent_streams", CONCURRENT]
    with ServerProcess(["--model_name", name, "--model_base_path", base_path, *flags]) as server:
        client = SamplingClient(f"127.0.0.1:{server.port}", timeout=300)
        body = sse_body(client, name, chars, 1)
        ways = {
            "gRPC stream": lambda: grpc_stream(client, name, chars, 1),
            "SSE": lambda: sse(rest, body, name),
            "unary": lambda: unary(client, name, chars, 1),
        }
        for way in ways.values():
            way()  # warm
        times: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        for _ in range(repeats):
            for way, run in ways.items():
                times[way].append(run())
        segment = min(t[0] for t in times["gRPC stream"])
        base = statistics.median(t[1] for t in times["unary"])
        for way, got in times.items():
            first, last = statistics.median(t[0] for t in got), statistics.median(t[1] for t in got)
            rows.append(f"| 2x{units} | {way} | {first * 1e3:.0f} | {last * 1e3:.0f} | {base / last:.2f}x |")
            print(rows[-1], flush=True)
        aggregate = {}
        with ThreadPoolExecutor(CONCURRENT) as pool:
            for way, run in (("streams", grpc_stream), ("unary sessions", unary)):
                start = time.perf_counter()
                list(pool.map(lambda seed, run=run: run(client, name, chars, seed), range(CONCURRENT)))
                aggregate[way] = CONCURRENT * chars / (time.perf_counter() - start)
        rows.append(
            f"| 2x{units} | {CONCURRENT} concurrent | streams {aggregate['streams']:,.0f} chars/s | "
            f"unary {aggregate['unary sessions']:,.0f} chars/s | "
            f"{aggregate['streams'] / aggregate['unary sessions']:.2f}x |"
        )
        print(rows[-1], f"(one segment's time: {segment * 1e3:.0f} ms)", flush=True)
        client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args()

    from keras_charrnn.export import save_savedmodel
    from keras_charrnn.model import build_model
    from keras_charrnn.vocab import Vocabulary

    vocab = Vocabulary([chr(c) for c in range(32, 97)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for units in (512, 128):
            name = f"lstm{units}"
            save_savedmodel(
                build_model(vocab.size, cell="lstm", units=units, batch_size=1, seq_len=1), vocab, f"{tmp}/{name}/1"
            )
            rows += measure(name, f"{tmp}/{name}", units, args.chars, args.repeats)
    body_md = (
        f"A {args.chars}-character generation from a fresh session, median of {args.repeats} interleaved repeats; "
        f"streams in segments of {SEGMENT} characters first, doubling up to 256; batching on, XLA twins. "
        f"Last column: unary's time to the last "
        f"character / this way's (1.00x: as fast as unary).\n\n"
        "| model | way | first characters (ms) | last (ms) | vs unary |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nWritten by `bench/streaming.py`."
    )
    if not args.no_write:
        update_section("streaming", "## Streaming generation (issue 25)\n\n" + body_md)


if __name__ == "__main__":
    main()
