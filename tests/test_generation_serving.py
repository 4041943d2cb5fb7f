"""Stops, finish reasons, scores, samples and constraints served by ``charrnn serve``: gRPC, the client, REST.

Real server processes on loopback; the in-process model (``keras_charrnn.load``) is the reference.
One server (batching on, REST on, lowered generation limits) serves the tiny lstm for every test but
the compatibility ones, which serve the 0.2.0 export in ``tests/fixtures/models/tiny_v0_2``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from keras_charrnn import generation, load
from keras_charrnn.errors import InputError
from keras_charrnn.generation import completions, sample_seed
from keras_charrnn.serving import wire
from keras_charrnn.serving.client import SamplingClient, ServerError
from servers import ServerProcess, free_ports, http_call

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "tiny_v0_2"
LIMITS = {"max_stops": 3, "max_stop_chars": 16, "max_logprobs": 5}  # lowered: below the models' caps (4, 32, 10)
V2 = "generate_text_v2"


@pytest.fixture(scope="module")
def served(model_base, tmp_path_factory):
    """The lstm served with batching (calls wait 50 ms for company), REST and ``LIMITS``: (gRPC port, REST URL)."""
    params = tmp_path_factory.mktemp("gen") / "batching.txt"
    params.write_text(
        "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 50000 }\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 16 }\n"
    )
    (rest_port,) = free_ports(1)
    flags = [f for name, value in LIMITS.items() for f in (f"--{name}", value)]
    args = ["--model_name", "lstm", "--model_base_path", model_base / "lstm", "--enable_batching"]
    args += ["--batching_parameters_file", params, "--rest_api_port", rest_port, *flags]
    with ServerProcess(args, debug=True) as server:
        yield server, f"http://127.0.0.1:{rest_port}"


@pytest.fixture(scope="module")
def client(served):
    with SamplingClient(f"127.0.0.1:{served[0].port}") as c:
        yield c


@pytest.fixture(scope="module")
def lstm(model_base):
    return load(model_base / "lstm")


def row(model, prime: str = "the ", **values) -> dict[str, np.ndarray]:
    """One row of ``generate_text_v2``'s inputs: zero states, the table's defaults, ``values`` (bias by character)."""
    ctx = generation.context(model.info.vocab_size)
    if isinstance(values.get("logit_bias"), dict):
        bias = np.zeros(model.info.vocab_size, np.float32)
        for char, value in values["logit_bias"].items():
            bias[model.info.vocabulary.index(char)] = value
        values["logit_bias"] = bias
    arrays = {"prime": np.array([prime.encode()], dtype=object), **model.zero_state(1)}
    for spec in generation.inputs_of(V2):
        arrays[spec.name] = spec.column(1, ctx, values.get(spec.name, 0 if spec.name == "seed" else None))
    return arrays


def stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows as one call (the stop lists padded with empty strings to the longest)."""
    width = max(r["stop"].shape[1] for r in rows)
    padded = [
        {**r, "stop": np.concatenate([r["stop"], np.full([1, width - r["stop"].shape[1]], b"", object)], 1)}
        for r in rows
    ]
    return {k: np.concatenate([r[k] for r in padded]) for k in rows[0]}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def first_new(text: str, start: int, lengths=(3, 4, 5, 6)) -> str:
    """A substring of ``text`` beginning at ``start`` or later that does not occur before it (a stop for that place)."""
    for at in range(start, len(text) - 6):
        for n in lengths:
            piece = text[at : at + n]
            if piece not in text[: at + n - 1]:
                return piece
    raise AssertionError("no fresh substring")


def assert_completions_equal(got, want, scores: bool = True) -> None:
    assert [(c.text, c.finish_reason, c.stop, c.num_chars) for c in got] == [
        (c.text, c.finish_reason, c.stop, c.num_chars) for c in want
    ]
    if scores:
        for g, w in zip(got, want):
            assert (g.logprobs is None) == (w.logprobs is None)
            if w.logprobs is not None:
                np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
            if w.top_logprobs is not None:
                assert [list(t) for t in g.top_logprobs] == [list(t) for t in w.top_logprobs]
                np.testing.assert_allclose(
                    [list(t.values()) for t in g.top_logprobs], [list(t.values()) for t in w.top_logprobs], atol=1e-5
                )


