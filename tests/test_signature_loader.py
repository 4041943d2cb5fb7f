"""The lean SavedModel loader (keras_charrnn.serving.signature_loader).

It gives tf.saved_model.load's outputs, or its fallback's.
"""

import gc
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.eager import context as tf_context

from keras_charrnn.serving import signature_loader
from keras_charrnn.serving.signature_loader import SignatureModel, load_signatures

BUNDLED = Path(__file__).resolve().parent.parent / "saved_models" / "shakespeare" / "1"


def _serve_meta_graph(path: Path):
    meta = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    return next(m for m in meta.meta_graphs if "serve" in m.meta_info_def.tags)


def _inputs(specs: dict, seed: int) -> dict:
    """Two rows of valid inputs for a signature of the bundled model, by input name."""
    rng = np.random.default_rng(seed)
    values = {
        "prime": [b"ROMEO:", b"To be, or"],
        "ids": [[5, 12, 30], [40, 2, 9]],
        "num_chars": [6, 3],
        "temperature": [1.0, 0.7],
        "top_k": [0, 5],
        "top_p": [1.0, 0.9],
        "seed": [seed, seed + 101],
        "position": [0, 4],
        "min_p": [0.0, 0.05],
        "stop": [[b"\n", b""], [b"e ", b"th"]],
        "stop_tail": [b"", b"t"],
        "min_chars": [0, 2],
        "logprobs": [-1, 3],
    }
    inputs = {}
    for name, spec in specs.items():
        if name == "logit_bias":
            bias = np.zeros((2, spec.shape[-1]), np.float32)
            bias[1, 1:4] = [-100.0, 2.0, -1.5]
            inputs[name] = tf.constant(bias)
        elif name in values:
            inputs[name] = tf.constant(values[name], dtype=spec.dtype)
        else:  # a recurrent state: h_0, c_1, ...
            inputs[name] = tf.constant(rng.normal(0, 0.5, (2, spec.shape[-1])), dtype=spec.dtype)
    return inputs


@pytest.fixture(scope="module")
def both_loads():
    """The bundled model loaded by TensorFlow's loader and by the lean one."""
    reference = tf.saved_model.load(str(BUNDLED), tags=["serve"])
    lean = load_signatures(BUNDLED, _serve_meta_graph(BUNDLED))
    assert isinstance(lean, SignatureModel)  # not the fallback
    return reference, lean


def test_every_signature_of_the_bundled_model_gives_tf_saved_model_loads_outputs_bit_for_bit(both_loads):
    reference, lean = both_loads
    assert set(lean.signatures) == set(reference.signatures)
    assert {"generate_text", "generate_text_xla", "serving_default", "step", "metadata"} <= set(lean.signatures)
    for name in sorted(lean.signatures):
        specs = reference.signatures[name].structured_input_signature[1]
        for seed in (3, 2024):
            inputs = _inputs(specs, seed)
            expected, got = reference.signatures[name](**inputs), lean.signatures[name](**inputs)
            assert set(got) == set(expected), name
            for key in expected:
                assert got[key].dtype == expected[key].dtype and got[key].shape == expected[key].shape, (name, key)
                assert np.array_equal(got[key].numpy(), expected[key].numpy()), (name, key, seed)


def test_lean_signatures_bind_inputs_as_tensorflows_do(both_loads):
    _, lean = both_loads
    step = lean.signatures["step"]
    inputs = _inputs(step.structured_input_signature[1], 0)
    with pytest.raises(TypeError, match="missing a required argument"):
        step(**{k: v for k, v in inputs.items() if k != "ids"})
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        step(**inputs, extra=tf.constant(1))
    as_lists = {k: v.numpy().tolist() for k, v in inputs.items()}  # plain values are converted to the specs
    assert np.array_equal(step(**as_lists)["logits"].numpy(), step(**inputs)["logits"].numpy())


class _WithTable(tf.Module):
    """Captures a lookup table (a resource the lean loader does not restore) and a vocabulary asset."""

    def __init__(self, vocab_file: str):
        super().__init__()
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(
                vocab_file, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER
            ),
            -1,
        )
        self.scale = tf.Variable(10, dtype=tf.int64)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="words")])
    def lookup(self, words):
        return {"ids": self.table.lookup(words) * self.scale}


def test_a_savedmodel_the_lean_loader_does_not_handle_is_loaded_by_tensorflows_loader(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("the\nquick\nfox\n")
    module = _WithTable(str(vocab))
    path = tmp_path / "with_table" / "1"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.lookup})
    loaded = load_signatures(path, _serve_meta_graph(path))
    assert not isinstance(loaded, SignatureModel)  # tf.saved_model.load's module
    out = loaded.signatures["serving_default"](words=tf.constant(["fox", "the", "cat"]))
    assert out["ids"].numpy().tolist() == [20, 0, -10]


def test_a_change_of_tensorflows_private_apis_falls_back_instead_of_failing(both_loads, monkeypatch):
    reference, _ = both_loads
    inputs = _inputs(reference.signatures["step"].structured_input_signature[1], 1)
    expected = reference.signatures["step"](**inputs)["logits"].numpy()

    class NoDecoder:  # nested_structure_coder without decode_proto, as a TensorFlow upgrade might leave it
        pass

    monkeypatch.setattr(signature_loader, "nested_structure_coder", NoDecoder())
    loaded = load_signatures(BUNDLED, _serve_meta_graph(BUNDLED))
    assert not isinstance(loaded, SignatureModel)
    assert np.array_equal(loaded.signatures["step"](**inputs)["logits"].numpy(), expected)

    monkeypatch.setattr(signature_loader, "_eager_functions_unusable", lambda: "call_function is gone")
    loaded = load_signatures(BUNDLED, _serve_meta_graph(BUNDLED))
    assert not isinstance(loaded, SignatureModel)
    assert np.array_equal(loaded.signatures["step"](**inputs)["logits"].numpy(), expected)


