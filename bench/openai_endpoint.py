"""OpenAI-compatible completions (``POST /v1/completions``) vs the same generation through gRPC.

For a 2x128 LSTM with random weights (speed does not depend on them) and the
bundled 2x512 model (``saved_models/shakespeare``, which has the
``generate_text_v2`` signature the endpoint needs), one ``charrnn serve`` each
(batching on, REST port on), in one run:

* the endpoint, through the official ``openai`` package (``client.completions.create``
  with the prompt, seed and temperature; no stops, so ``max_tokens`` characters);
* gRPC, through a ``SamplingClient`` session with the same prompt, seed and
  temperature (``session.generate(chars)``; the endpoint's text is checked to be
  the session's, character for character, before timing);

for 64 and 1,000 characters: one client (the median latency of ``--calls`` calls,
the two ways interleaved) and ``--concurrent`` clients at once (the median over
``--calls`` interleaved bursts of one call per client: aggregate characters per
second). The ratio is endpoint / gRPC (latency: above 1.00x the endpoint is slower;
throughput: below 1.00x it is slower). The section also gives this CPU's peak
``tf.matmul`` rate, measured in the same run.

    python bench/openai_endpoint.py [--calls 9] [--chars 64,1000] [--concurrent 16] [--no_write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import machine, update_section  # noqa: E402
from train_throughput import PEAK_N, peak_matmul  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import ServerProcess, free_ports  # noqa: E402

PROMPT = "ROMEO:\n"
TEMPERATURE = 0.8


def endpoint_call(api, name: str, chars: int, seed: int) -> str:
    answer = api.completions.create(model=name, prompt=PROMPT, max_tokens=chars, temperature=TEMPERATURE, seed=seed)
    return answer.choices[0].text


def grpc_call(client, name: str, chars: int, seed: int) -> str:
    return client.session(name, PROMPT, temperature=TEMPERATURE, seed=seed).generate(chars)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(label: str, name: str, base_path: str, chars_list: list[int], calls: int, concurrent: int) -> list[str]:
    """The table rows of one model: per length, one client's median latency and the concurrent aggregate."""
    import openai

    from keras_charrnn.serving.client import SamplingClient

    rows = []
    (rest,) = free_ports(1)
    flags = ["--enable_batching", "--rest_api_port", rest, "--rest_api_num_threads", max(16, 2 * concurrent)]
    with ServerProcess(["--model_name", name, "--model_base_path", base_path, *flags]) as server:
        client = SamplingClient(f"127.0.0.1:{server.port}", timeout=600)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{rest}/v1", api_key="unused", max_retries=0, timeout=600)
        ways = {
            "endpoint": lambda n, seed: endpoint_call(api, name, n, seed),
            "gRPC": lambda n, seed: grpc_call(client, name, n, seed),
        }
        for chars in chars_list:
            texts = {way: run(chars, 1) for way, run in ways.items()}  # also the warm-up
            if texts["endpoint"] != texts["gRPC"]:
                raise SystemExit(f"{label}, {chars} chars: the endpoint's text is not the gRPC session's")
            latency: dict[str, list[float]] = {w: [] for w in ways}
            for i in range(calls):
                for way, run in ways.items():
                    latency[way].append(timed(run, chars, 100 + i))
            one = {w: statistics.median(t) for w, t in latency.items()}
            rate: dict[str, list[float]] = {w: [] for w in ways}
            with ThreadPoolExecutor(concurrent) as pool:
                for i in range(calls):
                    for way, run in ways.items():
                        seeds = range(1000 * (i + 1), 1000 * (i + 1) + concurrent)
                        took = timed(lambda *a: list(pool.map(*a)), partial(run, chars), seeds)
                        rate[way].append(concurrent * chars / took)
            many = {w: statistics.median(r) for w, r in rate.items()}
            rows.append(
                f"| {label} | {chars:,} | {one['endpoint'] * 1e3:.1f} | {one['gRPC'] * 1e3:.1f} | "
                f"{one['endpoint'] / one['gRPC']:.2f}x | {many['endpoint']:,.0f} | {many['gRPC']:,.0f} | "
                f"{many['endpoint'] / many['gRPC']:.2f}x |"
            )
            print(rows[-1], flush=True)
        api.close()
        client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=9, help="calls per way for one client; bursts for concurrent")
    parser.add_argument("--chars", default="64,1000", help="generation lengths, comma-separated")
    parser.add_argument("--concurrent", type=int, default=16, help="clients at once")
    parser.add_argument("--bundled", default=str(ROOT / "saved_models" / "shakespeare"), help="the 2x512 base path")
    parser.add_argument("--no_write", action="store_true", help="print only (no BENCHMARKS.md)")
    args = parser.parse_args()
    chars_list = [int(c) for c in args.chars.split(",")]

    import openai

    from keras_charrnn.export import save_savedmodel
    from keras_charrnn.model import build_model
    from keras_charrnn.vocab import Vocabulary

    peak = peak_matmul()
    print(f"peak tf.matmul ({PEAK_N}x{PEAK_N}, float32): {peak:,.0f} GFLOP/s", flush=True)
    vocab = Vocabulary([chr(c) for c in range(32, 127)] + ["\n"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_savedmodel(
            build_model(vocab.size, cell="lstm", units=128, batch_size=1, seq_len=1), vocab, f"{tmp}/lstm128/1"
        )
        rows += measure("2x128 LSTM (random)", "lstm128", f"{tmp}/lstm128", chars_list, args.calls, args.concurrent)
    rows += measure("2x512 LSTM (bundled)", "shakespeare", args.bundled, chars_list, args.calls, args.concurrent)
    body = (
        "## OpenAI-compatible completions vs gRPC (issue 26)\n\n"
        f"`python bench/openai_endpoint.py --calls {args.calls} --chars {args.chars} --concurrent {args.concurrent}` "
        f"on {machine()} (peak `tf.matmul` {PEAK_N}x{PEAK_N} float32, same run: {peak:,.0f} GFLOP/s). "
        f"One `charrnn serve --enable_batching` per model with its REST port. A completion of the prompt "
        f"{PROMPT!r} at temperature {TEMPERATURE} and a seed, through `POST /v1/completions` with the official "
        f"`openai` package ({openai.__version__}) vs the same generation through gRPC (a `SamplingClient` session "
        "with the same prompt, seed and temperature, `generate(chars)`); the texts are checked equal first. "
        f"One client: median latency of {args.calls} calls per way, interleaved. {args.concurrent} concurrent: "
        f"median over {args.calls} interleaved bursts of {args.concurrent} simultaneous calls (one per client "
        "thread), aggregate characters per second. Ratios: endpoint / gRPC.\n\n"
        "| model | chars | one client: endpoint (ms) | gRPC (ms) | ratio | "
        f"{args.concurrent} concurrent: endpoint (chars/s) | gRPC (chars/s) | ratio |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nWritten by `bench/openai_endpoint.py`."
    )
    print(body, flush=True)
    if not args.no_write:
        update_section("openai_endpoint", body)


if __name__ == "__main__":
    main()
