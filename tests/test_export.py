"""Exported SavedModels: equal to the trained model, reproducible sampling, TF Serving shape, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from conftest import ALL_CELLS, in_background, interactive_transcript, loaded, run_cli, side_by_side
from keras_charrnn.analysis import inspect
from keras_charrnn.decoding import filter_logits
from keras_charrnn.errors import CharRNNError, InputError
from keras_charrnn.inprocess import load
from keras_charrnn.model import build_model
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.sampling import SamplingParams
from keras_charrnn.session import ModelInfo, Session

TEXT = 'the lazy dog sits (on a mat) while "seven" cats jump'


def _rows(n=1, num_chars=20, temperature=0.8, top_k=0, top_p=1.0, seed=1, position=0):
    return {
        "num_chars": tf.fill([n], num_chars),
        "temperature": tf.fill([n], float(temperature)),
        "top_k": tf.fill([n], top_k),
        "top_p": tf.fill([n], float(top_p)),
        "seed": tf.constant([seed] * n if np.isscalar(seed) else seed, tf.int64),
        "position": tf.fill([n], tf.constant(position, tf.int64)),
    }


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_step_equals_the_stateful_keras_model_char_by_char(trained_runs, model_dir, cell):
    run = RunFolder(trained_runs[cell])
    vocab, c = run.vocab(), run.config()
    stateful = build_model(
        vocab.size, cell=cell, units=c.units, layers=c.layers, embedding_dim=c.embedding_dim, batch_size=1, seq_len=1
    )
    stateful.set_weights(run.load_model().get_weights())
    model = loaded(model_dir(cell))
    step = model.signatures["step"]
    states = {k: tf.constant(v) for k, v in model.zero_state().items()}
    for i in vocab.encode(TEXT):
        expected = stateful(np.array([[i]], np.int32)).numpy()
        out = step(ids=tf.constant([[i]], tf.int32), **states)
        states = {k: out[k] for k in model.info.state_names}
        np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_greedy_generate_equals_argmax_stepping(model_dir, cell):
    model = loaded(model_dir(cell))
    prime = model.vocab.encode("the ")
    states = {k: tf.constant(v) for k, v in model.zero_state().items()}
    out = model.signatures["step"](ids=tf.constant(prime[None, :]), **states)
    expected = []
    for _ in range(30):
        logits = out["logits"][0, -1].numpy()
        logits[0] = -np.inf  # the unknown id is never generated
        nxt = int(np.argmax(logits))
        expected.append(nxt)
        states = {k: out[k] for k in model.info.state_names}
        out = model.signatures["step"](ids=tf.constant([[nxt]], tf.int32), **states)
    zero = {k: tf.constant(v) for k, v in model.zero_state().items()}
    got = model.signatures["generate"](ids=tf.constant(prime[None, :]), **zero, **_rows(num_chars=30, temperature=0))
    assert got["ids"].numpy()[0].tolist() == expected


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_same_seed_same_text_however_the_calls_are_chunked(model_dir, cell):
    model = loaded(model_dir(cell))
    whole = model.generate("the ", 200, temperature=1.0, seed=7)
    session = model.session("the ", temperature=1.0, seed=7)
    assert "".join(session.generate(50) for _ in range(4)) == whole
    session = model.session("the ", temperature=1.0, seed=7)
    assert "".join(session.stream(200, chunk=33)) == whole
    assert model.generate("the ", 200, temperature=1.0, seed=8) != whole


def test_a_row_does_not_depend_on_the_rest_of_the_batch(model_base):
    model = loaded(model_base / "lstm")
    zero1 = {k: tf.constant(v) for k, v in model.zero_state(1).items()}
    zero3 = {k: tf.constant(v) for k, v in model.zero_state(3).items()}
    gen = model.signatures["generate_text"]
    alone = gen(prime=tf.constant(["the "]), **zero1, **_rows(1, num_chars=60, seed=11, temperature=1.0))
    mixed = gen(
        prime=tf.constant(["a much longer prime here", "the ", "x"]),
        **zero3,
        **_rows(3, num_chars=60, seed=[5, 11, 9], temperature=1.0),
    )
    assert mixed["text"].numpy()[1] == alone["text"].numpy()[0]
    for name in model.info.state_names:
        np.testing.assert_allclose(mixed[name].numpy()[1], alone[name].numpy()[0], atol=1e-5)


def test_top_k_one_is_greedy_and_top_p_keeps_likely_characters(model_base):
    model = loaded(model_base / "gru")
    greedy = model.generate("the ", 80, temperature=0)
    assert model.generate("the ", 80, temperature=1.5, top_k=1, seed=3) == greedy
    assert model.generate("the ", 80, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_unknown_characters_are_accepted_in_the_prime_and_never_generated(model_base):
    model = loaded(model_base / "rnn")
    text = model.generate("😀 zebra ", 300, temperature=2.0, seed=2)
    assert len(text) == 300  # id 0 (unknown) decodes to "": sampling it would shorten the text
    assert set(text) <= set(model.vocab.chars)


def test_a_vocabulary_that_does_not_fit_the_model_is_refused_naming_both():
    from keras_charrnn.export import CharRNNModule
    from keras_charrnn.vocab import Vocabulary

    model = build_model(5, cell="gru", units=4, batch_size=1, seq_len=1)
    with pytest.raises(InputError, match=r"^vocab holds 4 ids but model's logits layer has 5; give the vocabulary"):
        CharRNNModule(model, Vocabulary(list("abc")))


def test_an_in_memory_module_traces_a_signature_only_when_it_is_first_looked_up():
    # Loading a run folder (``keras_charrnn.load(run)``, ``charrnn sample --model RUN``) pays for the signatures it
    # runs, not for all sixteen.
    from keras_charrnn.export import CharRNNModule
    from keras_charrnn.vocab import Vocabulary

    model = build_model(4, cell="gru", units=4, batch_size=None, seq_len=None, stateful=False)
    module = CharRNNModule(model, Vocabulary(list("abc")))
    signatures = module.named_signatures()
    assert {"step", "generate_text", "generate_text_v2", "generate_text_v2_xla", "metadata"} <= set(signatures)
    assert module.generate_text_v2_function.experimental_get_tracing_count() == 0
    assert signatures["metadata"]()["vocabulary"].numpy().tolist()[1:] == [b"a", b"b", b"c"]
    out = signatures["step"](ids=tf.constant([[1, 2]]), h_0=tf.zeros([1, 4]), h_1=tf.zeros([1, 4]))
    assert out["logits"].shape == (1, 2, 4)
    assert module.step_function.experimental_get_tracing_count() == 1
    assert module.generate_text_v2_function.experimental_get_tracing_count() == 0
    assert signatures["step"] is signatures["step"]  # traced once
    assert set(signatures) == set(module.signatures())  # what export saves


def test_an_unknown_cell_is_refused_naming_the_parameter_and_every_registered_choice():
    from keras_charrnn.cell_types import CELLS
    from keras_charrnn.config import TrainConfig

    message = rf"^cell must be one of {', '.join(CELLS)}, got 'xyz'$"
    assert "lnlstm" in CELLS
    for refuse in (lambda: build_model(5, cell="xyz"), lambda: TrainConfig(cell="xyz").validate()):
        with pytest.raises(CharRNNError, match=message):
            refuse()


def test_score_is_the_mean_of_inspects_per_character_losses(model_base, corpus_file):
    model = loaded(model_base / "lstm")
    text = corpus_file.read_text()[:1500]  # several inspect windows
    result = model.score(text)
    assert result["chars"] == len(text) - 1
    assert result["loss"] == pytest.approx(float(inspect(model, text).losses.mean()), rel=1e-6)
    assert result["bits_per_char"] == pytest.approx(result["loss"] / np.log(2))
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert result["bits_per_char"] < np.log2(model.vocab.size)


def test_a_run_folder_and_its_export_give_the_same_text_and_scores(trained_runs, model_base, corpus_file):
    run, exported = load(trained_runs["rnn"]), loaded(model_base / "rnn")
    text = corpus_file.read_text()[:600]
    assert run.score(text)["loss"] == pytest.approx(exported.score(text)["loss"], abs=1e-5)
    assert run.generate("the ", 60, seed=3) == exported.generate("the ", 60, seed=3)
    assert run.info.name == trained_runs["rnn"].name and exported.info.name == "rnn"


def test_export_is_tf_serving_shaped(model_base):
    version_dir = model_base / "lstm" / "1"
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
    meta = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    graph = meta.meta_graphs[0]
    assert "serve" in graph.meta_info_def.tags
    sigs = graph.signature_def
    assert {"step", "generate", "generate_text", "serving_default", "metadata"} <= set(sigs)
    gen = sigs["generate"]
    assert set(gen.inputs) == {
        "ids",
        "h_0",
        "c_0",
        "h_1",
        "c_1",
        "num_chars",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "position",
    }
    assert set(gen.outputs) == {"ids", "h_0", "c_0", "h_1", "c_1"}
    for info in list(gen.inputs.values()) + list(gen.outputs.values()):
        assert info.tensor_shape.dim[0].size == -1  # batch first, any batch size
    assert set(sigs["generate_text"].outputs) == {"text", "h_0", "c_0", "h_1", "c_1"}
    assert all(m.method_name == "tensorflow/serving/predict" for k, m in sigs.items() if not k.startswith("__"))


def test_export_versions_count_up_and_never_overwrite(tmp_path, trained_runs):
    from keras_charrnn.export import export_run

    assert export_run(trained_runs["gru"], "m", tmp_path) == tmp_path / "m" / "1"  # in this process: no start-up
    second, again = side_by_side(  # version 1 exists now: the next export counts up, asking for 1 again is refused
        lambda: run_cli("export", trained_runs["gru"], "--name", "m", "--base-path", tmp_path),
        lambda: run_cli("export", trained_runs["gru"], "--name", "m", "--base-path", tmp_path, "--version", "1"),
    )
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_fresh_process_with_tensorflow_alone_gets_the_same_outputs(model_base):
    script = f"""
