"""The same training code on every Keras backend (TensorFlow, JAX): fit carries the hidden state,
a run killed with SIGKILL resumes exactly, and the exported SavedModel computes what the trained model computes;
for Keras' LSTM and for the package's own layer-normalised LSTM (a cell written in ``keras.ops``).

Each backend trains in its own subprocess (``charrnn train --backend ...``), so this pytest
process stays on TensorFlow; the JAX tests are skipped only if JAX is not installed.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_corpus, run_cli, side_by_side

pytestmark = pytest.mark.slow  # every test here trains or starts processes

HAS_JAX = importlib.util.find_spec("jax") is not None
BACKENDS = ["tensorflow", pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax is not installed"))]
# A Keras layer and the package's own cell. A cell's tests share its runs (``full_runs``): they run on one
# pytest-xdist worker, each cell's on its own.
BACKEND_CELLS = [pytest.param(cell, marks=pytest.mark.xdist_group(f"backends_{cell}")) for cell in ("lstm", "lnlstm")]
# Variables in a run's checkpoint: embedding, per layer its weights (and Keras LSTM's seed state), 2 dropout seed
# states, 2 logits weights.
MODEL_VARIABLES = {"lstm": 1 + 2 * (3 + 1) + 2 + 2, "lnlstm": 1 + 2 * 8 + 2 + 2}
FLAGS = [
    "--units",
    "16",
    "--embedding-dim",
    "8",
    "--batch-size",
    "8",
    "--seq-len",
    "10",
    "--epochs",
    "3",
    "--checkpoint-every",
    "10",
    "--dropout",
    "0.1",
    "--lr",
    "3e-3",
    "--sample-chars",
    "0",
    "--quiet",
]

# Runs in the backend's own process: the trained model's logits and final states on a fixed batch.
LOGITS_SCRIPT = """
import sys, numpy as np, keras
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.model import get_states, reset_states
assert keras.backend.backend() == sys.argv[3], keras.backend.backend()
model = RunFolder(sys.argv[1]).load_model()
reset_states(model)
x = np.load(sys.argv[2])["x"]
logits = keras.ops.convert_to_numpy(model(x))
np.savez(sys.argv[2], x=x, logits=logits, **{f"state_{i}": s for i, s in enumerate(get_states(model))})
"""


def _env(backend):
    return {**os.environ, "KERAS_BACKEND": backend}


def _progress(path):
    with np.load(path) as data:
        return json.loads(str(data["progress"]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("backends") / "c.txt"
    path.write_text(make_corpus(3000, seed=3))
    return path


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, corpus):
    """``full_runs(backend, cell)``: one uninterrupted run per installed backend and cell, a cell's backends made
    side by side on its first use."""
    runs = {}

    def train(backend, cell):
        out = tmp_path_factory.mktemp(f"full_{backend}_{cell}") / "run"
        return out, run_cli("train", corpus, "--out", out, "--backend", backend, "--cell", cell, *FLAGS)

    def get(backend, cell):
        if (backend, cell) not in runs:
            backends = ["tensorflow", "jax"] if HAS_JAX else ["tensorflow"]
            done = side_by_side(*(lambda b=b: train(b, cell) for b in backends))
            runs.update({(name, cell): result for name, result in zip(backends, done)})
        out, done = runs[backend, cell]
        assert done.returncode == 0, done.stderr
        return out

    return get


@pytest.mark.parametrize("cell", BACKEND_CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fit_trains_and_carries_the_hidden_state_on_each_backend(full_runs, backend, cell):
    run = full_runs(backend, cell)
    history = _progress(run / "state.npz")["history"]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert json.loads((run / "config.json").read_text())["backend"] == backend  # what --resume keeps
    with np.load(run / "state.npz") as data:
        # The epoch-end checkpoint holds the training streams' state; a backend whose stateful layer
        # dropped its state updates (Keras' own layers on JAX) would leave zeros here.
        assert all(np.abs(data[k]).mean() > 1e-3 for k in data.files if k.startswith("state_"))
        # The same checkpoint layout on every backend, states saved once (MODEL_VARIABLES), 4 states.
        assert sum(k.startswith("model_") for k in data.files) == MODEL_VARIABLES[cell]
        assert sum(k.startswith("state_") for k in data.files) == 4


@pytest.mark.parametrize("cell", BACKEND_CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_sigkill_ends_with_the_same_weights_on_each_backend(full_runs, corpus, tmp_path, backend, cell):
    full = full_runs(backend, cell)
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "keras_charrnn.cli",
        "train",
        str(corpus),
        "--out",
        str(out),
        "--backend",
        backend,
        "--cell",
        cell,
        *FLAGS,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "state.npz"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill after the first epoch, part-way through a later one
        if state.is_file():  # written atomically: absent or complete
            p = _progress(state)
            if p["epoch"] >= 1 and p["step"] >= 10:
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _progress(state)
    assert killed_at["epoch"] < 3 and (killed_at["epoch"], killed_at["step"]) > (0, 0), killed_at

    resumed = run_cli("train", corpus, "--out", out, "--resume", "--quiet")  # --backend auto: the recorded one
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"charrnn train: {out}, backend {backend} (the backend this run trains on)")
    with np.load(full / "state.npz") as a, np.load(state) as b:
        assert a.files == b.files
        for key in a.files:
            if key != "progress":
                assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("cell", BACKEND_CELLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_savedmodel_exported_from_each_backends_run_computes_the_trained_models_logits(
    full_runs, tmp_path, backend, cell
):
    run = full_runs(backend, cell)
    batch = tmp_path / "batch.npz"
    np.savez(batch, x=np.random.RandomState(0).randint(0, 20, size=(8, 10)).astype(np.int32))
    done, exported = side_by_side(  # the logits in the backend's own process, and the export beside it
        lambda: subprocess.run(
            [sys.executable, "-c", LOGITS_SCRIPT, str(run), str(batch), backend],
            env=_env(backend),
            capture_output=True,
            text=True,
            timeout=300,
        ),
        lambda: run_cli("export", run, "--name", "m", "--base-path", tmp_path / "models"),
    )
    assert done.returncode == 0, done.stderr
    assert exported.returncode == 0, exported.stderr

    trained = np.load(batch)
    step = tf.saved_model.load(str(tmp_path / "models" / "m" / "1")).signatures["step"]
    zeros = {name: tf.zeros([8, 16]) for name in ("h_0", "c_0", "h_1", "c_1")}
    out = step(ids=tf.constant(trained["x"]), **zeros)
    np.testing.assert_allclose(out["logits"].numpy(), trained["logits"], atol=1e-5)
    for i, name in enumerate(("h_0", "c_0", "h_1", "c_1")):
        np.testing.assert_allclose(out[name].numpy(), trained[f"state_{i}"], atol=1e-5)


NO_TENSORFLOW_SCRIPT = """
import sys
sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
from keras_charrnn.config import TrainConfig
from keras_charrnn.train import train
train(sys.argv[1], sys.argv[2], TrainConfig(units=16, embedding_dim=8, batch_size=8, seq_len=10, epochs=1,
                                            sample_chars=0, checkpoint_every=5), verbose=0)
"""


@pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")
def test_training_on_jax_needs_no_tensorflow(corpus, tmp_path):
    # The training path is plain Keras: on JAX it runs where TensorFlow is not installed (a JAX-only GPU box).
    done = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW_SCRIPT, str(corpus), str(tmp_path / "run")],
        env=_env("jax"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert _progress(tmp_path / "run" / "state.npz")["epoch"] == 1
