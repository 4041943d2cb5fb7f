"""Training through Keras fit: state carry-over, clipping, learning, resume, divergence, CLI errors."""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ALL_CELLS, in_background, make_corpus, run_cli, side_by_side, tiny_config
from keras_charrnn.tbptt import TBPTTBatches
from keras_charrnn.callbacks import ResetStates
from keras_charrnn.config import TrainConfig
from keras_charrnn.cli import build_parser
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.fileio import atomic_write_dir, atomic_write_text
from keras_charrnn.inprocess import load
from keras_charrnn.export import CharRNNModule
from keras_charrnn.model import build_model, get_states, make_optimizer, state_names
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.train import TrainingDiverged, train
from keras_charrnn.vocab import Vocabulary


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_state_after_fit_equals_stepping_the_streams_by_hand(cell):
    text = make_corpus(800)
    vocab = Vocabulary.from_text(text)
    batches = TBPTTBatches(vocab.encode(text), batch_size=4, seq_len=12)
    k = 5
    # Seeded weights: unseeded, they (and the states compared below) would depend on which tests ran before in
    # this process. lnlstm's states grow to about 5 here, and for some weights the two paths then differ by a
    # little over 1e-5 (float32 rounding over 60 steps): see BENCHMARKS.md, "Test suite".
    keras.utils.set_random_seed(11)
    model = build_model(vocab.size, cell=cell, units=16, batch_size=4, seq_len=12)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(_first(batches, k), shuffle=False, verbose=0, callbacks=[ResetStates()])
    fitted = get_states(model)

    # By hand: each row's whole stream (k windows) through the stateless exported math, from zeros.
    module = CharRNNModule(model, vocab)
    stream = np.concatenate([batches[i][0] for i in range(k)], axis=1)
    zeros = [tf.zeros([4, 16]) for _ in state_names(cell, 2)]
    out = module.step_function(tf.constant(stream), *zeros)
    for name, value in zip(state_names(cell, 2), fitted):
        np.testing.assert_allclose(out[name].numpy(), value, atol=1e-5)


def _first(batches, k):
    class Head(keras.utils.PyDataset):
        def __len__(self):
            return k

        def __getitem__(self, i):
            return batches[i]

    return Head()


def _grads_and_opt(config):
    var = keras.Variable(np.zeros(4, np.float32))
    opt = make_optimizer(config, total_steps=10)
    opt.build([var])
    return var, opt


def test_clip_norm_limits_the_global_gradient_norm():
    var, opt = _grads_and_opt(TrainConfig(clip_norm=5.0, lr_schedule="constant"))
    grad = np.array([300.0, 400.0, 0.0, 0.0], np.float32)  # norm 500
    opt.apply_gradients([(tf.constant(grad), var)])
    paths = [v.path for v in opt.variables]
    momentum = opt.variables[paths.index(next(path for path in paths if "momentum" in path))]
    # Adam's first moment after one step is (1 - beta_1) * the gradient it saw: the clipped one.
    np.testing.assert_allclose(momentum.numpy(), 0.1 * grad * (5.0 / 500.0), rtol=1e-5)


def test_clip_value_limits_each_gradient_element():
    var, opt = _grads_and_opt(TrainConfig(clip_norm=None, clip_value=0.5, lr_schedule="constant"))
    grad = np.array([10.0, -10.0, 0.2, -3.0], np.float32)
    opt.apply_gradients([(tf.constant(grad), var)])
    momentum = next(v for v in opt.variables if "momentum" in v.path)
    np.testing.assert_allclose(momentum.numpy(), 0.1 * np.clip(grad, -0.5, 0.5), rtol=1e-5)


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_each_cell_drives_the_loss_down(trained_runs, cell):
    rows = list(csv.DictReader(open(trained_runs[cell] / "log.csv")))
    assert len(rows) == 2
    first, last = float(rows[0]["val_loss"]), float(rows[-1]["val_loss"])
    assert last < first
    vocab = Vocabulary.load(trained_runs[cell] / "vocab.json")
    assert last < 0.75 * np.log(vocab.size)  # well below guessing uniformly
    assert float(rows[-1]["val_bpc"]) == pytest.approx(last / np.log(2))
    assert (trained_runs[cell] / "curves.png").stat().st_size > 1000
    assert (trained_runs[cell] / "best.keras").is_file()


