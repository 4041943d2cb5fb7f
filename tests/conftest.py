"""Shared fixtures: small corpora, tiny trained runs and their SavedModels, model servers.

Everything is made by the tests themselves, small enough that the suite runs
in a few minutes on two CPU cores.

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
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from servers import ServerProcess

from keras_charrnn import cell_types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def make_corpus(n_words: int = 5000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    while n_words > 0:
        k = rng.randint(4, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)))
        n_words -= k
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


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


class TrainedRuns(dict):
    """Tiny trained run folders by cell type: ``CELLS``' made up front (``_trained_and_exported``), any other
    cell's trained in this process on first use."""

    def __init__(self, runs: dict[str, Path], tmp_path_factory, corpus_file: Path):
        super().__init__(runs)
        self.tmp_path_factory, self.corpus_file = tmp_path_factory, corpus_file

    def __missing__(self, cell: str) -> Path:
        from keras_charrnn.train import train

        run_dir = self.tmp_path_factory.mktemp(f"run_{cell}")
        train(self.corpus_file, run_dir, tiny_config(cell), verbose=0)
        self[cell] = run_dir
        return run_dir


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


@pytest.fixture(scope="session")
def _trained_and_exported(tmp_path_factory, corpus_file) -> tuple[dict[str, Path], Path]:
    """Every cell's tiny run (``tiny_config(cell)``) trained and exported, each cell in its own process, side by
    side: a tiny model's step is mostly one core's Python, so two cells train in about the time of one."""
    base = tmp_path_factory.mktemp("saved_models")
    runs = {cell: tmp_path_factory.mktemp(f"run_{cell}") for cell in CELLS}

    def make(cell):
        config = json.dumps(dataclasses.asdict(tiny_config(cell)))
        args = [corpus_file, runs[cell], base, cell, config]
        return subprocess.run(
            [sys.executable, "-c", TRAIN_AND_EXPORT, *map(str, args)], capture_output=True, text=True, timeout=900
        )

    for cell, done in zip(CELLS, side_by_side(*(functools.partial(make, cell) for cell in CELLS))):
        assert done.returncode == 0, f"training or exporting the {cell} run failed:\n{done.stderr[-3000:]}"
    return runs, base


@pytest.fixture(scope="session")
def trained_runs(_trained_and_exported, tmp_path_factory, corpus_file) -> dict[str, Path]:
    """One tiny trained run folder per cell type (``tiny_config(cell)`` on ``corpus_file``; ``TrainedRuns``)."""
    return TrainedRuns(_trained_and_exported[0], tmp_path_factory, corpus_file)


@pytest.fixture(scope="session")
def model_base(_trained_and_exported) -> Path:
    """saved_models/-style folder with one exported model per cell: NAME/1 (``export_run`` of its run)."""
    return _trained_and_exported[1]


@pytest.fixture(scope="session")
def model_dir(request, trained_runs, tmp_path_factory):
    """``model_dir(cell)``: the folder (NAME/1 inside) of the exported tiny run of ``cell``: ``model_base``'s for
    ``CELLS``, any other cell's exported on first use under a base of its own (no server polls it)."""
    from keras_charrnn.export import export_run

    more: dict[str, Path] = {}

    def get(cell: str) -> Path:
        if cell in CELLS:
            return request.getfixturevalue("model_base") / cell
        if cell not in more:
            more[cell] = export_run(trained_runs[cell], cell, tmp_path_factory.mktemp(f"saved_{cell}")).parent
        return more[cell]

    return get


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
