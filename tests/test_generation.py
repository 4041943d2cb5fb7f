"""Generation controls in process: stops that leave the state exactly at the stop, finish reasons, scores,
samples, min_p and bias, and the new signatures' equality with release 0.2's at their defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_charrnn import analysis, load
from keras_charrnn.errors import CharRNNError, ConfigError
from keras_charrnn.generation import INPUTS, inputs_of, sample_seed

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "tiny_v0_2"
PRIME = "the "


@pytest.fixture(scope="module")
def model(model_dir):
    return load(model_dir("lstm"))


@pytest.fixture(scope="module")
def plain(model_dir):
    return load(model_dir("lstm"), xla=False)


def _rows(model, signature, n, **values):
    """``n`` rows of a generate signature's inputs: the table's defaults, ``values`` over them."""
    ctx = model.info.context()
    rows = {
        "prime": tf.constant([PRIME] * n),
        **{k: tf.constant(v) for k, v in model.zero_state(n).items()},
    }
    for spec in inputs_of(signature):
        value = values.get(spec.name, 7 if spec.name == "seed" else None)
        rows[spec.name] = tf.constant(spec.column(n, ctx, value))
    return rows


@pytest.mark.parametrize("flavour", ["", "_xla"])
def test_the_new_signature_at_its_defaults_gives_bit_for_bit_the_old_signatures_text_and_states(model, flavour):
    old = model.signatures["generate_text" + flavour](**_rows(model, "generate_text", 3, num_chars=120))
    new = model.signatures["generate_text_v2" + flavour](**_rows(model, "generate_text_v2", 3, num_chars=120))
    assert new["text"].numpy().tolist() == old["text"].numpy().tolist()
    for name in model.info.state_names:
        assert np.array_equal(new[name].numpy(), old[name].numpy()), name
    assert new["finish_reason"].numpy().tolist() == [b"length"] * 3
    assert new["num_generated"].numpy().tolist() == [120] * 3


def _chunked(model, chunks, **params):
    session = model.session(PRIME, seed=3, temperature=1.0, **params)
    text = ""
    for size in chunks:
        text += session.generate(size)
        if session.last.finish_reason == "stop":
            break
    return text, session


@pytest.mark.parametrize("which", ["plain", "model"])
def test_stops_give_the_same_text_finish_and_states_however_the_calls_are_cut(request, which):
    model = request.getfixturevalue(which)
    free, _ = _chunked(model, [300])
    stops = (free[40:43], "\u00a7never")[:1] + ("zzq",)  # a stop the text reaches by character 43; one it never does
    one, whole = _chunked(model, [300], stop=stops)
    assert whole.last.finish_reason == "stop" and one.endswith(whole.last.stop) and whole.last.stop == stops[0]
    assert 3 < len(one) <= 43 and free.startswith(one)
    for chunks in ([1] * 300, [7] * 50, [64] * 5, [len(one) - 2, 5]):  # the last one straddles the stop
        text, session = _chunked(model, chunks, stop=stops)
        assert text == one, chunks
        assert (session.last.finish_reason, session.last.stop) == ("stop", whole.last.stop)
        assert session.position == whole.position == len(one)
        for name in model.info.state_names:  # bit for bit, in the plain graph and under XLA
            assert np.array_equal(session.states[name], whole.states[name]), (chunks, name)


def test_after_a_stop_the_state_is_that_of_the_text_and_feeding_continues_as_a_fresh_session(plain):
    session = plain.session(PRIME, seed=5, temperature=1.0, stop="e ")
    text = session.generate(200)
    assert session.last.finish_reason == "stop" and text.endswith("e ")
    ids = np.array([plain.vocab.encode(PRIME + text[:-1])], np.int32)
    reference = plain.signatures["step"](
        ids=tf.constant(ids), **{k: tf.constant(v) for k, v in plain.zero_state(1).items()}
    )
    for name in plain.info.state_names:
        np.testing.assert_allclose(session.states[name], reference[name].numpy(), atol=1e-6)
    assert session.pending == text[-1]

    session.feed("and ")
    after = session.generate(60)
    fresh = plain.session(PRIME + text + "and ", seed=5, temperature=1.0, stop="e ")
    fresh.position = session.position - len(after)  # the same randomness keys
    assert fresh.generate(60) == after
    assert fresh.last.finish_reason == session.last.finish_reason


def test_min_chars_keeps_a_stop_from_ending_the_text_too_soon_and_counts_from_the_last_feed(plain):
    text = plain.session(PRIME, seed=2, temperature=1.0).generate(300)
    first = text.index(" ") + 1
    assert plain.session(PRIME, seed=2, temperature=1.0, stop=" ").generate(300) == text[:first]
    later = plain.session(PRIME, seed=2, temperature=1.0, stop=" ", min_chars=first + 1).generate(300)
    assert later == text[: text.index(" ", first) + 1]
    assert plain.session(PRIME, seed=2, temperature=1.0, stop=" ").generate(300, strip_stop=True) == text[: first - 1]


def test_scores_equal_what_score_measures_and_the_alternatives_are_the_most_likely(model):
    result = model.complete(PRIME, 80, logprobs=5, seed=4, temperature=1.0)
    losses = analysis.char_losses(model, PRIME + result.text)[len(PRIME) - 1 :]
    np.testing.assert_allclose(result.logprobs, -losses, atol=1e-5)
    ids = np.array([model.vocab.encode(PRIME + result.text[:-1])], np.int32)
    zero = {k: tf.constant(v) for k, v in model.zero_state(1).items()}
    logits = model.signatures["step"](ids=tf.constant(ids), **zero)["logits"].numpy()[0, len(PRIME) - 1 :]
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    chars = ["\ufffd"] + model.vocab.chars
    for t, alternatives in enumerate(result.top_logprobs):
        assert len(alternatives) == 5
        best = np.argsort(-logp[t, 1:])[:5] + 1
        assert set(alternatives) == {chars[i] for i in best}
        for char, value in alternatives.items():
            assert abs(value - logp[t, chars.index(char)]) < 1e-5
    assert model.complete(PRIME, 20, logprobs=0, seed=4).top_logprobs is None


def test_samples_reproduce_one_by_one_and_sample_zero_is_the_plain_session(model):
    samples = model.samples(PRIME, 5, 60, seed=11, stop="\n", logprobs=0)
    assert [s.index for s in samples] == list(range(5))
    assert samples[0].text == model.generate(PRIME, 60, seed=11, stop="\n")
    assert len({s.text for s in samples}) > 1
    for s in samples:
        alone = model.complete(PRIME, 60, logprobs=0, seed=sample_seed(11, s.index), stop="\n")
        assert (alone.text, alone.finish_reason) == (s.text, s.finish_reason)
        np.testing.assert_allclose(alone.logprobs, s.logprobs, atol=1e-6)
        assert s.seed == sample_seed(11, s.index)
    follow = samples[2].session.generate(30)
    again = model.session(PRIME, seed=sample_seed(11, 2), stop="\n")
    again.generate(60)
    assert again.generate(30) == follow


def test_a_bias_of_minus_100_bans_characters_and_min_p_one_is_greedy(model):
    banned = "aeiou"
    text = model.generate(PRIME, 300, seed=1, temperature=1.5, bias={c: -100 for c in banned})
    assert not set(text) & set(banned)
    greedy = model.generate(PRIME, 100, temperature=0)
    assert model.generate(PRIME, 100, seed=9, temperature=1.0, min_p=1.0) == greedy


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
        ({"stop": ["x" * 33]}, "at most 32 characters"),
        ({"stop": [""]}, "non-empty"),
        ({"min_p": 1.5}, "min_p must be in [0, 1]"),
        ({"bias": {"e": -101}}, "[-100, 100]"),
        ({"bias": {"ab": 1}}, "single characters"),
        ({"min_chars": -1}, "min_chars must be"),
    ],
)
def test_bad_generation_controls_are_refused_before_any_call_naming_the_parameter(model, fields, message):
    with pytest.raises(ConfigError, match=None) as caught:
        model.session(PRIME, **fields)
    assert message in str(caught.value)


def test_stops_and_bias_outside_the_vocabulary_and_too_many_alternatives_are_refused(model):
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        model.generate(PRIME, 10, stop="\u00e9t\u00e9")
    with pytest.raises(ConfigError, match="not in the model's vocabulary"):
        model.session(PRIME, bias={"\u00e9": -100})
    with pytest.raises(ConfigError, match="logprobs must be"):
        model.complete(PRIME, 10, logprobs=11)
    with pytest.raises(ConfigError, match="bans every character"):
        model.session(PRIME, bias={c: -100 for c in model.vocab.chars})


def test_the_graph_refuses_what_the_table_refuses_with_the_same_messages(model):
    generate = model.signatures["generate_text_v2"]
    for name, value, message in [
        ("min_p", 2.0, "min_p must be in [0, 1]"),
        ("logprobs", 99, "logprobs must be -1"),
        ("min_chars", -3, "min_chars must be 0 or more"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
    ]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=None) as caught:
            generate(**_rows(model, "generate_text_v2", 2, **{name: value}))
        assert message in caught.value.message, name
    rows = _rows(model, "generate_text_v2", 1, stop=("\u00e9",))
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocabulary"):
        generate(**rows)


def test_every_generation_input_of_the_table_is_an_input_of_the_signatures_and_nothing_else(model):
    for signature in ("generate_text", "generate_text_v2", "generate", "generate_v2"):
        spec = model.signatures[signature].structured_input_signature[1]
        names = set(spec) - set(model.info.state_names) - {"prime", "ids"}
        assert names == {i.name for i in inputs_of(signature)}, signature
    assert {i.name for i in inputs_of("generate_text_v2")} == {i.name for i in INPUTS}


def test_a_model_exported_by_0_2_keeps_its_text_and_says_which_signature_a_new_feature_needs():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    old = load(FIXTURE)
    assert "generate_text_v2" not in old.signatures
    s = expected["session"]
    session = old.session(s["prime"], seed=s["seed"], temperature=s["temperature"])
    assert "".join(session.generate(n) for n in s["calls"]) == s["text"]
    g = expected["generate"]
    assert old.generate(g["prime"], g["n"], seed=g["seed"], temperature=g["temperature"], top_k=g["top_k"]) == g["text"]
    for call in (
        lambda: old.session("x", stop="\n"),
        lambda: old.complete("x", 10, logprobs=0),
        lambda: old.session("x", bias={"a": 1.0}),
    ):
        with pytest.raises(CharRNNError, match="no 'generate_text_v2' signature"):
            call()
    saved_by_0_2 = json.loads(old.session("the ", seed=1).to_json())
    for field in ("min_p", "bias", "stop", "min_chars", "stop_tail", "min_chars_left"):
        saved_by_0_2.pop(field)
    restored = old.restore(json.dumps(saved_by_0_2))
    assert restored.generate(40) == s["text"][:40]
