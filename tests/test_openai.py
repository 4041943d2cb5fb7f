"""The OpenAI-compatible endpoint on the REST port, API keys and TLS, with the official `openai` package as client.

Against real ``charrnn serve`` subprocesses serving the tiny lstm model; each answer is checked
against what the package computes in-process (sessions, samples, scores).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
from google.protobuf import text_format

from keras_charrnn import load
from keras_charrnn.analysis import char_losses
from keras_charrnn.generation import sample_seed
from keras_charrnn.serving.config_files import SSLConfig
from servers import ServerProcess, free_ports, http_call

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key-1"


@pytest.fixture(scope="module")
def keyed(model_base, tmp_path_factory):
    """A server of the lstm model with the REST port, API keys, continuation tokens and metrics; yields
    ``(base_url, key_file)``."""
    folder = tmp_path_factory.mktemp("openai")
    (folder / "keys.txt").write_text(f"# keys\n{KEY}\n")
    (folder / "continuation.key").write_text("a-secret-of-at-least-16-bytes\n")
    (folder / "monitoring.config").write_text("prometheus_config { enable: true }\n")
    (port,) = free_ports(1)
    args = [
        "--model_name", "lstm", "--model_base_path", model_base / "lstm", "--rest_api_port", port,
        "--api_key_file", folder / "keys.txt", "--continuation_key_file", folder / "continuation.key",
        "--monitoring_config_file", folder / "monitoring.config", "--max_rows_per_call", 8,
        "--max_chars_per_call", 600,
    ]  # fmt: skip
    with ServerProcess(args):
        yield f"http://127.0.0.1:{port}", folder / "keys.txt"


@pytest.fixture(scope="module")
def client(keyed) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lstm(model_base):
    return load(model_base / "lstm")


def test_a_completion_is_the_sessions_text_and_the_same_every_time(client, lstm):
    ask = dict(model="lstm", prompt="the quick ", max_tokens=300, temperature=0.8, top_p=0.95, seed=7)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    expected = lstm.session("the quick ", seed=7, temperature=0.8, top_p=0.95).generate(300)
    assert first.choices[0].text == again.choices[0].text == expected  # 300 > one segment of 256
    assert first.object == "text_completion" and first.model == "lstm" and first.id.startswith("cmpl-")
    assert first.choices[0].finish_reason == "length" and first.choices[0].logprobs is None
    assert (first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens) == (10, 300, 310)


def test_n_choices_per_prompt_are_the_sessions_samples_and_stops_end_them(client, lstm):
    prompts = ["the ", "a lazy "]
    answer = client.completions.create(
        model="lstm/1", prompt=prompts, n=3, max_tokens=40, temperature=1.0, seed=11, stop=["o", "\n"]
    )
    assert [c.index for c in answer.choices] == list(range(6))
    samples = [s for p in prompts for s in lstm.samples(p, 3, 40, seed=11, temperature=1.0, stop=("o", "\n"))]
    for choice, sample in zip(answer.choices, samples, strict=True):
        assert choice.text == sample.text_without_stop and choice.finish_reason == sample.finish_reason
    alone = lstm.session("a lazy ", seed=sample_seed(11, 2), temperature=1.0, stop=("o", "\n")).generate(40, True)
    assert answer.choices[5].text == alone  # choice i: a plain session with the seed sample_seed(seed, i)
    reasons = {c.finish_reason for c in answer.choices}
    assert "stop" in reasons and all("o" not in c.text and "\n" not in c.text for c in answer.choices)
    assert answer.usage.completion_tokens == sum(s.num_chars for s in samples)


def test_logprobs_are_the_packages_scores_and_echo_scores_the_prompt(client, lstm):
    prompt = "seven cats "
    answer = client.completions.create(
        model="lstm", prompt=prompt, max_tokens=30, temperature=0.7, seed=3, logprobs=3, echo=True
    )
    own = lstm.complete(prompt, 30, logprobs=3, seed=3, temperature=0.7)
    choice = answer.choices[0]
    lp = choice.logprobs
    assert choice.text == prompt + own.text
    assert lp.tokens == list(prompt + own.text) and lp.text_offset == list(range(len(prompt) + 30))
    assert lp.token_logprobs[len(prompt) :] == pytest.approx(own.logprobs, abs=1e-6)
    for got, want in zip(lp.top_logprobs[len(prompt) :], own.top_logprobs):
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=1e-6)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first character
    assert lp.token_logprobs[1 : len(prompt)] == pytest.approx(-char_losses(lstm, prompt), abs=1e-4)
    assert all(len(t) == 3 for t in lp.top_logprobs[1:])
    plain = client.completions.create(model="lstm", prompt=prompt, max_tokens=30, temperature=0.7, seed=3, logprobs=0)
    assert plain.choices[0].logprobs.text_offset[0] == len(prompt) and plain.choices[0].logprobs.top_logprobs is None
    scored = client.completions.create(model="lstm", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0


def test_a_streamed_completion_equals_the_unstreamed_one(client):
    ask = dict(
        model="lstm", prompt=["the ", "sit on "], n=2, max_tokens=300, temperature=0.9, seed=5, stop=" ma", logprobs=1
    )
    whole = client.completions.create(**ask)
    texts, scores, reasons, chunks = {}, {}, {}, 0
    for chunk in client.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        chunks += 1
        if chunk.usage is not None:
            assert chunk.usage == whole.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            scores[c.index] = scores.get(c.index, []) + (c.logprobs.token_logprobs if c.logprobs else [])
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert chunks > 2
    for c in whole.choices:
        assert texts[c.index] == c.text and reasons[c.index] == c.finish_reason
        assert scores[c.index] == c.logprobs.token_logprobs


def test_a_continuation_token_continues_as_the_session_does(client, lstm, model_base):
    ask = dict(model="lstm", max_tokens=40, temperature=0.8)
    first = client.completions.create(**ask, prompt="the ", seed=21)
    token = first.choices[0].model_extra["continuation"]
    session = lstm.session("the ", seed=21, temperature=0.8)
    assert first.choices[0].text == session.generate(40)
    fork = session.fork()
    more = client.completions.create(**ask, prompt="", extra_body={"continuation": token})
    assert more.choices[0].text == session.generate(40)
    fed = client.completions.create(**ask, prompt=" dog", extra_body={"continuation": token})
    fork.feed(" dog")
    assert fed.choices[0].text == fork.generate(40)
    head, _, mac = token.partition(".")
    changed = head[:-2] + ("A" if head[-2] != "A" else "B") + head[-1] + "." + mac
    for bad in (changed, "not-a-token", _signed_elsewhere(token)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**ask, prompt="", extra_body={"continuation": bad})
        assert refused.value.param == "continuation"
    with pytest.raises(openai.BadRequestError, match="n 1"):
        client.completions.create(**ask, prompt="", n=2, extra_body={"continuation": token})


def _signed_elsewhere(token: str) -> str:
    """The same fields, signed with another server's key."""
    from keras_charrnn.serving.continuation import Continuations, _unb64

    return Continuations(b"another-server-secret-key").sign(json.loads(_unb64(token.partition(".")[0])))