def mixed_calls(model) -> list[dict[str, np.ndarray]]:
    """Calls of one or two rows that differ in every new input (stops, bias, min_p, scores, min_chars, lengths)."""
    return [
        stack([row(model, seed=1, num_chars=40)]),
        stack([row(model, seed=2, num_chars=60, stop=(" ", "e"), logprobs=2)]),
        stack([row(model, "a ", seed=3, num_chars=30, logit_bias={"e": -100.0, "a": 3.0}, min_p=0.05)]),
        stack([row(model, seed=4, num_chars=50, logprobs=5, stop=("\n",), min_chars=10), row(model, seed=5)]),
        stack([row(model, "lazy ", seed=6, num_chars=25, temperature=0.0, logprobs=0)]),
        stack([row(model, seed=7, num_chars=64, stop=("the", "dog", "cat"), top_k=4, top_p=0.9, logprobs=3)]),
    ]


def test_mixed_rows_batched_concurrently_get_bitwise_what_they_get_alone(client, served, lstm):
    server, _ = served
    calls = mixed_calls(lstm) * 2
    alone = [client.predict("lstm", V2, call)[0] for call in calls]
    before = len(server.log_matches(r"ran a batch of (\d+) rows from (\d+) calls .* generate_text_v2"))
    with ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(lambda call: client.predict("lstm", V2, call)[0], calls))
    for a, t in zip(alone, together):
        assert_same(a, t)
    merged = [
        int(m.group(2)) for m in server.log_matches(r"ran a batch of (\d+) rows from (\d+) calls .* generate_text_v2")
    ]
    assert max(merged[before:]) > 1, merged  # calls of different stops, biases and scores shared model runs
    ended = {reason for a in alone for reason in a["finish_reason"].tolist()}
    assert ended == {b"stop", b"length"}  # stops matched and rows ran to their length, side by side


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_a_stop_straddling_calls_ends_the_text_as_one_call_does_and_leaves_the_same_state(client, lstm, chunk):
    plain = lstm.generate("the ", 200, seed=11)
    stop = first_new(plain, 60)  # a stop that first occurs after character 60: it spans calls of 1 and 7
    whole = client.session("lstm", prime="the ", seed=11, stop=[stop, "qqq"])
    one = whole.complete(200)
    assert one.finish_reason == "stop" and one.stop == stop and one.text == plain[: plain.index(stop) + len(stop)]
    chunked = client.session("lstm", prime="the ", seed=11, stop=[stop, "qqq"])
    assert "".join(chunked.stream(200, chunk=chunk)) == one.text
    assert (chunked.last.finish_reason, chunked.last.stop, chunked.last.num_chars) == ("stop", stop, one.num_chars)
    assert (chunked.position, chunked.pending, chunked.tail) == (whole.position, whole.pending, whole.tail)
    for name in whole.states:  # bit for bit: every fed character goes through the loop's one step
        assert np.array_equal(chunked.states[name], whole.states[name]), name
    reference = lstm.session("the ", seed=11, stop=[stop, "qqq"])
    assert reference.complete(200).text == one.text
    for name in whole.states:  # the state at the stop is the in-process session's
        np.testing.assert_allclose(whole.states[name], reference.states[name], rtol=1e-6, atol=1e-6)
    for session in (whole, chunked, reference):
        session.feed(" over")
    after = reference.generate(40)
    assert whole.generate(40) == after and chunked.generate(40) == after


