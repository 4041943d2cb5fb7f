"""The cell registry (``cell_types.CELLS``) and the layer-normalised LSTM's Keras layer.

The per-cell equalities (the SavedModel equal to the trained model, batch invariance, training on each
backend, exact resume) run over every registered cell in test_export, test_batch_invariance, test_backends
and test_training.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ALL_CELLS
from keras_charrnn.budget import count_params
from keras_charrnn.cell_types import CELLS
from keras_charrnn.model import build_model, describe, get_states, recurrent_layers, state_names


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_each_cells_spec_counts_the_parameters_and_names_the_states_its_keras_layer_has(cell):
    model = build_model(30, cell=cell, units=12, layers=2, embedding_dim=7, batch_size=3, seq_len=5)
    assert count_params(cell, 2, 12, 7, 30) == model.count_params()
    assert describe(model)["cell"] == cell
    assert len(get_states(model)) == len(state_names(cell, 2)) == 2 * len(CELLS[cell].states)
    for layer in recurrent_layers(model):
        assert isinstance(layer, CELLS[cell].layer_class())


def test_an_lnlstm_model_saved_as_keras_loads_with_its_weights_and_computes_the_same(tmp_path):
    keras.utils.set_random_seed(1)
    model = build_model(20, cell="lnlstm", units=8, layers=2, embedding_dim=4, batch_size=2, seq_len=6)
    names = [w.path for w in recurrent_layers(model)[0].weights]
    assert [n.rsplit("/", 1)[-1] for n in names] == [
        "kernel",
        "recurrent_kernel",
        "input_gain",
        "input_bias",
        "recurrent_gain",
        "recurrent_bias",
        "cell_gain",
        "cell_bias",
    ]
    x = np.random.RandomState(0).randint(0, 20, (2, 6)).astype(np.int32)
    model.save(tmp_path / "m.keras")
    expected = keras.ops.convert_to_numpy(model(x))
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("rnn_0").get_config()["units"] == 8 and loaded.get_layer("rnn_0").stateful
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), expected)


def test_the_forget_gate_starts_open_and_the_layer_norms_start_as_identity():
    model = build_model(10, cell="lnlstm", units=3, layers=1, embedding_dim=2, batch_size=1, seq_len=1)
    _, _, input_gain, input_bias, recurrent_gain, recurrent_bias, cell_gain, cell_bias = model.get_layer(
        "rnn_0"
    ).get_weights()
    assert input_bias.tolist() == [0.0] * 3 + [1.0] * 3 + [0.0] * 6  # gates i, f, g, o as in Keras' LSTM
    assert all((w == 1).all() for w in (input_gain, recurrent_gain, cell_gain))
    assert not recurrent_bias.any() and not cell_bias.any()


def test_the_registry_and_the_config_load_without_tensorflow_or_keras():
    code = (
        "import sys; import keras_charrnn.config, keras_charrnn.cell_types as c; "
        "assert 'lnlstm' in c.CELLS; sys.exit(int('tensorflow' in sys.modules or 'keras' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