@pytest.mark.parametrize(
    ("ask", "error", "param"),
    [
        ({"best_of": 2}, openai.BadRequestError, "best_of"),
        ({"suffix": "end"}, openai.BadRequestError, "suffix"),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty"),
        ({"frequency_penalty": -1}, openai.BadRequestError, "frequency_penalty"),
        ({"model": "nosuchmodel"}, openai.NotFoundError, "model"),
        ({"model": "lstm/9"}, openai.NotFoundError, "model"),
        ({"n": 9}, openai.BadRequestError, "n"),
        ({"n": 3, "prompt": ["a", "b", "c"]}, openai.BadRequestError, "n"),
        ({"max_tokens": 601}, openai.BadRequestError, "max_tokens"),
        ({"temperature": "hot"}, openai.BadRequestError, "temperature"),
        ({"top_p": 0}, openai.BadRequestError, "top_p"),
        ({"logprobs": 6}, openai.BadRequestError, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
        ({"stop": "\u00e9t\u00e9"}, openai.BadRequestError, "stop"),
        ({"logit_bias": {"x": 1}}, openai.BadRequestError, "logit_bias"),
        ({"logit_bias": {"9999": 1}}, openai.BadRequestError, "logit_bias"),
        ({"prompt": 5}, openai.BadRequestError, "prompt"),
        ({"seed": 2**63}, openai.BadRequestError, "seed"),
    ],
)
def test_refusals_have_the_apis_shape_status_and_parameter(client, ask, error, param):
    with pytest.raises(error) as refused:
        client.completions.create(**{"model": "lstm", "prompt": "the ", "max_tokens": 5, **ask})
    assert refused.value.param == param and refused.value.type == "invalid_request_error"
    assert refused.value.message


def test_logit_bias_bans_characters_by_id_from_the_vocabulary_route(client, keyed):
    vocabulary = client.get("/models/lstm/vocabulary", cast_to=object)["tokens"]
    banned = {str(i): -100 for i, c in enumerate(vocabulary) if c in "aeiou "}
    text = client.completions.create(model="lstm", prompt="the ", max_tokens=80, logit_bias=banned, seed=1).choices[0]
    assert text.text and not set(text.text) & set("aeiou ")


def test_chat_completions_are_refused_with_a_pointer_to_completions(client):
    with pytest.raises(openai.BadRequestError, match="use POST /v1/completions"):
        client.chat.completions.create(model="lstm", messages=[{"role": "user", "content": "hi"}])


def test_models_lists_every_model_and_version(client):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["lstm", "lstm/1"]
    assert all(m.object == "model" and m.owned_by == "charrnn" for m in listed.data)


def _get(url: str, key: str | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_keys_guard_every_route_but_model_status_and_are_reread(keyed):
    url, key_file = keyed
    assert http_call(f"{url}/v1/models/lstm")[0] == 200  # the probes' route stays open
    assert http_call(f"{url}/v1/models/lstm/versions/1")[0] == 200
    for path in ("/v1/models", "/v1/models/lstm/metadata", "/playground", "/monitoring/prometheus/metrics"):
        status, body, headers = _get(url + path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert _get(url + path, "sk-wrong")[0] == 401
        assert _get(url + path, KEY)[0] == 200, path
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    page = _get(url + "/playground", KEY)[1].decode()
    assert '"apiKey": true' in page and '"models": []' in page
    metrics = _get(url + "/monitoring/prometheus/metrics", KEY)[1].decode()
    assert re.search(r'request_latency_count\{model_name="lstm",API="completions",entrypoint="OPENAI"\} [1-9]', metrics)
    original = key_file.read_text()
    try:
        key_file.write_text("sk-rotated-key-two\n")
        assert _get(url + "/v1/models", "sk-rotated-key-two")[0] == 200
        assert _get(url + "/v1/models", KEY)[0] == 401
    finally:
        key_file.write_text(original)
    assert _get(url + "/v1/models", KEY)[0] == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make test certificates")
def test_tls_and_mutual_tls_on_the_rest_port(tmp_path, model_base):
    from test_serving import _make_certs

    certs = _make_certs(tmp_path)
    config = SSLConfig(
        server_key=certs["server.key"].decode(),
        server_cert=certs["server.pem"].decode(),
        custom_ca=certs["ca.pem"].decode(),
        client_verify=True,
    )
    (tmp_path / "ssl.config").write_text(text_format.MessageToString(config))
    (port,) = free_ports(1)
    args = ["--model_name", "lstm", "--model_base_path", model_base / "lstm", "--rest_api_port", port]
    with ServerProcess([*args, "--ssl_config_file", tmp_path / "ssl.config"]):

        def client(cert: str | None) -> openai.OpenAI:
            context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            if cert:
                context.load_cert_chain(tmp_path / f"{cert}.pem", tmp_path / f"{cert}.key")
            http = openai.DefaultHttpxClient(verify=context)
            return openai.OpenAI(
                base_url=f"https://localhost:{port}/v1", api_key="none", http_client=http, max_retries=0
            )

        answer = client("client").completions.create(model="lstm", prompt="the ", max_tokens=20, seed=1)
        assert len(answer.choices[0].text) == 20 and "continuation" not in answer.choices[0].model_extra
        for cert in (None, "rogue"):
            with pytest.raises(openai.APIConnectionError):
                client(cert).models.list()
        with pytest.raises(openai.APIConnectionError):  # plaintext to a TLS port
            openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="none", max_retries=0).models.list()


def _readme_section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("## OpenAI-compatible completions", 1)[1].split("\n## ", 1)[0]


def test_readme_openai_examples_run(keyed):
    url, _ = keyed
    section = _readme_section()
    blocks = {lang: re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S) for lang in ("bash", "python")}
    curl = "\n".join(b for b in blocks["bash"] if "curl" in b)
    python = blocks["python"][0]

    def adapt(code: str) -> str:
        return code.replace("https://localhost:8501", url).replace("shakespeare", "lstm").replace("ROMEO:", "the ")

    env = {**os.environ, "CHARRNN_API_KEY": KEY}
    script = re.sub(r"--cacert \S+ ", "", adapt(curl)).replace("$(head -1 serving/api_keys.txt)", KEY)
    ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert '"text_completion"' in ran.stdout and "data: [DONE]" in ran.stdout
    code = re.sub(r".*DefaultHttpxClient.*\n", "", adapt(python))  # plaintext here: no CA to trust
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip()


def test_stop_across_segments_is_held_back_in_a_stream(client):
    # A stop string may start in one segment (256 characters) and end in the next: a stream holds it back.
    ask = dict(model="lstm", prompt="the ", max_tokens=600, temperature=1.0, seed=2)
    text = client.completions.create(**ask).choices[0].text
    stop = text[254:258]
    whole = client.completions.create(**ask, stop=stop).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stop=stop, stream=True) if c.choices)
    assert whole.finish_reason == "stop" and streamed == whole.text == text[: text.index(stop)]


