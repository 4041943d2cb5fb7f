"""Batch invariance, bit for bit: a row's text, states and logits do not depend on the rows beside it.

A model server merges concurrent calls into one batch, so a seeded session must
come out the same whichever sessions share its batch and at whichever row. Each
test runs a pool of sessions (own prime length, seed, position and length) alone,
then, for every batch size, a random choice of them together at random rows, and
compares sampled ids, every state after every call and the final logits with
``np.array_equal``. ``bench/invariance.py`` runs the same check for thousands of
steps.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ALL_CELLS, side_by_side, without_xla_cache

from keras_charrnn.export import CharRNNModule
from keras_charrnn.reexport import module_from_savedmodel
from keras_charrnn.model import build_model
from keras_charrnn.vocab import Vocabulary

BUNDLED = Path(__file__).resolve().parent.parent / "saved_models" / "shakespeare" / "1"
FLAVOURS = {"plain": ("generate_text", "generate"), "xla": ("generate_text_xla", "generate_xla")}


def bundled_module() -> CharRNNModule:
    """The bundled 2x512 LSTM's weights in a module built from this checkout's code (with the XLA twins)."""
    return module_from_savedmodel(BUNDLED)


def random_module(cell: str, units: int = 48, seed: int = 0) -> CharRNNModule:
    """A small 2-layer model of ``cell`` with random weights (scaled up so the states move).

    Args:
        cell: a cell type of the registry (``cell_types.CELLS``).
        units: units per layer.
        seed: the weights' seed.

    Returns:
        A ``CharRNNModule`` with the XLA twins.
    """
    chars = list("abcdefghijklmnopqrstuvwxyz .,;!?\n")
    keras.utils.set_random_seed(seed)
    model = build_model(
        len(chars) + 1, cell, units=units, layers=2, embedding_dim=16, batch_size=None, seq_len=None, stateful=False
    )
    model.set_weights([w * 2.0 for w in model.get_weights()])
    return CharRNNModule(model, Vocabulary(chars))


_SIGNATURES: dict[int, dict] = {}


def _signatures(module: CharRNNModule) -> dict:
    if id(module) not in _SIGNATURES:
        _SIGNATURES.clear()
        _SIGNATURES[id(module)] = module.named_signatures()
    return _SIGNATURES[id(module)]


def _vocabulary(module: CharRNNModule) -> list[str]:
    return [c.decode("utf-8") for c in _signatures(module)["metadata"]()["vocabulary"].numpy()]


def make_sessions(module: CharRNNModule, count: int, chars: int, seed: int = 12) -> dict:
    """``count`` sessions: random primes of 1-12 characters, seeds, start positions and call lengths.

    Args:
        module: the model (its vocabulary makes the primes).
        count: how many sessions.
        chars: about how many characters each session samples (two calls).
        seed: the choice's seed.

    Returns:
        ``{"primes", "first", "second", "seeds", "positions"}``, one entry per session.
    """
    rng = np.random.default_rng(seed)
    alphabet = _vocabulary(module)[1:]
    first = chars // 2
    return {
        "primes": ["".join(rng.choice(alphabet, rng.integers(1, 13))) for _ in range(count)],
        "first": rng.integers(max(1, first - 8), first + 1, count).astype(np.int32),
        "second": rng.integers(max(1, chars - first - 8), chars - first + 1, count).astype(np.int32),
        "seeds": rng.integers(0, 2**62, count),
        "positions": rng.integers(0, 10**6, count),
    }


def run_together(module: CharRNNModule, flavour: str, sessions: dict, rows: list[int]) -> list[dict]:
    """Runs the sessions ``rows`` in one batch, in that row order: three calls of the ``flavour`` signatures.

    A ``generate_text`` call from the prime, a ``generate`` call continuing from its
    states, then a ``step`` call with the last sampled id.

    Args:
        module: the model.
        flavour: ``"plain"`` (the default signatures) or ``"xla"`` (the twins).
        sessions: from ``make_sessions``.
        rows: the sessions in the batch, by index (the batch row order).

    Returns:
        Per row: ``{"text", "ids", "logits", "states"}`` (numpy values, states after each call).
    """
    signatures = _signatures(module)
    text_name, ids_name = FLAVOURS[flavour]
    index = {c: i for i, c in enumerate(_vocabulary(module))}
    names, b = module.state_names, len(rows)
    pick = lambda key: tf.constant(sessions[key][rows])  # noqa: E731
    sampling = {
        "temperature": tf.ones([b]),
        "top_k": tf.zeros([b], tf.int32),
        "top_p": tf.ones([b]),
        "seed": pick("seeds"),
    }
    zero = {n: tf.zeros([b, module.units]) for n in names}
    first = signatures[text_name](
        prime=tf.constant([sessions["primes"][r] for r in rows]),
        **zero,
        **sampling,
        num_chars=pick("first"),
        position=pick("positions"),
    )
    texts = [t.decode("utf-8") for t in first["text"].numpy()]
    last = tf.constant([[index[t[-1]]] for t in texts], tf.int32)
    second = signatures[ids_name](
        ids=last,
        **{n: first[n] for n in names},
        **sampling,
        num_chars=pick("second"),
        position=pick("positions") + tf.cast(pick("first"), tf.int64),
    )
    ids = second["ids"].numpy()
    lengths = sessions["second"][rows]
    last = tf.constant([[ids[i, n - 1]] for i, n in enumerate(lengths)], tf.int32)
    third = signatures["step"](ids=last, **{n: second[n] for n in names})
    return [
        {
            "text": texts[i],
            "ids": ids[i],
            "logits": third["logits"].numpy()[i],
            "states": [out[n].numpy()[i] for out in (first, second, third) for n in names],
        }
        for i in range(b)
    ]


def same_bits(got: dict, alone: dict) -> bool:
    """Whether a row's results equal the session's results alone, bit for bit (padding ids past its end are 0)."""
    n = len(alone["ids"])
    return (
        got["text"] == alone["text"]
        and np.array_equal(got["ids"][:n], alone["ids"])
        and not got["ids"][n:].any()
        and np.array_equal(got["logits"], alone["logits"])
        and all(np.array_equal(g, a) for g, a in zip(got["states"], alone["states"]))
    )


def invariance_failures(
    module: CharRNNModule, flavour: str, batch_sizes, chars: int, pool: int = 64, seed: int = 12, log=None
) -> list[int]:
    """The batch sizes at which some row differs from its session run alone.

    Args:
        module: the model.
        flavour: ``"plain"`` or ``"xla"``.
        batch_sizes: the batch sizes to try; each takes that many of the ``pool`` sessions at random rows.
        chars: characters each session samples.
        pool: how many sessions (each is first run alone).
        seed: the choice of sessions and rows.
        log: called with a line per batch size, if given.

    Returns:
        The failing batch sizes (empty: bitwise invariant).
    """
    sessions = make_sessions(module, pool, chars, seed)
    alone = [run_together(module, flavour, sessions, [r])[0] for r in range(pool)]
    rng = np.random.default_rng(seed + 1)
    failures = []
    for b in batch_sizes:
        rows = list(rng.choice(pool, b, replace=b > pool))
        together = run_together(module, flavour, sessions, rows)
        ok = all(same_bits(got, alone[r]) for got, r in zip(together, rows))
        if not ok:
            failures.append(b)
        if log:
            log(f"{flavour} B={b}: {'bitwise equal' if ok else 'DIFFERS'}")
    return failures


# Under XLA every batch size compiles anew, so the XLA flavour takes batch sizes around the blocks of rows
# CPU kernels use (4, 8, 16, 24, 32, 48), as the kernels would meet them without the per-row products;
# bench/invariance.py runs every size for longer sessions.
XLA_SIZES = [*range(1, 9), 11, 12, 16, 20, 24, 25, 31, 32, 33, 40, 47, 48, 49, 63, 64]
MACHINE_SIZES = [1, 2, 3, 8, 9, 25, 33, 49, 64]  # fewer: past blocks of 8, 24, 32 and 48 rows


@pytest.fixture(scope="module")
def bundled():
    return bundled_module()


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_this_codes_graph_of_the_bundled_weights_is_bitwise_batch_invariant(bundled, flavour):
    """The graph this checkout exports (the shipped one may predate it: see the test of the shipped graph)."""
    assert invariance_failures(bundled, flavour, MACHINE_SIZES, chars=40, pool=24) == []


@pytest.mark.slow
@pytest.mark.parametrize("cell", ALL_CELLS)
def test_every_cell_is_bitwise_batch_invariant_in_both_flavours(cell):
    module = random_module(cell)
    for flavour in FLAVOURS:
        assert invariance_failures(module, flavour, [1, 4, 31, 32, 33, 64], chars=24, pool=24) == [], flavour


def _compiled_matmul(w, k: int, xla: bool):
    """``x -> cells.matmul(x, w)`` as a tf.function for x of any row count and k columns."""
    from keras_charrnn import cells

    return tf.function(lambda x: cells.matmul(x, w), jit_compile=xla, input_signature=[tf.TensorSpec([None, k])])


@pytest.mark.parametrize("xla", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "xla"])
def test_a_matmul_row_has_the_same_bits_whatever_the_row_count(xla):
    """Per product, with row counts a whole prompt reaches (the input projection takes T x B rows at once)."""

    rng = np.random.default_rng(3)
    counts = [*range(1, 10), 25, 28, 31, 32, 33, 49, 63, 64, 65, 100] + ([] if xla else [257, 1000, 4096])
    for k, n in [(512, 2048), (64, 2048), (512, 66)]:
        w = tf.constant(rng.normal(0, 0.05, (k, n)).astype(np.float32))
        product = _compiled_matmul(w, k, xla)
        pool = rng.uniform(-1, 1, (64, k)).astype(np.float32)
        alone = np.concatenate([product(pool[r : r + 1]).numpy() for r in range(64)])
        for count in counts:
            rows = rng.integers(0, 64, count)
            assert np.array_equal(product(pool[rows]).numpy(), alone[rows]), (k, n, count)


@pytest.mark.parametrize("xla", [False, True], ids=["plain", "xla"])
def test_a_rows_layer_norm_has_the_same_bits_whatever_the_row_count(xla):
    """The layer-normalised LSTM's norms (``cells.row_mean``, ``cells.divide_rows``), at a step's and a prompt's row
    counts, over widths that are and are not whole vectors of the CPU's float lanes."""
    from keras_charrnn import cells
    from keras_charrnn.cell_types import RowOps, layer_norm

    rows = RowOps(cells.row_mean, cells.divide_rows)
    rng = np.random.default_rng(4)
    counts = [*range(1, 10), 16, 31, 32, 33, 64, 65, 100] + ([] if xla else [1000])
    for n in (24, 50, 192, 2048):
        gain, bias = (tf.constant(rng.normal(m, 0.3, n).astype(np.float32)) for m in (1.0, 0.0))
        norm = tf.function(
            lambda z, gain=gain, bias=bias: layer_norm(tf, rows, z, gain, bias),
            jit_compile=xla,
            input_signature=[tf.TensorSpec([None, n])],
        )
        pool = rng.normal(0.3, 2.0, (64, n)).astype(np.float32)
        alone = np.concatenate([norm(pool[r : r + 1]).numpy() for r in range(64)])
        expected = (pool - pool.mean(-1, keepdims=True)) / np.sqrt(pool.var(-1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(alone, expected * gain.numpy() + bias.numpy(), atol=1e-4)
        for count in counts:
            picked = rng.integers(0, 64, count)
            assert np.array_equal(norm(pool[picked]).numpy(), alone[picked]), (n, count)


class LoadedSavedModel:
    """A SavedModel loaded with TensorFlow alone, run by the same checks as a module built from this code."""

    def __init__(self, path: Path):
        self.loaded = tf.saved_model.load(str(path))
        config = json.loads(self.loaded.signatures["metadata"]()["config"].numpy())
        self.state_names, self.units = config["state_names"], config["state_size"]

    def named_signatures(self) -> dict:
        return dict(self.loaded.signatures.items())  # a loaded signature takes its inputs by name


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_shipped_savedmodels_own_graph_is_bitwise_batch_invariant_at_every_row_of_every_batch_size(flavour):
    """What ships holds it: the bundled SavedModel's own graph (not this checkout's code), TensorFlow alone;
    every batch size 1..64 (its rows are a random choice of 64 sessions, so every row position is taken)."""
    sizes = range(1, 65) if flavour == "plain" else XLA_SIZES
    assert invariance_failures(LoadedSavedModel(BUNDLED), flavour, sizes, chars=12) == []


# Other machines, emulated: oneDNN off (TensorFlow's Eigen kernels), the instruction set capped to AVX2 (oneDNN
# and XLA pick their kernels by it at run time), one and two intra-op threads (how kernels split the work).
MACHINES = {
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "AVX2 only": {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
    "1 thread": {"TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"},
    "2 threads, oneDNN off, AVX2": {
        "TF_NUM_INTRAOP_THREADS": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",
    },
}
MACHINE_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_batch_invariance import FLAVOURS, MACHINE_SIZES, bundled_module, invariance_failures
module = bundled_module()
print(json.dumps({f: invariance_failures(module, f, MACHINE_SIZES, chars=8, pool=12) for f in FLAVOURS}))
"""


@pytest.mark.slow
def test_the_bundled_model_is_bitwise_batch_invariant_with_other_kernels_isas_and_thread_counts():
    def check(env):
        done = subprocess.run(
            [sys.executable, "-c", MACHINE_CHECK, str(Path(__file__).parent)],
            capture_output=True,
            text=True,
            timeout=900,
            env=without_xla_cache({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    results = side_by_side(*[functools.partial(check, env) for env in MACHINES.values()])
    assert dict(zip(MACHINES, results)) == {machine: {"plain": [], "xla": []} for machine in MACHINES}
