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

from conftest import interactive_transcript, run_cli, side_by_side
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


# ----- charrnn sample: stops, scores, samples, bias, JSON (issue 24) ------------------------------------------

PRIME, STOPS, SEED = "the ", (" a", "s\n"), 7
STOP_FLAGS = ["--stop", " a", "--stop", "s\\n"]  # "\n" typed as backslash-n: the CLI reads the escape


def _sample(model_dir, *flags):
    return lambda: run_cli("sample", "--model", model_dir, "--prime", PRIME, "-n", 120, "--seed", SEED, *flags)


def test_sample_ends_at_a_stop_strips_it_and_prints_samples_and_scores_as_in_process(model_base):
    from keras_charrnn.inprocess import load

    lstm = model_base / "lstm"
    plain, stripped, samples, banned = side_by_side(
        _sample(lstm, *STOP_FLAGS),
        _sample(lstm, *STOP_FLAGS, "--strip-stop"),
        _sample(lstm, *STOP_FLAGS, "--num-samples", 3, "--json", "--top-logprobs", 3),
        _sample(lstm, "--bias", "aeiou=-100", "--bias", "\\n=-100", "-n", 200),
    )
    model = load(lstm)
    expected = model.complete(PRIME, 120, logprobs=3, stop=STOPS, seed=SEED)
    assert expected.finish_reason == "stop"  # the stops occur: the test ends a row early
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == PRIME + expected.text + "\n"
    finish = f"sample 0 (seed {SEED}): stop at {expected.stop!r} after {expected.num_chars} characters"
    assert plain.stderr.splitlines()[-1] == finish  # the finish reason on stderr, one line
    assert stripped.stdout == PRIME + expected.text_without_stop + "\n"
    assert expected.text.endswith(expected.stop) and stripped.returncode == 0

    records = [json.loads(line) for line in samples.stdout.splitlines()]
    assert samples.returncode == 0 and "sample 0" not in samples.stderr, samples.stderr  # --json: stdout only
    assert [r["index"] for r in records] == [0, 1, 2] and len({r["seed"] for r in records}) == 3
    assert records[0]["text"] == expected.text and records[0]["seed"] == SEED  # sample 0: the plain --seed text
    for record, done in zip(records, model.samples(PRIME, 3, 120, logprobs=3, stop=STOPS, seed=SEED)):
        want = done.to_dict()
        assert {k: record[k] for k in ("text", "finish_reason", "stop", "num_chars", "seed")} == {
            k: want[k] for k in ("text", "finish_reason", "stop", "num_chars", "seed")
        }
        assert record["logprobs"] == pytest.approx(want["logprobs"], abs=1e-5)
        assert len(record["top_logprobs"]) == record["num_chars"]
        for got, top in zip(record["top_logprobs"], want["top_logprobs"]):
            assert got.keys() == top.keys() and list(got.values()) == pytest.approx(list(top.values()), abs=1e-5)
    assert records[0]["logprobs"] == pytest.approx(expected.logprobs, abs=1e-5)

    assert banned.returncode == 0, banned.stderr
    text = banned.stdout[len(PRIME) : -1]
    assert len(text) == 200 and not set(text) & set("aeiou\n")
    assert text == model.generate(PRIME, 200, seed=SEED, bias={c: -100 for c in "aeiou\n"})


def test_sample_refuses_bad_stops_and_biases_in_one_line(model_base):
    lstm = model_base / "lstm"
    cases = [
        (["--stop", "Z"], "outside the model's vocabulary"),
        (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], "at most 4 stop strings"),
        (["--stop", "x" * 33], "at most 32 characters"),
        (["--bias", "abc"], "CHARACTERS=VALUE"),
        (["--bias", "a=-101"], "[-100, 100]"),
        (["--top-logprobs", "11"], "at most 10"),
    ]
    for result, (_, fragment) in zip(side_by_side(*(_sample(lstm, *flags) for flags, _ in cases)), cases):
        assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
        assert result.stderr.startswith("charrnn: error: ") and len(result.stderr.strip().splitlines()) == 1
        assert fragment in result.stderr, result.stderr


def test_interactive_sample_answers_until_a_blank_line_and_feeds_the_reply_at_the_stop(model_base):
    from keras_charrnn.inprocess import load

    flags = ["--bias", "\\n=3"]  # newlines likelier: a blank line comes soon
    result = run_cli(
        "sample", "--model", model_base / "lstm", "--interactive", "-n", 300, "--seed", 1, *flags,
        input="the lazy\n\nseven cats\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    session = load(model_base / "lstm").session("the lazy\n", seed=1, bias={"\n": 3.0}, stop="\n\n")
    answers = [session.generate(300)]
    assert session.last.finish_reason == "stop" and answers[0].endswith("\n\n")
    answers.append(session.generate(300))  # an empty line: the model goes on, to the next blank line
    session.feed("seven cats\n")  # the reply goes into the state where the answer stopped
    answers.append(session.generate(300))
    assert result.stdout == interactive_transcript(result.stdout, answers)
    assert "until '\\n\\n'" in result.stdout.split("\n", 1)[0]