def test_segmented_calls_with_a_stop_in_a_later_segment_equal_in_process(client, served, lstm):
    long_text = lstm.generate("the ", 700, seed=21, temperature=1.0)
    late = first_new(long_text, 400)  # ends the row in the second segment (SEGMENT_CHARS = 256)
    early = first_new(long_text, 30)
    cases = [
        dict(seed=21, temperature=1.0, num_chars=700, stop=(late,), logprobs=2),
        dict(seed=21, temperature=1.0, num_chars=700, stop=(early,), logprobs=2),
        dict(seed=22, num_chars=600, logprobs=-1, min_p=0.02),
    ]
    inputs = stack([row(lstm, **case) for case in cases])
    outputs, _ = client.predict("lstm", V2, inputs)
    got = completions(outputs, inputs, lstm.info.vocabulary)
    want = [
        lstm.complete(
            "the ",
            case["num_chars"],
            case["logprobs"],
            seed=case["seed"],
            temperature=case.get("temperature", generation.DEFAULT_TEMPERATURE),
            stop=case.get("stop", ()),
            min_p=case.get("min_p", 0.0),
        )
        for case in cases
    ]
    assert [c.finish_reason for c in got] == ["stop", "stop", "length"] and got[0].num_chars > 400
    assert_completions_equal(got, want)
    assert outputs["char_logprobs"].shape == (3, 700) and outputs["top_ids"].shape == (3, 700, 2)
    assert outputs["num_generated"].tolist() == [c.num_chars for c in want]
    for r, case in enumerate(cases):
        reference = lstm.session(
            "the ",
            seed=case["seed"],
            temperature=case.get("temperature", 0.8),
            stop=case.get("stop", ()),
            min_p=case.get("min_p", 0.0),
        )
        reference.complete(case["num_chars"])
        for name in lstm.info.state_names:
            np.testing.assert_allclose(outputs[name][r : r + 1], reference.states[name], rtol=1e-6, atol=1e-6)
    # The ids signature matches its stops across segments too (its tail made of ids).
    ids_in = {k: v for k, v in inputs.items() if k != "prime"}
    ids_in["ids"] = np.full([3, 4], 0, np.int32)
    for r in range(3):
        ids_in["ids"][r] = [lstm.info.vocabulary.index(c) for c in "the "]
    by_ids, _ = client.predict("lstm", "generate_v2", ids_in)
    assert by_ids["num_generated"].tolist() == outputs["num_generated"].tolist()
    assert by_ids["stop_index"].tolist() == outputs["stop_index"].tolist()
    assert [
        "".join(lstm.info.vocabulary[i] for i in ids[:n]) for ids, n in zip(by_ids["ids"], by_ids["num_generated"])
    ] == [c.text for c in got]


def test_scores_and_samples_from_the_server_equal_in_process(client, lstm):
    got = client.complete("lstm", "the ", 80, logprobs=4, seed=3, stop=["dog"])
    want = lstm.complete("the ", 80, 4, seed=3, stop=["dog"])
    assert_completions_equal([got], [want])
    assert got.logprobs is not None and len(got.top_logprobs[0]) == 4
    samples = client.samples("lstm", "the ", 5, 40, logprobs=0, seed=3, stop=["\n", " a "])
    assert [s.index for s in samples] == list(range(5)) and [s.seed for s in samples] == [
        sample_seed(3, i) for i in range(5)
    ]
    assert_completions_equal(samples, lstm.samples("the ", 5, 40, 0, seed=3, stop=["\n", " a "]))
    for i, sample in enumerate(samples):  # each reproduces alone, as a plain session with its seed
        session = client.session("lstm", prime="the ", seed=sample_seed(3, i), stop=["\n", " a "])
        assert_completions_equal([session.complete(40, 0)], [sample])
        assert sample.session.generate(20) == session.generate(20)  # and continues as that session
    assert samples[0].text == client.session("lstm", prime="the ", seed=3, stop=["\n", " a "]).generate(40)


def _refusal(client, inputs) -> str:
    with pytest.raises(ServerError) as raised:
        client.predict("lstm", V2, inputs)
    assert raised.value.status == grpc.StatusCode.INVALID_ARGUMENT, raised.value
    return raised.value.details


