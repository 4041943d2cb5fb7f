"""Shared fixtures: small corpora, tiny trained runs and their SavedModels, model servers.

Everything is made by the tests themselves, small enough that the suite runs
in a few minutes on two CPU cores.

``pytest -q`` runs the tests in two pytest-xdist workers (pyproject.toml's ``addopts``). What the workers
share is made once: the tiny trained runs and their SavedModels are built by the first worker that asks
(``made_once``: a folder beside the workers' own temporary folders, under a file lock) and read by both.
Each worker starts its own model server (``server_process``): tests read its log. Tests that share a
module's fixture (a server, a trained run) run on one worker (``xdist_group``, ``pytest_collection_modifyitems``).

Two tiers: ``pytest -q`` runs every test; ``pytest -q -m "not slow"`` leaves out the ``slow``
ones (a model trained, a server or another process started, the bundled 2x512 model loaded)
for the edit-test loop. A test that uses one of ``SLOW_FIXTURES`` (directly or through
another fixture) is marked slow here; other slow tests carry ``@pytest.mark.slow``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import filelock
import pytest

from servers import ServerProcess

from keras_charrnn import cell_types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# XLA's persistent compilation cache (TensorFlow's ``--tf_xla_persistent_cache_directory``), one folder for the
# run's processes: the servers, CLI commands and workers compile the same tiny models' loops again and again (a
# model server spent about 11 of its 20 CPU-seconds of start-up on them); with the cache, a process after the first
# loads the executables instead. An executable is keyed by its program and is the one a compile makes, so the
# bits are the same; the test that emulates other CPUs (``without_xla_cache``) compiles for itself.
XLA_CACHE_FLAG = "--tf_xla_persistent_cache_directory"


def pytest_configure(config):
    """In the run's first process (the xdist controller, or the only one), before any TensorFlow starts: a fresh
    XLA compilation cache for this run, passed to every process the run starts through ``TF_XLA_FLAGS``."""
    if os.environ.get("PYTEST_XDIST_WORKER") or XLA_CACHE_FLAG in os.environ.get("TF_XLA_FLAGS", ""):
        return
    config.xla_cache = tempfile.mkdtemp(prefix="charrnn-test-xla-cache-")
    os.environ["TF_XLA_FLAGS"] = f"{os.environ.get('TF_XLA_FLAGS', '')} {XLA_CACHE_FLAG}={config.xla_cache}".strip()


def pytest_unconfigure(config):
    if getattr(config, "xla_cache", None):
        shutil.rmtree(config.xla_cache, ignore_errors=True)


def without_xla_cache(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the run's XLA compilation cache taken out of ``TF_XLA_FLAGS``, for a process that emulates
    another CPU (``--xla_cpu_max_isa``): it must compile for that CPU, not load what was compiled for this one."""
    flags = [f for f in env.get("TF_XLA_FLAGS", "").split() if not f.startswith(XLA_CACHE_FLAG)]
    return {**env, "TF_XLA_FLAGS": " ".join(flags)}


# The cells of the served fixtures (trained, exported and served once per session); the per-cell equality
# tests (export, batch invariance, backends, resume) take every cell of the registry, ALL_CELLS.
CELLS = ("lstm", "gru", "rnn")
ALL_CELLS = tuple(cell_types.CELLS)
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven cats sit on warm mats and "
    '"quoted words" (in brackets) appear now and then'
).split()


# Fixtures that train models, start servers or load the bundled 2x512 model (those of one module included):
# a test using any of them is slow.
SLOW_FIXTURES = frozenset(
    {
        "trained_runs",
        "model_base",
        "server",
        "server_process",
        "bundled",
        "both_loads",
        "wheel",
        "full_runs",
        "cli_budget_run",
    }
)


# Module-scoped fixtures cheap enough to make once per worker (a file, a channel to the worker's server): tests
# using them need not share a worker. Any other module-scoped fixture puts its module's tests that use it on one
# worker (``xdist_group``), so it is made once and its tests run in order.
CHEAP_MODULE_FIXTURES = frozenset({"corpus", "client", "stub"})

# The modules, costliest first (CPU-seconds measured; BENCHMARKS.md, "Test suite"), so that the long tests start
# first and the last minute has only short ones left to spread over the workers. A module not named here runs
# after these and before the modules of fast tests only.
COSTLIEST_FIRST = (
    "test_backends.py",
    "test_batch_invariance.py",
    "test_export.py",
    "test_distribute.py",
    "test_training.py",
    "test_cli.py",
    "test_openai.py",
    "test_generation_serving.py",
    "test_streaming.py",
    "test_serving.py",
    "test_generation.py",
    "test_client.py",
    "test_docs.py",
    "test_visualize.py",
    "test_budget.py",
    "test_labels.py",
    "test_hostile.py",
    "test_warmup.py",
    "test_packaging.py",
    "test_rest.py",
    "test_signature_loader.py",
    "test_monitoring.py",
)


