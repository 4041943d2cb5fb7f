"""Shared fixtures: small corpora, tiny trained runs and their SavedModels, model servers.

Everything is made by the tests themselves, small enough that the suite runs
in a few minutes on two CPU cores.
"""

from __future__ import annotations

import contextlib
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
    """Tiny trained run folders by cell type: ``CELLS``' trained at once, any other cell's on first use."""

    def __init__(self, tmp_path_factory, corpus_file: Path):
        super().__init__()
        self.tmp_path_factory, self.corpus_file = tmp_path_factory, corpus_file
        for cell in CELLS:  # up front: tests read these from threads
            self[cell]

    def __missing__(self, cell: str) -> Path:
        from keras_charrnn.train import train

        run_dir = self.tmp_path_factory.mktemp(f"run_{cell}")
        train(self.corpus_file, run_dir, tiny_config(cell), verbose=0)
        self[cell] = run_dir
        return run_dir


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, corpus_file) -> dict[str, Path]:
    """One tiny trained run folder per cell type (``TrainedRuns``)."""
    return TrainedRuns(tmp_path_factory, corpus_file)


@pytest.fixture(scope="session")
def model_base(tmp_path_factory, trained_runs) -> Path:
    """saved_models/-style folder with one exported model per cell: NAME/1."""
    from keras_charrnn.export import export_run

    base = tmp_path_factory.mktemp("saved_models")
    for cell in CELLS:
        export_run(trained_runs[cell], cell, base)
    return base


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
def server(model_base, tmp_path_factory):
    """A model server for every cell's model; yields its port.

    One for the whole session: the tests that use it only call it (its log is not read, nothing is
    written under model_base), so each test file need not wait for its own to start.
    """
    config = write_models_config(tmp_path_factory.mktemp("cfg") / "models.config", model_base, CELLS)
    with ServerProcess(["--model_config_file", config]) as process:
        yield process.port


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
