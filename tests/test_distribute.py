"""Distributed training under tf.distribute: each replica owns a contiguous share of the streams and their
hidden state, and the result is the single-device run's.

Every run is a ``charrnn train`` subprocess: logical CPU devices (``CHARRNN_LOGICAL_CPUS``) and
``MultiWorkerMirroredStrategy`` must be set up before TensorFlow starts, which the pytest process
has done already. The multi-worker test runs two workers on 127.0.0.1 with ``TF_CONFIG``; killing
one mid-run, resuming both and comparing with one process is a single test, to keep the slow
part (two processes talking gRPC on a loaded machine) to one run.
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

from conftest import in_background, make_corpus, side_by_side
from keras_charrnn.export import export_run
from servers import free_ports

pytestmark = pytest.mark.slow  # every test here trains or starts processes

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
    "--dropout",
    "0",
    "--lr",
    "0.01",
    "--clip-norm",
    "0.05",
    "--sample-chars",
    "0",
    "--quiet",
]
# clip_norm 0.05 clips every step, so a per-replica clip (stock Keras under a strategy) would show.


def _cli(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "keras_charrnn.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _checkpoint(run):
    with np.load(run / "state.npz") as data:
        return {k: data[k] for k in data.files if k != "progress"}, json.loads(str(data["progress"]))


def _assert_same_run(got, want, state_atol=1e-3, resumed_epoch=None):
    """Per-epoch losses to 1e-5 relative; weights and optimizer variables 1e-4; states (c grows) 1e-3.

    The training loss of an epoch resumed part-way is Keras' mean over the batches after the resume
    only, so for ``resumed_epoch`` only the validation loss is compared.
    """
    (arrays, progress), (ref_arrays, ref_progress) = _checkpoint(got), _checkpoint(want)
    assert len(progress["history"]) == len(ref_progress["history"])
    for epoch, (h, r) in enumerate(zip(progress["history"], ref_progress["history"])):
        for key in ("val_loss",) if epoch == resumed_epoch else ("loss", "val_loss"):
            assert h[key] == pytest.approx(r[key], rel=1e-5), (key, progress["history"], ref_progress["history"])
    assert arrays.keys() == ref_arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_allclose(
            value, ref_arrays[key], atol=state_atol if key.startswith("state_") else 1e-4, err_msg=key
        )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "c.txt"
    path.write_text(make_corpus(1500, seed=1))
    return path


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_mirrored_on_two_devices_matches_one_device_with_the_same_global_batch(corpus, tmp_path, cell):
    one, two = side_by_side(
        lambda: _cli("train", corpus, "--out", tmp_path / "one", "--cell", cell, "--checkpoint-every", "0", *TINY),
        lambda: _cli(
            "train",
            corpus,
            "--out",
            tmp_path / "two",
            "--cell",
            cell,
            "--checkpoint-every",
            "0",
            *TINY,
            "--distribute",
            "mirrored",
            env={"CHARRNN_LOGICAL_CPUS": "2"},
        ),
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "distributed: 2 replicas, batch_size 8 = 2 x 4" in two.stdout
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    # The run folder is a single-device run's: it exports as one (in this process: no TensorFlow start-up).
    assert (export_run(tmp_path / "two", "m", tmp_path / "models") / "saved_model.pb").is_file()


def test_distributed_training_errors_name_the_parameter(corpus, tmp_path):
    calls = [
        lambda: _cli(
            "train",
            corpus,
            "--out",
            tmp_path / "odd",
            *TINY,
            "--batch-size",
            "7",
            "--distribute",
            "mirrored",
            env={"CHARRNN_LOGICAL_CPUS": "2"},
            timeout=300,
        ),
        lambda: _cli(
            "train",
            corpus,
            "--out",
            tmp_path / "mw",
            *TINY,
            "--distribute",
            "multi-worker",
            env={"TF_CONFIG": ""},
            timeout=300,
        ),
    ]
    if importlib.util.find_spec("jax") is not None:
        calls.append(
            lambda: _cli(
                "train",
                corpus,
                "--out",
                tmp_path / "jax",
                *TINY,
                "--distribute",
                "mirrored",
                "--backend",
                "jax",
                timeout=300,
            )
        )
    odd, no_config, *jax = side_by_side(*calls)  # independent commands: they run side by side
    assert odd.returncode == 2 and "batch_size 7 must be a multiple of the 2 replicas" in odd.stderr, odd.stderr
    assert no_config.returncode == 2 and "needs TF_CONFIG" in no_config.stderr, no_config.stderr
    for result in jax:
        assert result.returncode == 2, result.stderr
        assert "distributed training needs the TensorFlow backend" in result.stderr, result.stderr


def _start_workers(corpus, out, logs, *extra):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
        log = open(logs / f"worker{i}_{int(time.time() * 1000)}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "keras_charrnn.cli", "train", str(corpus), "--out", str(out), *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TF_CONFIG": tf_config},
            )
        )
    return procs


def _logs(logs):
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))


def test_two_workers_killed_mid_run_resume_from_the_checkpoint_and_match_one_process(corpus, tmp_path):
    flags = [*TINY, "--checkpoint-every", "10"]
    # The one-process reference is independent of the workers (its own folder): it runs beside them.
    with in_background(lambda: _cli("train", corpus, "--out", tmp_path / "one", *flags)) as reference:
        out, logs = tmp_path / "shared" / "run", tmp_path / "logs"
        logs.mkdir()
        procs = _start_workers(corpus, out, logs, *flags, "--distribute", "multi-worker")
        state = out / "state.npz"
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if state.is_file() and _checkpoint(out)[1]["epoch"] >= 1 and _checkpoint(out)[1]["step"] >= 10:
                break  # part-way through the second epoch
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs), _logs(logs)
        procs[1].send_signal(signal.SIGKILL)  # a worker dies; the chief is stuck in the next collective
        procs[1].wait()
        time.sleep(1)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        killed_at = _checkpoint(out)[1]
        assert killed_at["epoch"] == 1 and killed_at["step"] > 0, killed_at

        procs = _start_workers(corpus, out, logs, "--resume", "--distribute", "multi-worker", "--quiet")
        for p in procs:
            p.wait(timeout=400)
        assert [p.returncode for p in procs] == [0, 0], _logs(logs)
        assert "resuming" in _logs(logs)
    one = reference.result()
    assert one.returncode == 0, one.stderr
    _assert_same_run(out, tmp_path / "one", resumed_epoch=killed_at["epoch"])
    assert not list(out.parent.glob("charrnn-worker-*"))  # the other worker wrote elsewhere
    assert (export_run(out, "m", tmp_path / "models") / "saved_model.pb").is_file()