def _module_group(item) -> str | None:
    """The module's group when ``item`` uses a costly module-scoped fixture, else None."""
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in getattr(item, "fixturenames", ()):
        if name not in CHEAP_MODULE_FIXTURES and any(d.scope == "module" for d in defs.get(name, ())):
            return item.path.name
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("xdist_group") is None and (group := _module_group(item)):
            item.add_marker(pytest.mark.xdist_group(group))

    with_slow_tests = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(indexed) -> tuple[int, int]:
        index, item = indexed
        name = item.path.name
        if name in COSTLIEST_FIRST:
            return COSTLIEST_FIRST.index(name), index
        return len(COSTLIEST_FIRST) + (item.path not in with_slow_tests), index

    items[:] = [item for _, item in sorted(enumerate(items), key=rank)]  # each module's tests stay in order


def make_corpus(n_words: int = 5000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(4, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)))
        n_words -= k
    return "\n".join(lines) + "\n"


def shared_folder(tmp_path_factory) -> Path:
    """The folder every pytest-xdist worker of this run sees (beside the workers' own base temporary folders),
    or this run's base temporary folder when the tests run in one process."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The shared folder ``name``, filled by ``make(folder)`` in the first worker (or thread) that asks for it.

    The others wait on its file lock and then read what it made; a ``make`` that failed leaves no ``NAME.made``
    mark, so the next one that asks starts the folder again (and fails with its own error).
    """
    folder = shared_folder(tmp_path_factory) / name
    made = folder.with_name(f"{name}.made")
    with filelock.FileLock(folder.with_name(f"{name}.lock")):
        if not made.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            made.touch()
    return folder


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    made = made_once(
        tmp_path_factory, "corpus", lambda folder: (folder / "corpus.txt").write_text(make_corpus(), encoding="utf-8")
    )
    return made / "corpus.txt"


def tiny_config(cell: str, **overrides):
    from keras_charrnn.config import TrainConfig

    values = dict(
        cell=cell,
        units=24,
        layers=2,
        embedding_dim=16,
        batch_size=8,
        seq_len=16,
        epochs=2,
        dropout=0.0,
        checkpoint_every=20,
        lr=5e-3,
    )
    values.update(overrides)
    return TrainConfig(**values)


# Trains one cell's tiny run (train(corpus, run_dir, config)) and exports it as BASE/CELL/1 (export_run).
TRAIN_AND_EXPORT = """
import json, sys
from keras_charrnn.config import TrainConfig
from keras_charrnn.export import export_run
from keras_charrnn.train import train
corpus, run_dir, base, cell, config = sys.argv[1:]
train(corpus, run_dir, TrainConfig(**json.loads(config)), verbose=0)
export_run(run_dir, cell, base)
"""


