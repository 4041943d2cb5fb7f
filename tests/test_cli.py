"""The ``charrnn`` command ends cleanly where a user's shell or install gets in its way."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pty
import re
import subprocess
import sys

import pytest

from conftest import run_cli, side_by_side
from keras_charrnn import cli


def test_sample_piped_into_head_stops_quietly_with_status_0(model_base):
    sampler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keras_charrnn.cli",
            "sample",
            "--model",
            str(model_base / "lstm"),
            "--prime",
            "the ",
            "-n",
            "100000",
            "--chunk",
            "8",
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = subprocess.Popen(["head", "-c", "20"], stdin=sampler.stdout, stdout=subprocess.PIPE)
    sampler.stdout.close()  # head holds the only read end: when it exits, the sampler's next write fails
    shown, _ = head.communicate(timeout=300)
    errors = sampler.stderr.read().decode()
    assert sampler.wait(timeout=300) == 0, errors
    assert shown.startswith(b"the ") and len(shown) == 20
    assert "Traceback" not in errors and "BrokenPipe" not in errors, errors


def test_the_jax_backend_without_jax_installed_is_a_one_line_config_error(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else find_spec(name, *a))
    assert cli.main(["train", "corpus.txt", "--out", "run", "--backend", "jax"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("charrnn: error: backend 'jax' needs") and "pip install 'keras-charrnn[jax]'" in error
    assert len(error.strip().splitlines()) == 1


TINY = [
    "--units",
    "16",
    "--embedding-dim",
    "8",
    "--batch-size",
    "8",
    "--seq-len",
    "10",
    "--epochs",
    "2",
    "--sample-chars",
    "12",
    "--checkpoint-every",
    "50",
]
EPOCH_LINE = re.compile(r"epoch [12]/2: loss \d+\.\d{4}  bpc \d+\.\d{4}  val_loss .* chars/s  \d+s")


def _train_in_a_terminal(corpus, out) -> tuple[int, str]:
    """``charrnn train`` with standard output on a pseudo-terminal; returns its exit status and what it showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_charrnn.cli", "train", str(corpus), "--out", str(out), *TINY],
        stdout=follower,
        stderr=subprocess.DEVNULL,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    return proc.wait(timeout=300), shown.decode("utf-8", "replace")


@pytest.mark.slow
def test_train_writes_plain_lines_into_a_log_and_keeps_the_bar_in_a_terminal(tmp_path, corpus_file):
    piped, (status, terminal) = side_by_side(
        lambda: run_cli("train", corpus_file, "--out", tmp_path / "log", *TINY),
        lambda: _train_in_a_terminal(corpus_file, tmp_path / "tty"),
    )
    assert piped.returncode == 0 and status == 0, piped.stderr
    log = piped.stdout
    assert not re.search(r"[\x1b\r\x08]", log) and "━" not in log and "Epoch 1/2" not in log
    lines = log.splitlines()
    assert lines[0] == f"charrnn train: {tmp_path / 'log'}, backend tensorflow (faster than jax below 512 units)"
    epoch_lines = [line for line in lines if EPOCH_LINE.fullmatch(line)]
    assert len(epoch_lines) == 2 and [line for line in lines if line.startswith("epoch ")] == epoch_lines
    assert log.count("=== epoch 2 end, val_loss") == 1 and log.count("--- temperature 0.8 ---") == 2
    assert lines[-1].startswith(f"run saved in {tmp_path / 'log'}")
    # The terminal keeps Keras' bar (drawn with escape codes) and shows no extra epoch line.
    assert "Epoch 1/2" in terminal and "━" in terminal and "\x1b[" in terminal
    assert not any(EPOCH_LINE.fullmatch(line.strip()) for line in terminal.splitlines())
    assert "=== epoch 2 end, val_loss" in terminal
    for run in ("log", "tty"):
        assert json.loads((tmp_path / run / "config.json").read_text())["backend"] == "tensorflow"


def _args(**given) -> argparse.Namespace:
    values = {"resume": False, "out": "run", "distribute": None, "units": 512, **given}
    return argparse.Namespace(**values)


@pytest.fixture()
def fresh_process(monkeypatch):
    """``auto_backend`` as in a new ``charrnn`` process: Keras not imported yet, no $KERAS_BACKEND."""
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.delenv("KERAS_BACKEND", raising=False)

    def installed(*names):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: find_spec(name, *a) if name in names else None
        )

    return installed


def test_auto_backend_picks_jax_where_it_is_installed_and_faster_and_tensorflow_elsewhere(fresh_process, monkeypatch):
    fresh_process("jax", "tensorflow")
    assert cli.auto_backend(_args()) == ("jax", "faster than tensorflow at 512+ units")
    assert cli.auto_backend(_args(units=256))[0] == "tensorflow"
    assert cli.auto_backend(_args(distribute="mirrored")) == ("tensorflow", "--distribute needs TensorFlow")
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert cli.auto_backend(_args()) == ("tensorflow", "$KERAS_BACKEND")
    monkeypatch.delenv("KERAS_BACKEND")
    fresh_process("tensorflow")
    assert cli.auto_backend(_args()) == ("tensorflow", "jax is not installed")


def test_a_resumed_run_keeps_its_recorded_backend_or_names_it_when_it_is_missing(
    fresh_process, tmp_path, corpus_file, capsys
):
    from keras_charrnn.config import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    record = {"config": dataclasses.asdict(TrainConfig(units=16)), "corpus": {}, "vocab_size": 3, "backend": "jax"}
    (run / "config.json").write_text(json.dumps(record))
    fresh_process("jax", "tensorflow")
    assert cli.auto_backend(_args(resume=True, out=str(run), units=16)) == ("jax", "the backend this run trains on")
    fresh_process("tensorflow")
    assert cli.main(["train", str(corpus_file), "--out", str(run), "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("charrnn: error: backend: this run trains on 'jax', which is not installed here")
    assert len(error.strip().splitlines()) == 1
    del record["backend"]  # a run from before 0.2.0: the default it trained on then
    (run / "config.json").write_text(json.dumps(record))
    assert cli.auto_backend(_args(resume=True, out=str(run)))[0] == "tensorflow"
