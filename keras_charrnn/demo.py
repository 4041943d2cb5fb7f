"""``charrnn demo``: the whole path on one machine, in one command.

Starts the embedded model server on ``saved_models/`` in a subprocess on a
free port, opens a sampling session through the gRPC client, streams text
across several calls with the hidden state carried between them, prints each
call's latency and speed, and stops the server with SIGTERM (it drains and
exits 0). With ``--train CORPUS`` it first trains a small model on that text
for a few minutes, exports it, and serves that one.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from keras_charrnn.errors import CharRNNError

SERVER_START_TIMEOUT = 180.0


def _models_under(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir()
                  if p.is_dir() and any(v.name.isdigit() and (v / "saved_model.pb").is_file() for v in p.iterdir())) \
        if base.is_dir() else []


def _write_config(base: Path, names: list[str], path: Path) -> None:
    entries = "".join(f'  config {{\n    name: "{n}"\n    base_path: "{(base / n).resolve()}"\n'
                      f'    model_platform: "tensorflow"\n  }}\n' for n in names)
    path.write_text(f"model_config_list {{\n{entries}}}\n")


def start_server(args: list[str], cwd: str | os.PathLike | None = None,
                 timeout: float = SERVER_START_TIMEOUT) -> tuple[subprocess.Popen, int]:
    """Starts ``charrnn serve ARGS`` on a free loopback port; returns the process and its port once it serves."""
    cmd = [sys.executable, "-m", "keras_charrnn.cli", "serve", "--port", "0", "--host", "127.0.0.1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        match = re.match(r"serving on port (\d+)", line)
        if match:
            return proc, int(match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    err = proc.stderr.read().strip().splitlines()
    raise CharRNNError(f"the model server did not start: {err[-1] if err else 'no output'}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM, then wait for the drain; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def train_small(corpus: str, minutes: float, base_path: Path) -> str:
    """Trains a small LSTM on ``corpus`` for about ``minutes``, exports it, returns its name."""
    from keras_charrnn.callbacks import TimeBudget
    from keras_charrnn.config import TrainConfig
    from keras_charrnn.export import export_run
    from keras_charrnn.train import train

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(corpus).stem) or "model"
    run_dir = Path("runs") / f"demo-{name}-{int(time.time())}"
    config = TrainConfig(units=256, dropout=0.0, batch_size=32, seq_len=64, epochs=1000, lr_schedule="constant",
                         checkpoint_every=50)
    print(f"training a 2x256 LSTM on {corpus} for {minutes:g} minutes (run folder {run_dir})", flush=True)
    train(corpus, run_dir, config, callbacks=[TimeBudget(minutes * 60)], verbose=0)
    path = export_run(run_dir, name, base_path)
    print(f"exported {path}", flush=True)
    return name


def run_demo(base_path: str = "saved_models", name: str | None = None, train_corpus: str | None = None,
             minutes: float = 3.0, prime: str = "ROMEO:", calls: int = 6, chunk: int = 64,
             temperature: float = 0.8, seed: int = 1) -> None:
    """Serves the models under ``base_path`` and samples one of them over gRPC; see the module doc."""
    base = Path(base_path)
    if train_corpus:
        name = train_small(train_corpus, minutes, base)
    models = _models_under(base)
    if not models:
        raise CharRNNError(f"no SavedModels under {base}/ (train and export one, or run 'charrnn demo --train FILE')")
    name = name or ("shakespeare" if "shakespeare" in models else models[0])
    if name not in models:
        raise CharRNNError(f"no model {name!r} under {base}/ (have: {', '.join(models)})")

    from keras_charrnn.serving.client import SamplingClient

    config_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"charrnn-demo-{os.getpid()}.config"
    _write_config(base, models, config_file)
    started = time.perf_counter()
    proc, port = start_server(["--model_config_file", str(config_file)])
    print(f"model server up on 127.0.0.1:{port} in {time.perf_counter() - started:.1f}s, serving {', '.join(models)}")
    timings = []
    try:
        with SamplingClient(f"127.0.0.1:{port}") as client:
            session = client.session(name, prime=prime, temperature=temperature, seed=seed)
            print(f"--- {name}: {calls} calls of {chunk} characters, state carried by the client ---")
            sys.stdout.write(prime)
            for _ in range(calls):
                t0 = time.perf_counter()
                text = session.generate(chunk)
                timings.append(time.perf_counter() - t0)
                sys.stdout.write(text)
                sys.stdout.flush()
            print(f"\n--- served by version {session.version}; session position {session.position} ---")
    finally:
        status = stop_server(proc)
        config_file.unlink(missing_ok=True)
    print(f"{'call':>4} {'chars':>6} {'latency ms':>11} {'chars/s':>9}")
    for i, seconds in enumerate(timings, 1):
        print(f"{i:>4} {chunk:>6} {seconds * 1000:>11.1f} {chunk / seconds:>9.0f}")
    total = sum(timings)
    print(f"total {chunk * len(timings)} characters in {total:.2f}s ({chunk * len(timings) / total:.0f} chars/s); "
          f"server stopped with exit status {status}")
    if status != 0:
        raise CharRNNError(f"the model server exited with status {status}")