def test_every_new_input_is_refused_over_its_limit_naming_the_limit_and_its_flag(client, served, lstm):
    info = client.model_info("lstm")
    assert {k: info.limits[k] for k in LIMITS} == LIMITS  # advertised in the metadata
    long_stop = "e" * 17
    cases = [
        (row(lstm, stop=("a", "b", "c", "d")), "max_stops=3"),  # the models' cap is 4: the server's lower limit
        (row(lstm, stop=(long_stop,)), "max_stop_chars=16"),
        (row(lstm, stop=("é" * 48,)), "max_stop_chars=16"),  # 96 bytes: refused before it is decoded
        (row(lstm, logprobs=6), "max_logprobs=5"),
        (row(lstm, logprobs=11), "max_logprobs=5"),
    ]
    for inputs, limit in cases:
        details = _refusal(client, inputs)
        assert limit in details and f"--{limit.split('=')[0]})" in details, details  # "(set by charrnn serve --...)"
    rules = [
        (row(lstm, stop=("€",)), "outside the model's vocabulary"),
        (row(lstm, min_p=1.5), "min_p must be in [0, 1]"),
        (row(lstm, logit_bias=np.full(lstm.info.vocab_size, -100.0, np.float32)), "bans every character"),
        (row(lstm, logit_bias=np.full(lstm.info.vocab_size, np.nan, np.float32)), "logit_bias values must be finite"),
        (row(lstm, logprobs=-2), "logprobs must be -1"),
        (row(lstm, min_chars=-1), "min_chars must be 0 or more"),
        ({**row(lstm), "logit_bias": np.zeros([1, 3], np.float32)}, "logit_bias"),
    ]
    for inputs, fragment in rules:
        assert fragment in _refusal(client, inputs)


def test_a_huge_claimed_stop_shape_is_refused_before_anything_is_allocated(served, lstm):
    server, _ = served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "lstm", V2
    for key, value in row(lstm).items():
        wire.to_tensor_proto(value, request.inputs[key])
    stop = request.inputs["stop"]
    stop.Clear()
    stop.dtype = wire.DT_STRING
    stop.tensor_shape.dim.add(size=1)
    stop.tensor_shape.dim.add(size=200_000)  # TensorFlow would repeat the last value to fill it
    stop.string_val.append(b"x")
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_stops=3" in raised.value.details()


def test_a_bad_row_in_a_batch_does_not_fail_its_neighbours(client, lstm):
    good = mixed_calls(lstm)
    alone = [client.predict("lstm", V2, call)[0] for call in good]
    bad = [row(lstm, stop=("€",)), row(lstm, logprobs=9), row(lstm, min_p=-1.0), row(lstm, stop=("a",) * 4)]

    def call(inputs):
        try:
            return client.predict("lstm", V2, inputs)[0]
        except ServerError as exc:
            return exc.status

    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        answers = list(pool.map(call, good + bad))
    for a, t in zip(alone, answers):
        assert_same(a, t)
    assert answers[len(good) :] == [grpc.StatusCode.INVALID_ARGUMENT] * len(bad)


def test_rest_predict_on_generate_text_v2_in_row_and_columnar_format(client, served, lstm):
    _, url = served
    calls = [row(lstm, seed=8, num_chars=50, stop=("e ", "the"), logprobs=2), row(lstm, "a ", seed=9, num_chars=30)]
    expected, _ = client.predict("lstm", V2, stack(calls))

    def plain(value):
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value.decode() if isinstance(value, bytes) else value

    # The rows' stop lists differ in length: the server pads the shorter with "".
    instances = [{k: plain(v.tolist()[0]) for k, v in call.items()} for call in calls]
    status, answer = http_call(f"{url}/v1/models/lstm:predict", {"signature_name": V2, "instances": instances})
    assert status == 200, answer
    for r, prediction in enumerate(answer["predictions"]):
        assert prediction["text"] == expected["text"][r].decode()
        assert prediction["finish_reason"] == expected["finish_reason"][r].decode()
        assert prediction["num_generated"] == int(expected["num_generated"][r])
        assert prediction["stop_index"] == int(expected["stop_index"][r])
        np.testing.assert_array_equal(np.array(prediction["char_logprobs"], np.float32), expected["char_logprobs"][r])
        np.testing.assert_array_equal(np.array(prediction["top_ids"]), expected["top_ids"][r])
    columns = {k: [instance[k] for instance in instances] for k in instances[0]}
    status, answer = http_call(f"{url}/v1/models/lstm:predict", {"signature_name": V2, "inputs": columns})
    assert status == 200, answer
    outputs = answer["outputs"]
    assert outputs["text"] == [t.decode() for t in expected["text"]]
    assert outputs["finish_reason"] == [f.decode() for f in expected["finish_reason"]]
    assert outputs["num_generated"] == expected["num_generated"].tolist()
    np.testing.assert_array_equal(np.array(outputs["top_logprobs"], np.float32), expected["top_logprobs"])
    for name in lstm.info.state_names:
        np.testing.assert_array_equal(np.array(outputs[name], np.float32), expected[name])
    bad = {"signature_name": V2, "inputs": {**columns, "logprobs": [6, -1]}}
    status, answer = http_call(f"{url}/v1/models/lstm:predict", bad)
    assert status == 400 and "max_logprobs=5" in answer["error"], answer


