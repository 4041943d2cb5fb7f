"""Soak: two replicas with batching, many client sessions, a fault schedule; is every honest text exact?

Two ``charrnn serve --enable_batching`` replicas on loopback, each on its own
copy of the model's base path (so their versions can differ), and
``--sessions`` client threads sharing one ``SamplingClient`` for ``--minutes``.
Each session has its own prime, seed and temperature and is one of these kinds
(plain twice as often as each other):

- plain: 4 to 12 ``generate`` calls of 8 or 64 characters;
- stops: the same with stop strings (``stop=``), each call's text, finish reason and
  matched stop kept (sometimes with the stop stripped);
- scores: 4 to 12 ``complete(n, logprobs=0, 2 or 5)`` calls, each character's
  log-probability and top alternatives kept (sometimes with stops);
- samples: ``Session.samples`` of 2 to 4 rows (sometimes with stops and scores),
  then one sample's own session continued by 1 to 4 ``generate`` calls;
- streams: 1 to 3 ``Session.stream`` calls of 64 to 600 characters in 16- or
  64-character pieces over the server's stream (``GenerationStream``; falling back to
  unary calls if a stream breaks), sometimes with stops.

Stops, scores and samples need ``generate_text_v2``; on a model without it only
plain and stream sessions (without stops) run. Faults, at fractions of the run:

- 25%: SIGKILL of replica 0, restarted at once on the same port;
- 45%: version 2 (a copy of version 1) copied into replica 1's base path, as ``cp -r`` does;
- 65%: a corrupt version 3 dropped into replica 0's base path;
- all along, every ``--malformed_every`` seconds, a bad request to one replica: a
  negative dimension, a tensor claiming far more elements than it carries, a
  temperature of -1, a wrong dtype, or a long call whose caller gives up at once.

Afterwards a seeded random sample of ``--replay`` finished sessions (all of
them when fewer finished) is replayed in this process (``keras_charrnn.load``:
same prime, seed, temperature, stops and calls) and compared: texts, finish
reasons and matched stops byte for byte, scores within ``SCORE_TOLERANCE``; so
the bench ends in bounded time. The report (printed, and written to BENCHMARKS.md
unless ``--print-only``) gives per window characters/s, p50/p99 call latency
and errors by status code, the sessions finished/failed, how many were replayed
and whether they were identical (per kind of session), and each server process's RSS.

    python bench/soak.py [--minutes 10] [--sessions 24] [--replay 300] [--model saved_models/shakespeare]
                         [--print-only]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from report import update_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from servers import ServerProcess  # noqa: E402  (the tests' model-server process)

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from keras_charrnn.errors import CharRNNError  # noqa: E402
from keras_charrnn.serving import wire  # noqa: E402
from keras_charrnn.serving.client import SamplingClient  # noqa: E402
from keras_charrnn.versions import latest_version_dir  # noqa: E402

MODEL = "soak"
PRIMES = [
    "ROMEO:\n",
    "JULIET:\nO ",
    "First Citizen:\nBefore we proceed",
    "\n",
    "KING RICHARD III:\nNow is the ",
    "To be, or not to be",
    "HAMLET:\n",
    "What light through yonder window ",
]
FAULTS = (
    (0.25, "SIGKILL replica 0, restart"),
    (0.45, "version 2 copied into replica 1"),
    (0.65, "corrupt version 3 into replica 0"),
)
KINDS = ("plain", "plain", "stops", "scores", "samples", "stream")
CONTROLLED = {"stops", "scores", "samples"}  # kinds that need generate_text_v2
STOPS = ("\n", "\n\n", ", ", "the", ("e", "o"), (":\n", "!"))
SCORE_TOLERANCE = 1e-4  # the most a score (a natural-log probability) may differ from in-process
MALFORMED = ("negative_dimension", "claims_too_much", "temperature_-1", "wrong_dtype", "caller_gives_up")


@dataclass
class Call:
    end: float
    latency: float
    chars: int
    code: str | None = None


@dataclass
class SessionRecord:
    prime: str
    seed: int
    temperature: float
    chunks: list[int]
    kind: str = "plain"
    stop: str | tuple[str, ...] | None = None
    logprobs: int = -1  # scores: -1 none, else the top alternatives asked for
    strip: bool = False  # stops: generate(n, strip_stop=True)
    rows: int = 0  # samples: how many
    follow: int = 0  # samples: which sample's session continues
    piece: int = 64  # streams: characters per piece
    outputs: list = field(default_factory=list)  # what each call gave (compared with the in-process replay)
    version: int | None = None
    error: str | None = None  # the status code name of a failed session


def new_record(rng: random.Random, seed: int, controlled: bool) -> SessionRecord:
    """A session of a random kind (only plain and stream ones without stops when ``controlled`` is false)."""
    kind = rng.choice([k for k in KINDS if controlled or k not in CONTROLLED])
    record = SessionRecord(rng.choice(PRIMES), seed, rng.choice([0.5, 0.8, 1.0]), [], kind)
    maybe_stop = lambda p: rng.choice(STOPS) if controlled and rng.random() < p else None  # noqa: E731
    if kind in ("plain", "stops", "scores"):
        record.chunks = [rng.choice([8, 8, 64]) for _ in range(rng.randint(4, 12))]
        record.stop = rng.choice(STOPS) if kind == "stops" else maybe_stop(0.3) if kind == "scores" else None
        record.strip = kind == "stops" and rng.random() < 0.3
        record.logprobs = rng.choice([0, 2, 5]) if kind == "scores" else -1
    elif kind == "samples":
        record.rows = rng.randint(2, 4)
        record.follow = rng.randrange(record.rows)
        record.chunks = [rng.choice([8, 64])] + [rng.choice([8, 64]) for _ in range(rng.randint(1, 4))]
        record.stop = maybe_stop(0.5)
        record.logprobs = rng.choice([-1, -1, 0, 3])
    else:  # stream
        record.chunks = [rng.choice([64, 256, 600]) for _ in range(rng.randint(1, 3))]
        record.piece = rng.choice([16, 64])
        record.stop = maybe_stop(0.3)
    return record


def completion_output(c) -> tuple:
    return (c.text, c.finish_reason, c.stop, c.logprobs, c.top_logprobs)


def run_session(record: SessionRecord, session, on_call=None) -> list:
    """Runs ``record``'s calls on ``session`` (over gRPC or in-process); returns what each gave.

    ``on_call(chars)`` is called after each call (the soak's latency records)."""
    outputs = []
    done = on_call or (lambda chars: None)
    if record.kind in ("plain", "stops"):
        for n in record.chunks:
            text = session.generate(n, strip_stop=record.strip)
            last = session.last
            outputs.append(text if record.kind == "plain" else (text, last.finish_reason, last.stop))
            done(len(text))
    elif record.kind == "scores":
        for n in record.chunks:
            c = session.complete(n, record.logprobs)
            outputs.append(completion_output(c))
            done(c.num_chars)
    elif record.kind == "samples":
        samples = session.samples(record.rows, record.chunks[0], record.logprobs)
        outputs.append([completion_output(c) for c in samples])
        done(sum(c.num_chars for c in samples))
        follow = samples[record.follow].session
        for n in record.chunks[1:]:
            text = follow.generate(n)
            outputs.append(text)
            done(len(text))
    else:  # stream: the pieces' text (its cut into pieces may differ after a broken stream; the text may not)
        for n in record.chunks:
            text = "".join(session.stream(n, record.piece))
            outputs.append((text, session.last.finish_reason if session.last else None))
            done(len(text))
    return outputs


def compare(got, want, worst: list[float]) -> bool:
    """Whether ``got`` is ``want``: strings and the rest exactly, floats (scores) within ``SCORE_TOLERANCE``;
    the largest score difference seen goes into ``worst[0]``."""
    if isinstance(want, float) and isinstance(got, float):
        worst[0] = max(worst[0], abs(got - want))
        return abs(got - want) <= SCORE_TOLERANCE
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all([compare(g, w, worst) for g, w in zip(got, want)])
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all([compare(got[k], want[k], worst) for k in want])
    return got == want


@dataclass
class Process:
    """One server process (a replica's incarnation) and its RSS samples (seconds since start, bytes)."""

    replica: int
    pid: int
    ready: float
    rss: list[tuple[float, int]] = field(default_factory=list)


class Replica:
    def __init__(self, index: int, base: Path, batching: Path, clock, streams: int = 16):
        self.index, self.base, self.batching, self.clock, self.streams = index, base, batching, clock, streams
        self.port = 0
        self.processes: list[Process] = []
        self.server = self._start()

    def _start(self) -> ServerProcess:
        server = ServerProcess(
            [
                "--model_name",
                MODEL,
                "--model_base_path",
                self.base / MODEL,
                "--enable_batching",
                "--batching_parameters_file",
                self.batching,
                "--file_system_poll_wait_seconds",
                "1",
                "--max_concurrent_streams",
                self.streams,
                "--port",
                self.port,
            ]
        )
        self.port = server.port
        self.processes.append(Process(self.index, server.proc.pid, self.clock()))
        return server

    def kill_and_restart(self) -> None:
        self.server.kill()
        self.server = self._start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def malformed_request(kind: str, info, rng: random.Random):
    """A bad PredictRequest of ``kind`` and the client timeout to send it with."""
    request = wire.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "generate_text"
    inputs = {
        "prime": np.array([b"ROMEO:"], dtype=object),
        "num_chars": np.array([64], np.int32),
        "temperature": np.array([0.8], np.float32),
        "top_k": np.array([0], np.int32),
        "top_p": np.array([1.0], np.float32),
        "seed": np.array([rng.randrange(1 << 40)], np.int64),
        "position": np.array([0], np.int64),
        **{n: np.zeros([1, info.state_size], np.float32) for n in info.state_names},
    }
    timeout = 30.0
    if kind == "temperature_-1":
        inputs["temperature"][0] = -1.0
    elif kind == "caller_gives_up":
        inputs["num_chars"][0] = info.max_chars_per_call
        timeout = 0.05
    for key, value in inputs.items():
        wire.to_tensor_proto(value, request.inputs[key])
    if kind == "negative_dimension":
        request.inputs["num_chars"].tensor_shape.dim[0].size = -1
    elif kind == "claims_too_much":  # a few bytes claiming [1, 1e8] ids: TensorProto repeats the last value
        request.model_spec.signature_name = "step"
        for key in ("prime", "num_chars", "temperature", "top_k", "top_p", "seed", "position"):
            del request.inputs[key]
        ids = request.inputs["ids"]
        ids.dtype = wire.DT_INT32
        ids.tensor_shape.dim.add(size=1)
        ids.tensor_shape.dim.add(size=100_000_000)
        ids.int_val.append(1)
    elif kind == "wrong_dtype":
        request.inputs["temperature"].Clear()
        wire.to_tensor_proto(np.array([1], np.int32), request.inputs["temperature"])
    return request, timeout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the sessions run")
    parser.add_argument("--sessions", type=int, default=24, help="concurrent client sessions (threads)")
    parser.add_argument("--model", default=str(ROOT / "saved_models" / "shakespeare"), help="a model base path")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per report window")
    parser.add_argument("--malformed_every", type=float, default=3.0, help="seconds between malformed requests")
    parser.add_argument(
        "--replay",
        type=int,
        default=300,
        help="finished sessions replayed in-process, a seeded random sample (all when fewer)",
    )
    parser.add_argument("--replay_seed", type=int, default=0, help="seed of the replayed sample")
    parser.add_argument(
        "--no_write",
        "--print-only",
        dest="no_write",
        action="store_true",
        help="print the report only (no BENCHMARKS.md)",
    )
    args = parser.parse_args()

    duration = args.minutes * 60
    source = Path(args.model)
    first = latest_version_dir(source)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    batching = ROOT / "serving" / "batching_parameters.txt"
    t0 = time.monotonic()
    clock = lambda: time.monotonic() - t0  # noqa: E731
    replicas = []
    for index in range(2):
        shutil.copytree(first, tmp / f"replica{index}" / MODEL / "1")
        replicas.append(Replica(index, tmp / f"replica{index}", batching, clock, max(16, args.sessions)))
    print(f"replicas ready on ports {[r.port for r in replicas]} after {clock():.1f} s", flush=True)

    client = SamplingClient([r.target for r in replicas], timeout=90, retries=30)
    info = client.model_info(MODEL)
    calls: list[Call] = []
    records: list[SessionRecord] = []
    events: list[tuple[float, str]] = []
    malformed: list[tuple[float, str, str]] = []
    attempts: list[tuple[float, Counter]] = []
    lock = threading.Lock()
    start = clock()
    stop_at = start + duration
    done = threading.Event()

    def session_worker(worker: int) -> None:
        rng = random.Random(worker)
        k = 0
        while clock() < stop_at:
            record = new_record(rng, worker * 1_000_000 + k, info.controlled)
            k += 1
            t = clock()

            def on_call(chars: int) -> None:
                nonlocal t
                with lock:
                    calls.append(Call(clock(), clock() - t, chars))
                t = clock()

            try:
                session = client.session(
                    MODEL, prime=record.prime, temperature=record.temperature, seed=record.seed, stop=record.stop or ()
                )
                try:
                    record.outputs = run_session(record, session, on_call)
                except CharRNNError as exc:
                    with lock:
                        calls.append(Call(clock(), clock() - t, 0, getattr(exc, "code", type(exc).__name__)))
                    raise
                record.version = session.version
            except CharRNNError as exc:
                record.error = getattr(exc, "code", type(exc).__name__)
                print(f"session {worker}/{k} ({record.kind}) failed: {exc}", flush=True)
            with lock:
                records.append(record)

    def faults() -> None:
        for fraction, label in FAULTS:
            if done.wait(max(0.0, start + fraction * duration - clock())):
                return
            events.append((clock(), label))
            print(f"[{clock():6.1f} s] {label}", flush=True)
            if label.startswith("SIGKILL"):
                replicas[0].kill_and_restart()
                events.append((clock(), "replica 0 serving again"))
                print(f"[{clock():6.1f} s] replica 0 serving again", flush=True)
            elif label.startswith("version 2"):
                shutil.copytree(replicas[1].base / MODEL / "1", replicas[1].base / MODEL / "2")
            else:
                bad = replicas[0].base / MODEL / "3"
                (bad / "variables").mkdir(parents=True)
                (bad / "saved_model.pb").write_bytes(os.urandom(4096))

    def bad_requests() -> None:
        rng = random.Random(7)
        channels = {}
        i = 0
        while not done.wait(args.malformed_every):
            kind, replica = MALFORMED[i % len(MALFORMED)], replicas[i % 2]
            i += 1
            if replica.target not in channels:
                channels[replica.target] = grpc.insecure_channel(replica.target).unary_unary(
                    wire.PREDICT,
                    request_serializer=wire.PredictRequest.SerializeToString,
                    response_deserializer=wire.PredictResponse.FromString,
                )
            request, timeout = malformed_request(kind, info, rng)
            try:
                channels[replica.target](request, timeout=timeout)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            malformed.append((clock(), kind, code))

    def monitor() -> None:
        while not done.wait(0.5):
            now = clock()
            for replica in replicas:
                process = replica.processes[-1]
                rss = rss_bytes(process.pid)
                if rss is not None:
                    process.rss.append((now, rss))
            with client._lock:
                attempts.append((now, Counter(client.failed_attempts)))

    helpers = [threading.Thread(target=f, daemon=True) for f in (faults, bad_requests, monitor)]
    workers = [threading.Thread(target=session_worker, args=(w,)) for w in range(args.sessions)]
    for thread in helpers + workers:
        thread.start()
    for thread in workers:
        thread.join()
    end = clock()
    done.set()
    for thread in helpers:
        thread.join()
    for replica in replicas:
        replica.server.stop()
    client.close()

    # ----- replay a seeded sample of the finished sessions in-process ------------------------
    from keras_charrnn.inprocess import load

    finished = [r for r in records if r.error is None]
    sample = (
        finished
        if len(finished) <= args.replay
        else random.Random(args.replay_seed).sample(finished, max(0, args.replay))
    )
    print(f"replaying {len(sample)} of {len(finished)} finished sessions in-process ...", flush=True)
    model = load(first)
    failed = Counter(f"failed ({r.error})" for r in records if r.error is not None)
    replayed = Counter()
    by_kind: dict[str, Counter] = {kind: Counter() for kind in dict.fromkeys(KINDS)}
    worst = [0.0]  # the largest score difference from in-process
    for record in records:
        by_kind[record.kind]["run"] += 1
        by_kind[record.kind]["failed" if record.error else "finished"] += 1
    for record in sample:
        local = model.session(record.prime, temperature=record.temperature, seed=record.seed, stop=record.stop or ())
        verdict = "identical" if compare(record.outputs, run_session(record, local), worst) else "mismatched"
        replayed[verdict] += 1
        by_kind[record.kind][verdict] += 1
        by_kind[record.kind]["replayed"] += 1
    versions = Counter(r.version for r in finished)

    # ----- report ----------------------------------------------------------------------------
    rows = [
        "| window (s) | chars/s | calls | p50 / p99 latency (ms) | honest calls failed | failed attempts "
        "(retried by the client) | malformed requests: codes | events |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def counts(counter: Counter) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()) if v) or "-"

    w0 = start
    while w0 < end - 1e-9:
        w1 = min(w0 + args.window, end)
        inside = [c for c in calls if w0 <= c.end < w1]
        ok = [c for c in inside if c.code is None]
        lat = [c.latency * 1e3 for c in ok]
        before = next((a for t, a in reversed(attempts) if t <= w0), Counter())
        after = next((a for t, a in reversed(attempts) if t <= w1), Counter())
        bad = Counter(f"{code}" for t, _, code in malformed if w0 <= t < w1)
        happened = "; ".join(label for t, label in events if w0 <= t < w1) or "-"
        rows.append(
            f"| {w0 - start:.0f}-{w1 - start:.0f} | {sum(c.chars for c in ok) / (w1 - w0):,.0f} | {len(ok)} | "
            + (f"{percentile(lat, 50):.0f} / {percentile(lat, 99):.0f}" if lat else "-")
            + f" | {counts(Counter(c.code for c in inside if c.code))} | {counts(after - before)} | "
            f"{counts(bad)} | {happened} |"
        )
        w0 = w1
    malformed_kinds = Counter(f"{kind}: {code}" for _, kind, code in malformed)
    settle = max(20.0, 0.1 * duration)  # the baseline: this long after a process is ready (warm-up allocations)
    rss_rows = [
        f"| server process | RSS at start (MB) | after {settle:.0f} s (MB) | peak (MB) | end (MB) | growth "
        f"after {settle:.0f} s (MB) |",
        "|---|---|---|---|---|---|",
    ]
    growths = []
    mb = lambda b: b / 2**20  # noqa: E731
    for replica in replicas:
        for n, process in enumerate(replica.processes):
            if not process.rss:
                continue
            settled = next((r for t, r in process.rss if t >= process.ready + settle), process.rss[-1][1])
            last = process.rss[-1][1]
            killed = n < len(replica.processes) - 1
            if not killed:  # the goal is about processes that lived to the end
                growths.append(mb(last - settled))
            rss_rows.append(
                f"| replica {replica.index}"
                + (f" (restart {n})" if n else "")
                + (f" (killed at {process.rss[-1][0] - start:.0f} s)" if killed else "")
                + f" | "
                f"{mb(process.rss[0][1]):.0f} | {mb(settled):.0f} | "
                f"{mb(max(r for _, r in process.rss)):.0f}"
                f" | {mb(last):.0f} | {mb(last - settled):+.0f} |"
            )
    kind_rows = [
        "| kind | sessions run | finished | failed | replayed | identical | mismatched |",
        "|---|---|---|---|---|---|---|",
    ] + [
        f"| {kind} | {c['run']} | {c['finished']} | {c['failed']} | {c['replayed']} | {c['identical']} | "
        f"{c['mismatched']} |"
        for kind, c in by_kind.items()
    ]
    lost = sum(failed.values())
    mismatched = replayed["mismatched"]
    replay_line = (
        f"{len(sample)} of {len(finished)} finished sessions replayed"
        + (" (all of them)" if len(sample) == len(finished) else f" (a random sample, seed {args.replay_seed})")
        + (
            ", all byte-identical to in-process"
            if mismatched == 0
            else f": {replayed['identical']} byte-identical, {mismatched} mismatched"
        )
    )
    body = (
        "## Soak (issues 9, 24, 25)\n\n"
        f"`python bench/soak.py --minutes {args.minutes:g} --sessions {args.sessions} --replay {args.replay}`: two "
        f"replicas of "
        f"`{source.name}` (`charrnn serve --enable_batching`, `serving/batching_parameters.txt`) on loopback, "
        f"{args.sessions} sessions (threads sharing one `SamplingClient`, timeout 90 s), each of one kind: plain "
        "(4-12 `generate` calls of 8 or 64 characters), stops (the same with stop strings), scores (4-12 "
        "`complete` calls with logprobs 0, 2 or 5), samples (`Session.samples` of 2-4 rows, then one sample's "
        "session continued) or streams (1-3 `Session.stream` calls of 64-600 characters in 16- or 64-character "
        "pieces over the server's stream), for "
        f"{end - start:.0f} s; faults at 25% (SIGKILL + restart of replica 0), 45% (version 2 copied into replica 1), "
        f"65% (corrupt version 3 into replica 0; each fault waits for the one before, restart included), and a "
        f"malformed request every {args.malformed_every:g} s. "
        f"A seeded random sample of up to {args.replay} finished sessions (all of them when fewer) is replayed "
        "in-process with the same prime, seed, stops and calls: texts, finish reasons and matched stops byte for "
        f"byte, scores within {SCORE_TOLERANCE:g}.\n\n"
        + "\n".join(rows)
        + f"\n\nSessions: {len(records)} run, {len(finished)} finished"
        + "".join(f", {v} {k}" for k, v in sorted(failed.items()))
        + f"; {replay_line}; finished by version: "
        + ", ".join(f"v{k} {v}" for k, v in sorted(versions.items()))
        + ".\n\n"
        + "\n".join(kind_rows)
        + f"\n\nLargest score difference from in-process: {worst[0]:.2g}."
        + f"\n\nMalformed requests: {counts(malformed_kinds)}.\n\n"
        + "\n".join(rss_rows)
        + "\n\nGoals: no honest session lost or mismatched: "
        + ("met" if lost == 0 and mismatched == 0 else f"NOT met ({lost} lost, {mismatched} mismatched)")
        + (
            f" (lost counted over all {len(records)} sessions; mismatches over the {len(sample)} replayed"
            + (", a sample" if len(sample) < len(finished) else ", all of the finished")
            + ")"
        )
        + "; RSS growth under 50 MB: "
        + ("met" if growths and max(growths) < 50 else f"NOT met (max {max(growths or [0]):+.0f} MB)")
        + "."
    )
    print(body, flush=True)
    if not args.no_write:
        update_section("soak", body)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