def test_the_probe_finds_this_tensorflows_private_apis_usable():
    assert signature_loader._eager_functions_unusable() == ""


def test_loads_of_one_graph_share_its_functions_until_the_last_is_unloaded():
    first, second = (load_signatures(BUNDLED, _serve_meta_graph(BUNDLED)) for _ in range(2))
    assert isinstance(first, SignatureModel) and isinstance(second, SignatureModel)
    names = [f.name for f in first.signatures.values()]
    assert names == [f.name for f in second.signatures.values()]  # named by content: the same graph, the same names
    context = tf_context.context()
    users = signature_loader._registered[names[0]]  # these two, and any other load of the bundled model alive
    assert users >= 2 and all(context.has_function(name) for name in names)
    del first
    gc.collect()
    assert signature_loader._registered[names[0]] == users - 1 and all(context.has_function(name) for name in names)
    del second
    gc.collect()
    assert all(context.has_function(name) == (users > 2) for name in names)


def _with_other_weights(src: Path, dst: Path) -> Path:
    """A copy of the SavedModel at ``src`` whose float variables are halved: the same graph, other weights."""
    shutil.copytree(src, dst)
    prefix = str(dst / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    keys = sorted(reader.get_variable_to_dtype_map())
    values = [reader.get_tensor(k) for k in keys]
    values = [v * 0.5 if isinstance(v, np.ndarray) and v.dtype == np.float32 else v for v in values]
    for f in (dst / "variables").iterdir():
        f.unlink()
    tf.raw_ops.SaveV2(
        prefix=prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=[tf.constant(v) for v in values]
    )
    return dst


@pytest.mark.slow
def test_versions_sharing_a_graph_each_answer_with_their_own_weights(tmp_path):
    other = _with_other_weights(BUNDLED, tmp_path / "2")
    assert (other / "saved_model.pb").read_bytes() == (BUNDLED / "saved_model.pb").read_bytes()
    lean = {path: load_signatures(path, _serve_meta_graph(path)) for path in (BUNDLED, other)}
    assert [f.name for f in lean[BUNDLED].signatures.values()] == [f.name for f in lean[other].signatures.values()]
    answers = {}
    for name in ("generate_text_xla", "step"):  # the XLA executable compiled for one serves the other
        specs = lean[BUNDLED].signatures[name].structured_input_signature[1]
        inputs = _inputs(specs, 7)
        for turn, path in enumerate((BUNDLED, other, BUNDLED)):
            got = {k: v.numpy() for k, v in lean[path].signatures[name](**inputs).items()}
            if turn == 2:  # the first version again, after the second ran
                assert all(np.array_equal(got[k], answers[path, name][k]) for k in got), name
            answers[path, name] = got
        reference = tf.saved_model.load(str(other), tags=["serve"]).signatures[name](**inputs)
        for key, value in reference.items():
            assert np.array_equal(answers[other, name][key], value.numpy()), (name, key)
        key = "text" if name == "generate_text_xla" else "logits"
        assert not np.array_equal(answers[BUNDLED, name][key], answers[other, name][key]), name


def test_loading_leaves_the_parsed_savedmodel_to_reference_counting_not_to_the_cycle_collector():
    """The parsed SavedModel (15 MB resident for the bundled model) goes when its last reference does.

    A function library held in a reference cycle (a recursive closure over it) stayed resident
    until Python's cyclic collector happened to run.
    """
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable is kept in gc.garbage, not freed
    try:
        model = load_signatures(BUNDLED, _serve_meta_graph(BUNDLED))
        assert isinstance(model, SignatureModel)
        gc.collect()
        held = [
            o
            for o in gc.garbage
            if isinstance(o, dict) and o and all(type(v).__name__ == "FunctionDef" for v in o.values())
        ]
        assert not held, "the SavedModel's function library was left in a reference cycle"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    del model
    gc.collect()


def test_functions_are_registered_callees_first_and_a_missing_callee_is_not_loadable():
    from tensorflow.core.framework import function_pb2

    def fdef(name, *calls):
        f = function_pb2.FunctionDef()
        f.signature.name = name
        for i, callee in enumerate(calls):
            f.node_def.add(name=f"n{i}", op=callee)
        return f

    library = {
        f.signature.name: f
        for f in (fdef("a", "b", "c"), fdef("b", "c"), fdef("c"), fdef("d", "a"), fdef("loop", "loop"))
    }
    assert signature_loader._callees_first(["a", "d", "loop"], library) == ["c", "b", "a", "d", "loop"]
    library["e"] = fdef("e")
    library["e"].node_def.add(name="x", op="StatefulPartitionedCall").attr["f"].func.name = "gone"
    library["gone"] = fdef("gone")
    assert signature_loader._callees_first(["e"], library) == ["gone", "e"]
    del library["gone"]
    with pytest.raises(signature_loader._NotLoadable, match="gone"):
        signature_loader._callees_first(["e"], library)


def test_a_graphs_function_names_are_the_same_whatever_order_its_functions_are_walked_in():
    # The walk follows protobuf maps, whose order differs from process to process; the names must not, or XLA's
    # persistent compilation cache (keyed by the names) would miss on every restart.
    library = {f.signature.name: f for f in _serve_meta_graph(BUNDLED).graph_def.library.function}
    order = list(library)
    suffix = signature_loader._name_suffix(order, library)
    assert suffix.startswith("_lean_") and signature_loader._name_suffix(order[::-1], library) == suffix
    assert signature_loader._name_suffix(order[1:], library) != suffix  # other functions, another name