# ----- compatibility: a model exported by 0.2.0, and clients written for 0.2 --------------------------------


@pytest.fixture(scope="module")
def old_server():
    with ServerProcess(["--model_name", "tiny", "--model_base_path", FIXTURE]) as server:
        yield server


def _plain_predict(port: int, model: str, signature: str, inputs: dict[str, np.ndarray]):
    """A request as a TF Serving client written for 0.2 sends it: tensorflow_serving.apis and a gRPC stub."""
    import tensorflow as tf

    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = model, signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return {k: tf.make_ndarray(v) for k, v in stub.Predict(request, timeout=60).outputs.items()}


def _v02_inputs(state_names, state_size: int, prime: str, n: int, seed: int, **sampling) -> dict[str, np.ndarray]:
    return {
        "prime": np.array([prime.encode()], dtype=object),
        **{name: np.zeros([1, state_size], np.float32) for name in state_names},
        "num_chars": np.array([n], np.int32),
        "temperature": np.array([sampling.get("temperature", 0.8)], np.float32),
        "top_k": np.array([sampling.get("top_k", 0)], np.int32),
        "top_p": np.array([1.0], np.float32),
        "seed": np.array([seed], np.int64),
        "position": np.array([0], np.int64),
    }


def test_a_model_exported_by_0_2_serves_0_2_clients_and_sessions_the_text_it_gave(old_server):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    with SamplingClient(f"127.0.0.1:{old_server.port}") as client:
        info = client.model_info("tiny")
        assert not info.controlled and "generate_text_v2" not in info.signatures
        g = expected["generate"]
        inputs = _v02_inputs(
            info.state_names,
            info.state_size,
            g["prime"],
            g["n"],
            g["seed"],
            temperature=g["temperature"],
            top_k=g["top_k"],
        )
        assert _plain_predict(old_server.port, "tiny", "generate_text", inputs)["text"][0].decode() == g["text"]
        s = expected["session"]
        session = client.session("tiny", prime=s["prime"], seed=s["seed"], temperature=s["temperature"])
        assert "".join(session.generate(n) for n in s["calls"]) == s["text"]
        for name, total in s["state_sum"].items():
            assert abs(float(session.states[name].sum()) - total) < 1e-4
        with pytest.raises(InputError, match="generate_text_v2"):
            client.session("tiny", prime="the ", stop="\n")
        with pytest.raises(InputError, match="generate_text_v2"):
            client.complete("tiny", "the ", 10, logprobs=0)
        with pytest.raises(InputError, match="generate_text_v2"):
            client.session("tiny", prime="the ", bias={"e": -100.0})
        plain = client.samples("tiny", "the ", 2, 20, seed=4)  # several samples need no new signature
        assert plain[0].text == client.session("tiny", prime="the ", seed=4).generate(20)


def test_plain_tf_serving_requests_on_both_signatures_give_the_same_text(served, lstm):
    server, _ = served
    inputs = _v02_inputs(lstm.info.state_names, lstm.info.state_size, "the ", 60, 5, temperature=1.0)
    old = _plain_predict(server.port, "lstm", "generate_text", inputs)
    new = _plain_predict(server.port, "lstm", V2, {**row(lstm, seed=5, num_chars=60, temperature=1.0)})
    assert new["text"][0] == old["text"][0] and new["finish_reason"][0] == b"length"
    assert (
        new["num_generated"][0] == 60 and new["char_logprobs"].shape == (1, 60) and new["top_ids"].shape == (1, 60, 0)
    )
    for name in lstm.info.state_names:
        np.testing.assert_array_equal(new[name], old[name])