@pytest.mark.slow
def test_run_folder_and_any_keras_callback_work_beside_ours(tmp_path, corpus_file):
    seen = []
    extra = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(sorted(logs)))
    train(corpus_file, tmp_path / "run", tiny_config("gru", epochs=1, tensorboard=True), callbacks=[extra], verbose=0)
    assert seen and {"loss", "val_loss", "val_bpc", "val_perplexity"} <= set(seen[0])
    assert any((tmp_path / "run" / "tensorboard").rglob("*events*"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["cell"] == "gru"


def _progress(path):
    with np.load(path) as data:
        return json.loads(str(data["progress"]))


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(6000, seed=3))
    flags = [
        "--units",
        "16",
        "--embedding-dim",
        "8",
        "--batch-size",
        "8",
        "--seq-len",
        "16",
        "--epochs",
        "2",
        "--checkpoint-every",
        "10",
        "--dropout",
        "0.1",
        "--lr",
        "3e-3",
        "--quiet",
    ]
    cmd = [sys.executable, "-m", "keras_charrnn.cli", "train", str(corpus), "--out", str(tmp_path / "killed"), *flags]
    with in_background(lambda: run_cli("train", corpus, "--out", tmp_path / "full", *flags)) as full:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = tmp_path / "killed" / "state.npz"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill mid-way through the second epoch
            if state.is_file():  # written atomically: absent or complete
                p = _progress(state)
                if p["epoch"] == 1 and p["step"] >= 10:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    full = full.result()
    assert full.returncode == 0, full.stderr
    killed_at = _progress(state)
    assert killed_at["epoch"] == 1 and 0 < killed_at["step"], killed_at

    resumed = run_cli("train", corpus, "--out", tmp_path / "killed", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    with np.load(tmp_path / "full" / "state.npz") as a, np.load(state) as b:
        for key in a.files:
            if key != "progress":
                assert np.array_equal(a[key], b[key]), key


@pytest.mark.slow
def test_divergence_keeps_the_weights_from_before_the_bad_update(tmp_path, corpus_file):
    good = {}

    class BlowUp(keras.callbacks.Callback):  # the update of batch 6 uses an infinite learning rate
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                good["weights"] = [np.array(v.numpy()) for v in self.model.variables]
                self.model.optimizer.learning_rate = float("inf")

    config = tiny_config("lstm", checkpoint_every=1, epochs=2, lr_schedule="constant")
    # Batch 6's loss is still finite (computed before its update); batch 7's is not.
    with pytest.raises(TrainingDiverged, match=r"diverged: loss became (nan|inf) at epoch 1, batch 7"):
        train(corpus_file, tmp_path / "run", config, callbacks=[BlowUp()], verbose=0)
    with np.load(RunFolder(tmp_path / "run").state_path) as data:
        assert json.loads(str(data["progress"]))["step"] == 5
        saved = [data[f"model_{i}"] for i in range(len(good["weights"]))]
    assert all(np.isfinite(w).all() for w in saved)
    for before, after in zip(good["weights"], saved):
        assert np.array_equal(before, after)


def _one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charrnn: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_cli_bad_inputs_get_one_line_errors(tmp_path, corpus_file):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\x80def")
    (tmp_path / "a_file").write_text("")
    cases = [
        (tmp_path / "missing.txt", "r1", (), ("missing.txt",)),
        (bad, "r2", (), ("bad.txt", "byte offset 3")),
        (corpus_file, "r3", ("--batch-size", "4096"), ("too short",)),
        (corpus_file, "r4", ("--lr", "-1"), ("lr must be positive",)),
        (corpus_file, "r5", ("--units", "many"), ("--units",)),
        (corpus_file, "r6", ("--val-frac", "1.5"), ("val_frac must be in [0, 1)",)),
        (corpus_file, "nothing", ("--resume",), ("nothing to resume",)),
        (corpus_file, "r8", ("--cell", "transformer"), ("--cell",)),
        (corpus_file, "a_file", ("--batch-size", "4", "--seq-len", "8"), ("a_file: cannot write the run folder",)),
    ]
    # Each case has its own --out folder, so the commands run side by side.
    results = side_by_side(
        *(
            lambda corpus=corpus, out=out, flags=flags: run_cli("train", corpus, "--out", tmp_path / out, *flags)
            for corpus, out, flags, _ in cases
        )
    )
    for result, (*_, fragments) in zip(results, cases):
        _one_line_error(result, *fragments)


def _copy_run(trained_runs, tmp_path):
    return RunFolder(shutil.copytree(trained_runs["lstm"], tmp_path / "copy"))


def test_truncated_checkpoint_gives_a_one_line_error_naming_the_file(trained_runs, corpus_file, tmp_path):
    run = _copy_run(trained_runs, tmp_path)
    data = run.state_path.read_bytes()
    run.state_path.write_bytes(data[: len(data) // 2])
    _one_line_error(run_cli("train", corpus_file, "--out", run.path, "--resume"), str(run.state_path))
    with pytest.raises(InputError, match="state.npz: unreadable checkpoint"):
        run.load_model("latest")


def test_corrupted_best_model_gives_an_input_error_naming_the_file(trained_runs, tmp_path):
    run = _copy_run(trained_runs, tmp_path)
    run.best_path.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(InputError, match="best.keras: unreadable model"):
        run.load_model("best")


def test_run_folder_reports_its_config_vocab_and_progress(trained_runs, tmp_path):
    run = RunFolder(trained_runs["gru"])
    record = run.record()
    assert record["config"]["cell"] == "gru" and record["epochs_done"] == 2
    with open(run.log_path) as log:
        best = min(float(r["val_loss"]) for r in csv.DictReader(log))
    assert record["best_val_loss"] == pytest.approx(best)
    assert run.config() == tiny_config("gru")
    assert run.vocab().size == record["vocab_size"] == run.load_model().get_layer("logits").units
    assert RunFolder.is_run(run.path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert not RunFolder.is_run(tmp_path)
    with pytest.raises(InputError, match="not a run folder"):
        RunFolder(tmp_path / "nothing").record()
    with pytest.raises(ConfigError, match="which must be"):
        run.load_model("newest")


def test_train_flags_come_from_train_config_with_their_defaults():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a for a in train_parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert flags[f.name].option_strings == ["--" + f.name.replace("_", "-")]
        assert flags[f.name].default == f.default
    assert "(default: 32)" in train_parser.format_help().replace("\n", " ")
    args = build_parser().parse_args(["train", "c.txt", "--out", "r", "--batch-size", "7", "--clip-value", "0.5"])
    assert args.batch_size == 7 and args.clip_value == 0.5


def test_bad_config_names_the_parameter_not_the_flag():
    with pytest.raises(ConfigError, match="^val_frac must be"):
        TrainConfig(val_frac=2).validate()
    with pytest.raises(ConfigError, match="^use clip_norm or clip_value"):
        TrainConfig(clip_norm=1.0, clip_value=1.0).validate()


def test_clip_value_turns_off_clip_norm_alike_in_python_on_the_command_line_and_on_resume():
    from keras_charrnn.config import resume_changes

    args = build_parser().parse_args(["train", "c.txt", "--out", "r", "--clip-value", "0.5"])
    from_flags = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    assert from_flags == TrainConfig(clip_value=0.5)
    assert (from_flags.clip_norm, from_flags.clip_value) == (None, 0.5)
    from_flags.validate()
    resumed, changed = resume_changes(TrainConfig(clip_norm=1.0), {"clip_value": 0.5})
    assert (resumed.clip_norm, resumed.clip_value) == (None, 0.5) and changed["clip_norm"] == (1.0, None)


def test_atomic_writes_fsync_the_data_and_then_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".a.txt.")) and synced[1] == str(tmp_path)

    synced.clear()

    def fill(folder):
        os.mkdir(os.path.join(folder, "variables"))
        for name in ("saved_model.pb", "variables/v.index"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("x")

    atomic_write_dir(tmp_path / "1", fill)
    names = [os.path.basename(p) for p in synced]
    assert {"saved_model.pb", "v.index", "variables"} <= set(names)
    # the temp folder, then after the rename its parent
    assert names[-2].startswith(".1.") and synced[-1] == str(tmp_path)
    assert (tmp_path / "1" / "variables" / "v.index").read_text() == "x"


def test_train_help_shows_every_default():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(train_parser.format_help().split())
    for action in train_parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.required or "(default:" in " ".join(action.help.split()), action.dest
        assert " ".join(action.help.split()).split("(default:")[0].strip()[:30] in text


@pytest.mark.slow
def test_samples_txt_grows_each_epoch_with_the_exported_models_text(tmp_path, corpus_file):
    run = RunFolder(tmp_path / "run")
    sizes = []
    watch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: sizes.append(run.samples_path.stat().st_size)
    )
    train(corpus_file, run.path, tiny_config("gru", sample_chars=40, sample_every=100), callbacks=[watch], verbose=0)
    assert len(sizes) == 2 and 0 < sizes[0] < sizes[1]
    text = run.samples_path.read_text(encoding="utf-8")
    for title in (
        "=== epoch 1, batch 100 ===",
        "=== epoch 1 end, val_loss",
        "=== epoch 2, batch 100 ===",
        "=== epoch 2 end, val_loss",
    ):
        assert text.count(title) == 1, title
    # The last sample is what the exported model of the final weights generates with the same settings.
    final = text.split("=== epoch 2 end")[1]
    model = load(run.path, which="latest")
    for temperature in (0.5, 0.8, 1.0):
        expected = model.generate("\n", 40, temperature=temperature, seed=0)
        assert f"--- temperature {temperature} ---\n\n{expected}\n" in final


@pytest.mark.slow
def test_progress_line_and_keras_bar_do_not_print_the_same_facts_twice(tmp_path, corpus_file, capsys):
    config = tiny_config("rnn", epochs=1, sample_chars=0)
    train(corpus_file, tmp_path / "bar", config, verbose=1)
    bar = capsys.readouterr().out
    assert bar.count("val_bpc") == 1 and bar.count("chars_per_s") == 1 and bar.count("val_loss") == 1
    assert "epoch 1/1:" not in bar
    train(corpus_file, tmp_path / "quiet", config, verbose=0)
    quiet = capsys.readouterr().out
    assert quiet.count("epoch 1/1: loss") == 1 and quiet.count("val_bpc") == 1 and "chars/s" in quiet
    assert "━" not in quiet


def test_resume_applies_flags_that_may_change_and_refuses_the_rest(trained_runs, corpus_file, tmp_path):
    run = _copy_run(trained_runs, tmp_path)
    refused = run_cli(
        "train",
        corpus_file,
        "--out",
        run.path,
        "--resume",
        "--units",
        "32",
        "--cell",
        "gru",
        "--epochs",
        "3",
        "--seq-len",
        "16",
    )
    _one_line_error(refused, "cell (lstm -> gru)", "units (24 -> 32)", "may change epochs")
    assert "seq_len" not in refused.stderr  # given, but the same as the run's
    assert run.config() == tiny_config("lstm")

    resumed = run_cli(
        "train",
        corpus_file,
        "--out",
        run.path,
        "--resume",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--sample-chars",
        "0",
        "--quiet",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of 3 epochs done; changed: epochs 2 -> 3; sample_chars 200 -> 0" in resumed.stdout
    assert run.config() == tiny_config("lstm", epochs=3, sample_chars=0)
    assert len(list(csv.DictReader(open(run.log_path)))) == 3


@pytest.mark.slow
def test_folder_and_glob_corpora_train_and_resume_checks_their_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(make_corpus(1200, seed=1), encoding="utf-8")
    (src / "b.txt").write_text(make_corpus(1200, seed=2), encoding="utf-8")
    (src / "x.bin").write_bytes(b"\x00\xff\xfe")
    run = RunFolder(tmp_path / "run")
    train(src, run.path, tiny_config("rnn", epochs=1, sample_chars=0), verbose=0)
    corpus = run.record()["corpus"]
    assert corpus["files"] == ["a.txt", "b.txt"] and corpus["skipped"] == ["x.bin"]

    # The same joined text through a glob continues the run.
    train(str(src / "*.txt"), run.path, resume=True, changes={"epochs": 2}, verbose=0)
    assert run.record()["epochs_done"] == 2
    (src / "c.txt").write_text("one more file", encoding="utf-8")
    with pytest.raises(InputError, match=r"not the corpus this run was trained on \(.*\) \(new files: c\.txt\)"):
        train(src, run.path, resume=True, verbose=0)
    _one_line_error(run_cli("train", src, "--out", tmp_path / "strict", "--strict"), "x.bin", "not valid UTF-8")