def test_api_keys_are_reread_when_the_file_changes_and_skip_comments(tmp_path):
    from keras_charrnn.serving.api_keys import ApiKeys, bearer_token

    path = tmp_path / "keys.txt"
    path.write_text("# ops\n\nsk-one\n  sk-two  \n")
    keys = ApiKeys(path)
    assert keys.allows("Bearer sk-one") and keys.allows("bearer sk-two")
    assert not any(keys.allows(h) for h in (None, "", "Bearer", "Bearer sk-on", "Basic sk-one", "Bearer # ops"))
    path.write_text("sk-three-longer\n")
    assert keys.allows("Bearer sk-three-longer") and not keys.allows("Bearer sk-one")
    path.unlink()  # unreadable now: the keys read before stay
    assert keys.allows("Bearer sk-three-longer")
    assert bearer_token("Bearer  abc ") == "abc" and bearer_token("Token abc") is None


def test_completion_requests_are_checked_before_any_work():
    from keras_charrnn.serving.limits import ServingLimits
    from keras_charrnn.serving.openai_schema import ApiError, CompletionRequest

    limits = ServingLimits(max_rows_per_call=4, max_chars_per_call=100, max_prime_chars=10)
    request = CompletionRequest.parse({"model": "m", "prompt": ["a", "b"], "n": 2, "stop": ["x", "x"]}, limits)
    assert (request.rows, request.max_tokens, request.temperature, request.stop) == (4, 16, 1.0, ("x",))
    assert not request.seeded and 0 <= request.seed < 2**63
    for body, param in [
        ({"prompt": "a" * 11}, "prompt"),
        ({"prompt": ["a"] * 5}, "prompt"),
        ({"prompt": "a", "n": 3, "max_tokens": 5, "echo": True, "best_of": 1, "logprobs": None, "x": 1}, "x"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "a", "logit_bias": {"1": 101}}, "logit_bias"),
        ({"prompt": "a", "stop": [""]}, "stop"),
    ]:
        with pytest.raises(ApiError) as refused:
            CompletionRequest.parse({"model": "m", **body}, limits)
        assert refused.value.status == 400 and refused.value.param == param, body


def test_continuation_tokens_are_signed():
    from keras_charrnn.serving.continuation import Continuations
    from keras_charrnn.serving.openai_schema import ApiError

    signer = Continuations(b"0123456789abcdef")
    token = signer.sign({"v": 1, "position": 3})
    assert signer.verify(token) == {"v": 1, "position": 3}
    for bad in (token + "A", token.replace(".", ".x", 1), Continuations(b"fedcba9876543210").sign({"v": 1}), "x.y", ""):
        with pytest.raises(ApiError, match="continuation token refused"):
            signer.verify(bad)
