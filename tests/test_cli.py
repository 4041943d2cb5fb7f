"""The ``charrnn`` command ends cleanly where a user's shell or install gets in its way."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from keras_charrnn import cli


def test_sample_piped_into_head_stops_quietly_with_status_0(model_base):
    sampler = subprocess.Popen([sys.executable, "-m", "keras_charrnn.cli", "sample",
                                "--model", str(model_base / "lstm"),
                                "--prime", "the ", "-n", "100000", "--chunk", "8", "--seed", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
