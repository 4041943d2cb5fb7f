"""``charrnn demo``: the whole path on one machine, in one command.

Starts the embedded model server on ``saved_models/`` (in the current folder, when
it holds a model; else on the model bundled with the package) in a subprocess on a
free port, opens a sampling session through the gRPC client, streams text
across several calls with the hidden state carried between them, prints each
call's latency and speed, and stops the server with SIGTERM (it drains and
exits 0). With ``--train CORPUS`` it first trains a small model on that text
for a few minutes, exports it, and serves that one.
"""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keras_charrnn.bundled import bundled_base_path
from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.sampling import DEFAULT_CHUNK, DEFAULT_TEMPERATURE
from keras_charrnn.serving.client import SamplingClient
from keras_charrnn.versions import DEFAULT_BASE_PATH, list_versions

DEMO_MINUTES = 3.0  # training time with train_corpus
DEMO_PRIME = "ROMEO:"  # the demo's prime (the bundled model is Shakespeare)
DEMO_CALLS = 6
DEMO_SEED = 1
SERVER_START_TIMEOUT = 180.0


def _models_under(base: Path) -> list[str]:
    """The model folders under ``base`` that hold at least one complete version."""
    try:
        folders = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    except OSError as exc:
        raise ConfigError(f"base_path {base}: cannot list it ({exc.strerror})") from None
    return [p.name for p in folders if list_versions(p, complete_only=True)]


def demo_base_path(base_path: str | None, training: bool = False) -> Path:
    """The folder of models the demo serves.

    Args:
        base_path: the folder given (``--base-path``); None for the default.
        training: the demo trains and exports a model first (into ``saved_models/``).

    Returns:
        ``base_path``; by default ``saved_models`` in the current folder when the demo trains or it holds a
        model (a clone of the repository), else the package's bundled models (an installed wheel).
    """
    if base_path is not None:
        return Path(base_path)
    local = Path(DEFAULT_BASE_PATH)
    return local if training or _models_under(local) else bundled_base_path()


def _models_config(base: Path, names: list[str]) -> str:
    """A ModelServerConfig text serving ``names`` from ``base``."""
    entries = "".join(
        f'  config {{\n    name: "{n}"\n    base_path: "{(base / n).resolve()}"\n'
        f'    model_platform: "tensorflow"\n  }}\n'
        for n in names
    )
    return f"model_config_list {{\n{entries}}}\n"


@contextmanager
def _server(config_text: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """``charrnn serve`` on a free loopback port, in a subprocess; yields it and its port, stops it with SIGTERM.

    The server's log goes to a temporary file (read back when it fails to start).
    """
    try:
        workdir = tempfile.TemporaryDirectory(prefix="charrnn-demo-")
    except OSError as exc:
        raise ConfigError(f"no usable temporary folder for the server's config ({exc})") from None
    with workdir as tmp, open(Path(tmp) / "server.log", "w+") as log:
        config = Path(tmp) / "models.config"
        config.write_text(config_text, encoding="utf-8")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keras_charrnn.cli",
                "serve",
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                "--model_config_file",
                str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            yield proc, _announced_port(proc, log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _announced_port(proc: subprocess.Popen, log) -> int:
    """Waits for the server's "serving on port N" line; raises ServingError if it never comes."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    assert proc.stdout is not None  # started with stdout=PIPE
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        line = proc.stdout.readline() if ready else ""
        match = re.match(r"serving on port (\d+)", line)
        if match:
            return int(match.group(1))
        if ready and not line and proc.poll() is not None:
            break
    proc.kill()
    log.seek(0)
    lines = log.read().strip().splitlines()
    raise ServingError("UNAVAILABLE", f"the model server did not start: {lines[-1] if lines else 'no output'}")


def train_small(corpus: str, minutes: float, base_path: Path) -> str:
    """Trains a small LSTM on ``corpus`` for about ``minutes``, exports it, returns its name."""
    from keras_charrnn.callbacks import TimeBudget
    from keras_charrnn.config import TrainConfig
    from keras_charrnn.export import export_run
    from keras_charrnn.train import train

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(corpus).stem) or "model"
    run_dir = Path("runs") / f"demo-{name}-{int(time.time())}"
    config = TrainConfig(
        units=256, dropout=0.0, batch_size=32, seq_len=64, epochs=1000, lr_schedule="constant", checkpoint_every=50
    )
    print(f"training a 2x256 LSTM on {corpus} for {minutes:g} minutes (run folder {run_dir})", flush=True)
    train(corpus, run_dir, config, callbacks=[TimeBudget(minutes * 60)], verbose=0)
    path = export_run(run_dir, name, base_path)
    print(f"exported {path}", flush=True)
    return name


def run_demo(
    base_path: str | None = None,
    name: str | None = None,
    train_corpus: str | None = None,
    minutes: float = DEMO_MINUTES,
    prime: str = DEMO_PRIME,
    calls: int = DEMO_CALLS,
    chunk: int = DEFAULT_CHUNK,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = DEMO_SEED,
) -> None:
    """Serves the models under ``base_path`` and samples one of them over gRPC; see the module doc.

    Args:
        base_path: the folder of all models (default: ``demo_base_path``'s choice, ``saved_models`` or the
            bundled model).
        name: the model to sample (default: ``shakespeare``, or the first found).
        train_corpus: first train a small model on this text file, export it and sample it.
        minutes: training time with ``train_corpus``.
        prime: the text to continue.
        calls: the number of gRPC calls.
        chunk: characters per call.
        temperature: sampling temperature.
        seed: sampling seed.

    Raises:
        ConfigError: no model to serve, or no model ``name``.
        ServingError: the server did not start, or did not exit cleanly.
    """
    base = demo_base_path(base_path, training=bool(train_corpus))
    if train_corpus:
        name = train_small(train_corpus, minutes, base)
    models = _models_under(base)
    if not models:
        raise ConfigError(
            f"base_path {base}: no SavedModels under it (train and export one, or run the demo with train_corpus)"
        )
    name = name or ("shakespeare" if "shakespeare" in models else models[0])
    if name not in models:
        raise ConfigError(f"name: no model {name!r} under {base} (have: {', '.join(models)})")

    started = time.perf_counter()
    timings = []
    with _server(_models_config(base, models)) as (proc, port):
        print(
            f"model server up on 127.0.0.1:{port} in {time.perf_counter() - started:.1f}s, "
            f"serving {', '.join(models)} from {base}"
        )
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
    status = proc.returncode
    print(f"{'call':>4} {'chars':>6} {'latency ms':>11} {'chars/s':>9}")
    for i, seconds in enumerate(timings, 1):
        print(f"{i:>4} {chunk:>6} {seconds * 1000:>11.1f} {chunk / seconds:>9.0f}")
    total = sum(timings)
    print(
        f"total {chunk * len(timings)} characters in {total:.2f}s ({chunk * len(timings) / total:.0f} chars/s); "
        f"server stopped with exit status {status}"
    )
    if status != 0:
        raise ServingError("INTERNAL", f"the model server exited with status {status}")