import tensorflow as tf
m = tf.saved_model.load({str(model_base / "lstm" / "1")!r})
f = m.signatures["generate_text"]
zero = {{k: tf.zeros([1, 24]) for k in ("h_0", "c_0", "h_1", "c_1")}}
out = f(prime=tf.constant(["the "]), **zero, num_chars=tf.constant([50]), temperature=tf.constant([0.8]),
        top_k=tf.constant([0]), top_p=tf.constant([1.0]), seed=tf.constant([4], tf.int64),
        position=tf.constant([0], tf.int64))
print(out["text"].numpy()[0].decode())
"""
    with in_background(
        lambda: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    ) as result:
        model = loaded(model_base / "lstm")
        zero = {k: tf.constant(v) for k, v in model.zero_state().items()}
        expected = model.signatures["generate_text"](prime=tf.constant(["the "]), **zero, **_rows(num_chars=50, seed=4))
    result = result.result()
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip("\n") == expected["text"].numpy()[0].decode()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 10_000}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_arguments_get_clear_errors(model_base, kwargs, message):
    model = loaded(model_base / "lstm")
    with pytest.raises(CharRNNError, match=message):
        model.generate("the ", 10, **kwargs)


def test_bad_signature_inputs_are_refused_by_the_graph(model_base):
    model = loaded(model_base / "lstm")
    zero = {k: tf.constant(v) for k, v in model.zero_state().items()}
    gen = model.signatures["generate_text"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_chars must be at least 1"):
        gen(prime=tf.constant(["a"]), **zero, **_rows(num_chars=0))
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_chars must be at least 1 and at most 4096"):
        gen(prime=tf.constant(["a"]), **zero, **_rows(num_chars=5000))
    with pytest.raises(tf.errors.InvalidArgumentError, match="prime"):
        gen(prime=tf.constant([""]), **zero, **_rows())
    with pytest.raises((ValueError, TypeError, tf.errors.InvalidArgumentError)):
        gen(prime=tf.constant(["a"]), **{**zero, "h_0": tf.zeros([1, 7])}, **_rows())
    with pytest.raises(CharRNNError, match="prime"):
        model.generate("", 10)
    with pytest.raises(CharRNNError, match="not both"):
        model.generate("a", 10, SamplingParams(), seed=1)
    with pytest.raises(CharRNNError, match="at least 1"):
        model.session("a").generate(0)


def test_export_metadata_holds_no_path_of_the_training_machine(model_base, trained_runs):
    config = loaded(model_base / "lstm").config
    assert "run_dir" not in config and config["corpus"] == "corpus.txt"
    assert str(trained_runs["lstm"]) not in json.dumps(config)


def test_export_refuses_bad_names_and_versions_naming_the_parameter(trained_runs, tmp_path):
    from keras_charrnn.export import export_run

    with pytest.raises(CharRNNError, match="version must be a positive integer"):
        export_run(trained_runs["gru"], "m", tmp_path, version=0)
    with pytest.raises(CharRNNError, match="name 'a/b'"):
        export_run(trained_runs["gru"], "a/b", tmp_path)


def test_interactive_cli_continues_as_an_in_process_session_fed_the_same_lines(model_base):
    with in_background(
        lambda: run_cli(
            "sample",
            "--model",
            model_base / "gru",
            "--interactive",
            "-n",
            "20",
            "--seed",
            "1",
            "--temperature",
            "1.0",
            input="the lazy\n\nseven cats\n",
        )
    ) as result:
        # The model answers until a blank line (the default stop), at most -n characters.
        session = loaded(model_base / "gru").session("the lazy\n", temperature=1.0, seed=1, stop="\n\n")
        turns = [session.generate(20), session.generate(20)]  # a line, then an empty line: it continues on its own
        session.feed("seven cats\n")
        turns.append(session.generate(20))
    result = result.result()
    assert result.returncode == 0, result.stderr
    assert result.stdout == interactive_transcript(result.stdout, turns)


def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p_exactly():
    probs = np.array([[0.5, 0.25, 0.125, 0.125]], np.float32)  # exact in float32: the boundary is exact

    def kept(top_p, top_k=0):
        out = filter_logits(tf.math.log(tf.constant(probs)), tf.constant([top_k]), tf.constant([top_p], tf.float32))
        return np.isfinite(out.numpy()[0]).tolist()

    assert kept(0.5) == [True, False, False, False]  # the first id's mass is exactly 0.5: enough
    assert kept(0.75) == [True, True, False, False]
    assert kept(np.nextafter(np.float32(0.75), np.float32(1))) == [True, True, True, True]  # ties at the cut stay
    assert kept(1.0) == [True] * 4
    assert kept(1.0, top_k=2) == [True, True, False, False]


def _info():
    return ModelInfo(name="m", state_names=["h_0", "c_0"], state_size=3, vocab_size=10, max_chars_per_call=64)


def _saved(**changes):
    obj = {
        "model": "m",
        "version": 1,
        "position": 5,
        "pending": "a",
        "temperature": 0.8,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 1,
        "states": {"h_0": [0.0] * 3, "c_0": [0.0] * 3},
    }
    return json.dumps({**obj, **changes})


def test_session_from_json_round_trips_and_refuses_what_is_not_a_saved_session():
    session = Session.from_json(_saved(), None, _info())
    assert (session.position, session.pending, session.version, session.params) == (5, "a", 1, SamplingParams(seed=1))
    assert Session.from_json(session.to_json(), None, _info()).to_json() == session.to_json()
    for data, message in [
        ("{not json", "not a saved session"),
        (json.dumps({"pending": "a"}), "no 'temperature' field"),
        (_saved(states={"h_0": [0.0] * 3}), "do not match"),
        (_saved(states={"h_0": [0.0] * 2, "c_0": [0.0] * 2}), "width 3"),
        (_saved(top_p=2.0), "top_p"),
        (_saved(pending=""), "prime"),
        (_saved(position=-1), "position"),
        (_saved(states=[1, 2]), "not a saved session"),
    ]:
        with pytest.raises(InputError, match=message):
            Session.from_json(data, None, _info())


def test_sample_and_eval_cli(model_base, corpus_file, tmp_path):
    errors = [
        (("sample", "--model", tmp_path / "none"), "no such model"),
        (("sample", "--model", model_base / "lstm", "--top-p", "2"), "top_p"),
        (("sample", "--model", model_base / "lstm", "--prime", ""), "prime"),
        (("eval", "--model", model_base / "lstm", tmp_path / "none.txt"), "no such file"),
    ]
    out, ev, *results = side_by_side(  # independent commands: they run side by side
        lambda: run_cli(
            "sample",
            "--model",
            model_base / "lstm",
            "--prime",
            "the ",
            "-n",
            "120",
            "--seed",
            "5",
            "--temperature",
            "0.9",
        ),
        lambda: run_cli("eval", "--model", model_base / "lstm", corpus_file),
        *(lambda args=args: run_cli(*args) for args, _ in errors),
    )
    model = loaded(model_base / "lstm")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "the " + model.generate("the ", 120, temperature=0.9, seed=5) + "\n"
    assert ev.returncode == 0 and "bpc" in ev.stdout
    for result, (_, fragment) in zip(results, errors):
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_metadata_signature_describes_the_model(model_base):
    out = tf.saved_model.load(str(model_base / "gru" / "1")).signatures["metadata"]()
    config = json.loads(out["config"].numpy())
    assert config["cell"] == "gru" and config["state_names"] == ["h_0", "h_1"] and config["state_size"] == 24
    assert out["vocabulary"].shape[0] == config["vocab_size"]
    assert config["val_bpc"] > 0 and config["corpus_chars"] > 0 and config["max_chars_per_call"] == 4096


# ----- serving on a stock tensorflow_model_server: XLA only in the twins -----------------------

DEFAULT_SIGNATURES = (
    "serving_default",
    "generate_text",
    "generate",
    "generate_text_v2",
    "generate_v2",
    "step",
    "inspect",
    "metadata",
)


def _meta_graph(version_dir):
    return saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes()).meta_graphs[0]


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_nothing_the_default_signatures_reach_is_marked_must_compile(model_dir, cell):
    from keras_charrnn.xla import must_compile_functions, reachable_functions

    graph = _meta_graph(model_dir(cell) / "1")
    for name in DEFAULT_SIGNATURES:
        assert reachable_functions(graph, name), name  # the walk starts from the signature's call
        assert must_compile_functions(graph, name) == set(), name
    twins = ("generate_xla", "generate_text_xla", "generate_v2_xla", "generate_text_v2_xla")
    for twin in twins:
        assert must_compile_functions(graph, twin), twin  # the walk does find XLA where it is
    assert set(twins) <= set(graph.signature_def)


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_the_xla_twins_give_the_same_text_and_states_as_the_default_signatures(model_dir, cell):
    model = loaded(model_dir(cell))
    zero3 = {k: tf.constant(v) for k, v in model.zero_state(3).items()}
    rows = _rows(3, num_chars=150, temperature=1.0, seed=[1, 2, 3])
    rows["top_k"], rows["top_p"] = tf.constant([0, 5, 0]), tf.constant([1.0, 1.0, 0.9])
    primes = tf.constant(["the ", "a lazy", "x"])
    plain = model.signatures["generate_text"](prime=primes, **zero3, **rows)
    xla = model.signatures["generate_text_xla"](prime=primes, **zero3, **rows)
    assert plain["text"].numpy().tolist() == xla["text"].numpy().tolist()
    for name in model.info.state_names:
        np.testing.assert_allclose(plain[name].numpy(), xla[name].numpy(), atol=1e-5)
    ids = tf.constant(model.vocab.encode("the ")[None, :].repeat(3, axis=0))
    assert (
        model.signatures["generate"](ids=ids, **zero3, **rows)["ids"].numpy().tolist()
        == model.signatures["generate_xla"](ids=ids, **zero3, **rows)["ids"].numpy().tolist()
    )


def test_export_without_xla_has_no_twins_and_the_same_text(trained_runs, model_base, tmp_path):
    with in_background(
        lambda: run_cli("export", trained_runs["gru"], "--name", "m", "--base-path", tmp_path, "--no-xla")
    ) as result:
        expected = loaded(model_base / "gru").generate("the ", 80, seed=2)
    result = result.result()
    assert result.returncode == 0, result.stderr
    graph = _meta_graph(tmp_path / "m" / "1")
    assert not any(name.endswith("_xla") for name in graph.signature_def)
    assert load(tmp_path / "m").config["xla_signatures"] == []
    assert load(tmp_path / "m").generate("the ", 80, seed=2) == expected


def test_a_client_falls_back_once_from_the_xla_twin_on_a_server_without_xla(model_base, caplog):
    from servers import ServerProcess

    from keras_charrnn.serving.client import SamplingClient, ServerError

    expected = loaded(model_base / "lstm").generate("the ", 120, temperature=1.0, seed=5)  # in-process: the twin
    args = ["--model_name", "lstm", "--model_base_path", model_base / "lstm", "--xla_cpu_compilation_enabled=false"]
    with ServerProcess(args, debug=True) as server, SamplingClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(ServerError, match="XLA compilation disabled") as failed:
            client.predict("lstm", "generate_text_xla", {})
        assert failed.value.code == "INTERNAL"  # what tensorflow_model_server answers without XLA JIT
        session = client.session("lstm", prime="the ", temperature=1.0, seed=5)
        text = session.generate(60) + session.generate(60)
        again = client.session("lstm", prime="the ", temperature=1.0, seed=5).generate(120)
        calls = [m.group(1) for m in server.log_matches(r"Predict: model lstm version \d+ signature (\w+)")]
        tried_xla = [r for r in caplog.records if "no XLA JIT" in r.getMessage()]
    assert text == again == expected
    assert len(tried_xla) == 1  # the twin was tried by the first call only
    assert calls.count("generate_text_v2") == 3  # every session call ran, on the plain signature


def test_a_client_uses_the_xla_twin_where_the_server_has_xla(server, model_base):
    from keras_charrnn.serving.client import SamplingClient

    with SamplingClient(f"127.0.0.1:{server}") as client:
        text = client.session("gru", prime="the ", temperature=1.0, seed=9).generate(80)
        assert "gru" not in client._without_xla
    assert text == loaded(model_base / "gru").generate("the ", 80, temperature=1.0, seed=9)


def test_reexport_in_place_keeps_the_version_weights_facts_and_outputs(model_base, tmp_path):
    import shutil

    from keras_charrnn.reexport import reexport_savedmodel

    version = tmp_path / "lstm" / "1"
    shutil.copytree(model_base / "lstm" / "1", version)
    before = tf.saved_model.load(str(version))
    inputs = dict(
        prime=tf.constant(["the cat"]),
        num_chars=tf.constant([30]),
        temperature=tf.constant([1.0]),
        top_k=tf.constant([0]),
        top_p=tf.constant([1.0]),
        seed=tf.constant([5], tf.int64),
        position=tf.constant([0], tf.int64),
    )
    config = json.loads(before.signatures["metadata"]()["config"].numpy())
    zeros = {name: tf.zeros([1, config["state_size"]]) for name in config["state_names"]}
    text = before.signatures["generate_text"](**inputs, **zeros)["text"].numpy()
    weights = (version / "variables" / "variables.data-00000-of-00001").read_bytes()

    assert reexport_savedmodel(version) == version
    assert sorted(p.name for p in version.parent.iterdir()) == ["1"]  # nothing left beside it
    after = tf.saved_model.load(str(version))
    assert json.loads(after.signatures["metadata"]()["config"].numpy()) == config
    assert sorted(after.signatures) == sorted(before.signatures)
    assert after.signatures["generate_text"](**inputs, **zeros)["text"].numpy() == text
    assert (version / "variables" / "variables.data-00000-of-00001").read_bytes() == weights
    assert (version / "assets.extra" / "tf_serving_warmup_requests").is_file()


def test_reexport_refuses_a_folder_that_is_not_a_savedmodel_of_this_package(tmp_path):
    from keras_charrnn.reexport import reexport_savedmodel

    (tmp_path / "1").mkdir()
    with pytest.raises(InputError, match="not a SavedModel of this package"):
        reexport_savedmodel(tmp_path / "1")
    assert (tmp_path / "1").is_dir()