def trained_and_exported(tmp_path_factory, corpus_file: Path, cell: str) -> tuple[Path, Path]:
    """``cell``'s tiny run (``tiny_config(cell)`` on ``corpus_file``) and the saved_models/-style base it is
    exported under (BASE/CELL/1), made once for every worker in a process of its own (``made_once``).

    ``CELLS``' models share one base (``model_base``, which the session's servers serve); any other cell's
    has a base of its own.
    """
    base = shared_folder(tmp_path_factory) / ("saved_models" if cell in CELLS else f"saved_{cell}")

    def make(run_dir: Path) -> None:
        config = json.dumps(dataclasses.asdict(tiny_config(cell)))
        args = [corpus_file, run_dir, base, cell, config]
        done = subprocess.run(
            [sys.executable, "-c", TRAIN_AND_EXPORT, *map(str, args)], capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"training or exporting the {cell} run failed:\n{done.stderr[-3000:]}"

    return made_once(tmp_path_factory, f"run_{cell}", make), base


class TrainedRuns(dict):
    """Tiny trained run folders by cell type: ``CELLS``' made up front (``_trained_and_exported``), any other
    cell's on first use (``trained_and_exported``)."""

    def __init__(self, runs: dict[str, Path], tmp_path_factory, corpus_file: Path):
        super().__init__(runs)
        self.tmp_path_factory, self.corpus_file = tmp_path_factory, corpus_file

    def __missing__(self, cell: str) -> Path:
        self[cell] = trained_and_exported(self.tmp_path_factory, self.corpus_file, cell)[0]
        return self[cell]


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


@pytest.fixture(scope="session")
def _trained_and_exported(tmp_path_factory, corpus_file) -> tuple[dict[str, Path], Path]:
    """``CELLS``' tiny runs trained and exported (``trained_and_exported``), each cell in its own process, side by
    side: a tiny model's step is mostly one core's Python, so two cells train in about the time of one. Each
    worker starts from another cell, so two workers that ask at once make different cells."""
    k = _worker_index() % len(CELLS)
    order = CELLS[k:] + CELLS[:k]
    made = side_by_side(*(functools.partial(trained_and_exported, tmp_path_factory, corpus_file, c) for c in order))
    runs = {cell: run for cell, (run, _) in zip(order, made)}
    return {cell: runs[cell] for cell in CELLS}, made[0][1]


@pytest.fixture(scope="session")
def trained_runs(_trained_and_exported, tmp_path_factory, corpus_file) -> dict[str, Path]:
    """One tiny trained run folder per cell type (``tiny_config(cell)`` on ``corpus_file``; ``TrainedRuns``).
    Shared by every worker: tests read them (copy one to change it)."""
    return TrainedRuns(_trained_and_exported[0], tmp_path_factory, corpus_file)


@pytest.fixture(scope="session")
def model_base(_trained_and_exported) -> Path:
    """saved_models/-style folder with one exported model per cell: NAME/1 (``export_run`` of its run)."""
    return _trained_and_exported[1]


@pytest.fixture(scope="session")
def model_dir(request, trained_runs, tmp_path_factory, corpus_file):
    """``model_dir(cell)``: the folder (NAME/1 inside) of the exported tiny run of ``cell``: ``model_base``'s for
    ``CELLS``, any other cell's exported with its run under a base of its own (no server polls it)."""

    def get(cell: str) -> Path:
        if cell in CELLS:
            return request.getfixturevalue("model_base") / cell
        return trained_and_exported(tmp_path_factory, corpus_file, cell)[1] / cell

    return get


@functools.cache
def loaded(path: Path):
    """``keras_charrnn.load(path)`` once per process, for the session's exported models (``model_base``,
    ``model_dir``): tests only read them, and each load compiles its XLA signatures again (about 3 CPU-seconds).
    A test of loading itself calls ``load``."""
    from keras_charrnn.inprocess import load

    return load(path)


def write_models_config(path: Path, base: Path, names, policy: str = "") -> Path:
    entries = "".join(
        f'  config {{ name: "{n}" base_path: "{base / n}" model_platform: "tensorflow" {policy} }}\n' for n in names
    )
    path.write_text(f"model_config_list {{\n{entries}}}\n")
    return path


@pytest.fixture(scope="session")
def server_process(model_base, tmp_path_factory) -> ServerProcess:
    """A model server for every cell's model (``--model_config_file``, defaults otherwise).

    One for the whole session: the tests that use it only call it and read its log (nothing is
    written under model_base, no test stops it), so each test file need not wait for its own to start.
    """
    config = write_models_config(tmp_path_factory.mktemp("cfg") / "models.config", model_base, CELLS)
    with ServerProcess(["--model_config_file", config]) as process:
        yield process


@pytest.fixture(scope="session")
def server(server_process) -> int:
    """The session's model server (``server_process``): its gRPC port."""
    return server_process.port


def run_cli(*args, input: str | None = None, timeout: float = 300, cwd=None):
    """Runs ``charrnn ARGS`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "keras_charrnn.cli", *map(str, args)],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        cwd=cwd,
    )


def interactive_transcript(stdout: str, answers) -> str:
    """What ``charrnn sample --interactive`` shows for ``answers`` (one per line typed): its first line (the
    intro), a prompt before each answer, a newline after an answer that does not end with one, a last prompt."""
    intro = stdout.split("\n", 1)[0]
    return intro + "\n" + "".join(f"> {a}" + ("" if a.endswith("\n") else "\n") for a in answers) + "> \n"


def side_by_side(*calls):
    """Runs zero-argument callables (each starting and waiting for its own subprocess) at the same time, as many
    as there are CPU cores; returns their results in order.

    Most of a short ``charrnn`` command's time is ``import tensorflow`` on one core while this process only
    waits, so independent commands (no shared files, each its own output folder) run side by side and
    print what each would print alone.
    """
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda call: call(), calls))


@contextlib.contextmanager
def in_background(call):
    """Runs a zero-argument callable (one that starts and waits for a subprocess) beside the ``with`` block;
    yields its Future, whose ``result()`` waits for it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(call)
