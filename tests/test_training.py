"""Training through Keras fit: state carry-over, clipping, learning, resume, divergence, CLI errors."""

import csv
import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import CELLS, make_corpus, run_cli, tiny_config
from keras_charrnn.batching import TBPTTBatches
from keras_charrnn.callbacks import ResetStates
from keras_charrnn.config import TrainConfig
from keras_charrnn.errors import CharRNNError
from keras_charrnn.export import CharRNNModule
from keras_charrnn.model import build_model, get_states, state_names
from keras_charrnn.train import make_optimizer, train
from keras_charrnn.vocab import Vocabulary


@pytest.mark.parametrize("cell", CELLS)
def test_state_after_fit_equals_stepping_the_streams_by_hand(cell):
    text = make_corpus(800)
    vocab = Vocabulary.from_text(text)
    batches = TBPTTBatches(vocab.encode(text), batch_size=4, seq_len=12)
    k = 5
    model = build_model(vocab.size, cell=cell, units=16, batch_size=4, seq_len=12)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(_first(batches, k), shuffle=False, verbose=0,
              callbacks=[ResetStates()])
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
    momentum = opt.variables[[v.path for v in opt.variables].index(next(v.path for v in opt.variables if "momentum" in v.path))]
    # Adam's first moment after one step is (1 - beta_1) * the gradient it saw: the clipped one.
    np.testing.assert_allclose(momentum.numpy(), 0.1 * grad * (5.0 / 500.0), rtol=1e-5)


def test_clip_value_limits_each_gradient_element():
    var, opt = _grads_and_opt(TrainConfig(clip_norm=None, clip_value=0.5, lr_schedule="constant"))
    grad = np.array([10.0, -10.0, 0.2, -3.0], np.float32)
    opt.apply_gradients([(tf.constant(grad), var)])
    momentum = next(v for v in opt.variables if "momentum" in v.path)
    np.testing.assert_allclose(momentum.numpy(), 0.1 * np.clip(grad, -0.5, 0.5), rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
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


def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(make_corpus(6000, seed=3))
    flags = ["--units", "16", "--embedding-dim", "8", "--batch-size", "8", "--seq-len", "16", "--epochs", "2",
             "--checkpoint-every", "10", "--dropout", "0.1", "--lr", "3e-3", "--quiet"]
    full = run_cli("train", corpus, "--out", tmp_path / "full", *flags)
    assert full.returncode == 0, full.stderr

    cmd = [sys.executable, "-m", "keras_charrnn.cli", "train", str(corpus), "--out", str(tmp_path / "killed"), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "state.npz"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill mid-way through the second epoch
        try:
            p = _progress(state)
            if p["epoch"] == 1 and p["step"] >= 10:
                break
        except Exception:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _progress(state)
    assert killed_at["epoch"] == 1 and 0 < killed_at["step"], killed_at

    resumed = run_cli("train", corpus, "--out", tmp_path / "killed", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    with np.load(tmp_path / "full" / "state.npz") as a, np.load(state) as b:
        for key in a.files:
            if key != "progress":
                assert np.array_equal(a[key], b[key]), key


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file):
    class Poison(keras.callbacks.Callback):  # a weight turns NaN after batch 5, as in a blow-up
        def on_train_batch_end(self, batch, logs=None):
            if batch == 4:
                kernel = self.model.get_layer("logits").kernel
                kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    config = tiny_config("lstm", checkpoint_every=1, epochs=2)
    with pytest.raises(CharRNNError, match="diverged: loss became nan at epoch 1, batch 6"):
        train(corpus_file, tmp_path / "run", config, callbacks=[Poison()], verbose=0)
    with np.load(tmp_path / "run" / "state.npz") as data:
        assert json.loads(str(data["progress"]))["step"] == 5
        assert all(np.isfinite(data[k]).all() for k in data.files if k.startswith("model_"))


def _one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charrnn: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_bad_inputs_get_one_line_errors(tmp_path, corpus_file):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\x80def")
    _one_line_error(run_cli("train", tmp_path / "missing.txt", "--out", tmp_path / "r"), "missing.txt")
    _one_line_error(run_cli("train", bad, "--out", tmp_path / "r"), "bad.txt", "byte offset 3")
    _one_line_error(run_cli("train", corpus_file, "--out", tmp_path / "r", "--batch-size", "4096"), "too short")
    _one_line_error(run_cli("train", corpus_file, "--out", tmp_path / "r", "--lr", "-1"), "--lr")
    _one_line_error(run_cli("train", corpus_file, "--out", tmp_path / "r", "--units", "many"), "--units")
    _one_line_error(run_cli("train", corpus_file, "--out", tmp_path / "r", "--val-frac", "1.5"), "--val-frac")
    _one_line_error(run_cli("train", corpus_file, "--out", tmp_path / "nothing", "--resume"), "nothing to resume")
    _one_line_error(run_cli("train", corpus_file, "--out", tmp_path / "r", "--cell", "transformer"), "--cell")
