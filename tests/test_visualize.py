"""The visualisation page, checked in headless Chromium, and the unit scoring."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import loaded, run_cli, side_by_side
from keras_charrnn.analysis import inspect, score_units
from keras_charrnn.export import save_savedmodel
from keras_charrnn.inprocess import load
from keras_charrnn.model import build_model
from keras_charrnn.report import activation_color, write_report
from keras_charrnn.vocab import Vocabulary

TEXT = "he said “a cat” and ran. a bat “sat” here\nthen “a hat” a\n" * 3
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def handmade_model(tmp_path):
    """A 1-layer SimpleRNN whose unit 0 is +1 inside “quotes” and -1 after them, and unit 1 fires on 'a'."""
    vocab = Vocabulary.from_text(TEXT)
    model = build_model(
        vocab.size, cell="rnn", units=2, layers=1, embedding_dim=3, batch_size=1, seq_len=None, stateful=False
    )
    emb = np.zeros((vocab.size, 3), np.float32)
    for ch, col in (("“", 0), ("”", 1), ("a", 2)):
        emb[vocab.encode(ch)[0], col] = 1.0
    kernel = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 3.0]], np.float32)
    recurrent = np.array([[3.0, 0.0], [0.0, 0.0]], np.float32)
    model.set_weights(
        [
            emb,
            kernel,
            recurrent,
            np.zeros(2, np.float32),
            np.zeros((2, vocab.size), np.float32),
            np.zeros(vocab.size, np.float32),
        ]
    )
    path = save_savedmodel(model, vocab, tmp_path / "handmade" / "1")
    return load(path)


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    """``handmade_model``, exported and loaded once for the module's tests (they only read it)."""
    return handmade_model(tmp_path_factory.mktemp("handmade"))


def expected_unit0(text):
    values, h = [], 0.0
    for ch in text:
        h = np.tanh(3 * h + 4 * (ch == "“") - 4 * (ch == "”"))
        values.append(h)
    return np.array(values)


def test_inspect_returns_known_activations_of_a_handmade_model(handmade):
    result = inspect(handmade, TEXT, top=3)
    np.testing.assert_allclose(result.activations[0][:, 0], expected_unit0(TEXT), atol=1e-5)
    expected = np.tanh(3.0 * np.array([c == "a" for c in TEXT]))
    np.testing.assert_allclose(result.activations[0][:, 1], expected, atol=1e-5)
    assert result.top_ids.shape == (len(TEXT), 3) and result.losses.shape == (len(TEXT) - 1,)
    assert result.bits_per_char == pytest.approx(np.log2(len(result.chars)), rel=1e-4)  # uniform guesses


def test_unit_scoring_finds_the_planted_inside_quotes_unit(handmade):
    best = score_units(inspect(handmade, TEXT))[0]
    assert (best["layer"], best["unit"], best["feature"]) == (0, 0, "inside quotes")
    assert best["correlation"] > 0.8


def test_report_of_a_text_no_feature_scores_offers_every_unit(handmade, tmp_path):
    result = inspect(handmade, "\n\n\n\n")
    assert score_units(result) == []
    page = write_report(result, tmp_path / "r.html", "handmade").read_text()
    assert re.findall(r'<option value="(\d+:\d+)">', page) == ["0:0", "0:1"]
    assert 'id="current">layer 0, unit 0<' in page and "{{" not in page


def test_exported_model_and_training_run_give_the_same_activations(trained_runs, model_base, corpus_file):
    text = corpus_file.read_text()[:700]
    exported = inspect(loaded(model_base / "gru"), text)
    from_run = inspect(load(trained_runs["gru"]), text)
    assert len(exported.activations) == len(from_run.activations) > 0  # zip() below would pass on an empty side
    for a, b in zip(exported.activations, from_run.activations):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(exported.top_ids[:, 0], from_run.top_ids[:, 0])
    np.testing.assert_allclose(exported.losses, from_run.losses, atol=1e-4)


def _dump_dom(page, tmp_path, fragment="", profile="chrome"):
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
            f"--user-data-dir={tmp_path / profile}",
            "--dump-dom",
            page.resolve().as_uri() + fragment,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _span_colors(dom):
    return re.findall(
        r'<span class="ch" data-i="(\d+)" data-value="([-\d.]+)" '
        r'style="background-color: ([^;"]+);?"',
        dom,
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_page_in_chromium_colors_each_character_and_switches_units(handmade, tmp_path):
    model = handmade
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    page = tmp_path / "report.html"
    out = run_cli("visualize", "--model", model.path.parent, text_file, "--out", page, "--top", "3")
    assert out.returncode == 0, out.stderr
    html_text = page.read_text()
    assert "http://" not in html_text and "https://" not in html_text  # opens offline

    shot = tmp_path / "shot.png"
    # Three independent browser runs (each its own profile folder: a profile is locked by its browser) side by side.
    dom, dom_unit1, _ = side_by_side(
        lambda: _dump_dom(page, tmp_path),
        lambda: _dump_dom(page, tmp_path, "#unit=0:1", profile="chrome_unit1"),  # the selector: the 'a' detector
        lambda: subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path / 'chrome_shot'}",
                f"--screenshot={shot}",
                "--window-size=1200,900",
                page.resolve().as_uri() + "#unit=0:1",
            ],
            capture_output=True,
            timeout=120,
            check=True,
        ),
    )
    spans = _span_colors(dom)
    assert len(spans) == len(TEXT)
    unit0 = expected_unit0(TEXT)
    for i, value, color in spans:  # the page opens on the best unit: the quote tracker
        assert color == activation_color(unit0[int(i)]), (i, value, color)

    assert "layer 0, unit 1" in dom_unit1
    for i, _value, color in _span_colors(dom_unit1):
        expected = np.tanh(3.0) if TEXT[int(i)] == "a" else 0.0
        assert color == activation_color(expected), (i, color)

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_visualize_bad_inputs_get_one_line_errors(tmp_path, model_base):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ab\xffcd")
    good = tmp_path / "good.txt"
    good.write_text("the lazy dog")
    cases = [
        ((empty,), "empty"),
        ((bad,), "byte offset 2"),
        ((good, "--layer", "5"), "layer 5 does not exist"),
        ((good, "--units", "0,999"), "999"),
        ((good, "--units", "x"), "--units"),
        ((good, "--out", good / "r.html"), "cannot write the page"),
        ((good, "--model", tmp_path), "no SavedModel"),
    ]
    results = side_by_side(
        *(
            lambda extra=extra: run_cli(
                "visualize", "--model", model_base / "lstm", "--out", tmp_path / "r.html", *extra
            )
            for extra, _ in cases
        )
    )
    for result, (_, fragment) in zip(results, cases):
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.stderr
