"""Visualise what the hidden units do: activations per character and next-character guesses.

``inspect`` runs a model over a text (in windows, the state carried between
them) and returns every layer's activations, the top-k next-character guesses
and each character's loss, as NumPy arrays. ``score_units`` finds the units
that track simple features of the text (inside a quote, inside brackets,
position in the line, ...). ``write_report`` draws it all into one
self-contained HTML page: the text coloured by a unit's activation, a
selector for layer and unit, and under each character the model's guesses.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_charrnn.errors import CharRNNError
from keras_charrnn.metrics import bits_per_char

WINDOW = 512  # characters per model call


@dataclass
class Inspection:
    """What a model did on a text.

    Attributes:
        text: the text (its first character is only input; predictions start at the second).
        activations: per layer, float32 [len(text), units]: each layer's output after each character.
        top_ids: int32 [len(text), k]: the k likeliest next characters after each character.
        top_probs: float32 [len(text), k]: their probabilities.
        losses: float32 [len(text) - 1]: nats spent on each next character.
        chars: the vocabulary, by id (id 0 is the unknown character).
    """

    text: str
    activations: list[np.ndarray]
    top_ids: np.ndarray
    top_probs: np.ndarray
    losses: np.ndarray
    chars: list[str]

    @property
    def bits_per_char(self) -> float:
        return bits_per_char(float(self.losses.mean())) if len(self.losses) else float("nan")


def _softmax_top(logits: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)[:, :top]
    return order.astype(np.int32), np.take_along_axis(probs, order, axis=-1), probs


def inspect(model, text: str, top: int = 5) -> Inspection:
    """Runs ``model`` over ``text`` and collects activations and predictions.

    Args:
        model: an exported model (a ``CharRNN`` from ``keras_charrnn.load``, or its
            path), or a training run folder (its ``best.keras``).
        text: the text to analyse (at least two characters).
        top: how many next-character guesses to keep per character.

    Returns:
        An ``Inspection``.

    Example:

    >>> result = inspect(keras_charrnn.load("saved_models/shakespeare"), "ROMEO: Hi")  # doctest: +SKIP
    >>> result.activations[0].shape                                                   # doctest: +SKIP
    (9, 512)
    """
    if len(text) < 2:
        raise CharRNNError("the text must hold at least two characters")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if (path / "config.json").is_file() and not (path / "saved_model.pb").exists():
            return _inspect_run(path, text, top)
        from keras_charrnn.sample import load

        model = load(path)
    import tensorflow as tf

    if "inspect" not in model.signatures:
        raise CharRNNError(f"{model.path}: exported before the 'inspect' signature existed; export it again")
    chars = [""] + model.vocab.chars
    ids = model.vocab.encode(text)
    states = {k: tf.constant(v) for k, v in model.zero_state().items()}
    layers = [[] for _ in range(model.config["layers"])]
    logits = []
    for start in range(0, len(ids), WINDOW):
        out = model.signatures["inspect"](ids=tf.constant(ids[None, start:start + WINDOW]), **states)
        states = {k: out[k] for k in model.info.state_names}
        for i, acts in enumerate(layers):
            acts.append(out[f"layer_{i}"].numpy()[0])
        logits.append(out["logits"].numpy()[0])
    return _finish(text, ids, [np.concatenate(a) for a in layers], np.concatenate(logits), top, chars)


def _inspect_run(run_dir: Path, text: str, top: int) -> Inspection:
    """The same numbers from a training run's Keras model (stateful, batch 1)."""
    import keras

    from keras_charrnn.model import build_model, describe, recurrent_layers
    from keras_charrnn.train import load_run

    trained, vocab, _ = load_run(run_dir)
    spec = describe(trained)
    model = build_model(vocab.size, cell=spec["cell"], units=spec["units"], layers=spec["layers"],
                        embedding_dim=spec["embedding_dim"], batch_size=1, seq_len=None)
    model.set_weights(trained.get_weights())
    probe = keras.Model(model.inputs, [layer.output for layer in recurrent_layers(model)] + [model.output])
    ids = vocab.encode(text)
    parts = [probe.predict_on_batch(ids[None, s:s + WINDOW]) for s in range(0, len(ids), WINDOW)]
    layers = [np.concatenate([p[i][0] for p in parts]) for i in range(spec["layers"])]
    logits = np.concatenate([p[-1][0] for p in parts])
    return _finish(text, ids, layers, logits, top, [""] + vocab.chars)


def _finish(text, ids, layers, logits, top, chars) -> Inspection:
    top = max(1, min(top, len(chars) - 1))
    top_ids, top_probs, probs = _softmax_top(logits, top)
    targets = ids[1:]
    losses = -np.log(np.maximum(probs[np.arange(len(targets)), targets], 1e-12)).astype(np.float32)
    return Inspection(text, layers, top_ids, top_probs.astype(np.float32), losses, chars)


# ----- which units track which features -------------------------------------------------------

OPENING, CLOSING = {"(": ")", "[": "]"}, {")", "]"}


def text_features(text: str) -> dict[str, np.ndarray]:
    """Simple per-character features of a text, each float32 [len(text)].

    ``inside quotes`` (between a pair of ``"``, or “ and ”), ``inside brackets``
    (``()`` or ``[]``, nested), ``position in line`` (characters since the last
    newline), ``after newline`` and ``inside a word`` (a letter).
    """
    n = len(text)
    quote, depth, column = 0.0, 0, 0
    feats = {name: np.zeros(n, np.float32) for name in
             ("inside quotes", "inside brackets", "position in line", "after newline", "inside a word")}
    previous = "\n"
    for i, ch in enumerate(text):
        if ch == '"':
            quote = 1.0 - quote
        elif ch == "“":
            quote = 1.0
        elif ch == "”":
            quote = 0.0
        if ch in OPENING:
            depth += 1
        elif ch in CLOSING:
            depth = max(0, depth - 1)
        column = 0 if ch == "\n" else column + 1
        feats["inside quotes"][i] = quote
        feats["inside brackets"][i] = float(depth > 0)
        feats["position in line"][i] = column
        feats["after newline"][i] = float(previous == "\n")
        feats["inside a word"][i] = float(ch.isalpha())
        previous = ch
    return feats


def score_units(result: Inspection) -> list[dict]:
    """Correlates every unit with every feature; best-matching units first.

    Returns:
        ``[{"layer", "unit", "feature", "correlation"}, ...]``, one entry per unit
        (its best feature), sorted by absolute correlation.
    """
    feats = text_features(result.text)
    names = [k for k, v in feats.items() if v.std() > 0]
    if not names:
        return []
    f = np.stack([feats[k] for k in names], axis=1)
    f = (f - f.mean(0)) / f.std(0)
    scores = []
    for layer, acts in enumerate(result.activations):
        a = acts - acts.mean(0)
        sd = a.std(0)
        sd[sd == 0] = np.inf
        corr = (a / sd).T @ f / len(f)  # [units, features]
        best = np.argmax(np.abs(corr), axis=1)
        for unit, j in enumerate(best):
            scores.append({"layer": layer, "unit": unit, "feature": names[j], "correlation": float(corr[unit, j])})
    scores.sort(key=lambda s: -abs(s["correlation"]))
    return scores


# ----- the page -------------------------------------------------------------------------------

def activation_color(value: float) -> str:
    """Diverging scale: -1 blue, 0 white, +1 red (clipped to [-1, 1]; the page's JavaScript does the same)."""
    v = max(-1.0, min(1.0, round(float(value), 3)))  # the page carries activations to 3 decimals
    if v >= 0:
        c = math.floor(255 * (1 - v) + 0.5)  # JavaScript's Math.round
        return f"rgb(255, {c}, {c})"
    c = math.floor(255 * (1 + v) + 0.5)
    return f"rgb({c}, {c}, 255)"


def _display(ch: str) -> str:
    return {"\n": "⏎", " ": "␣", "\t": "⇥", "": "∅"}.get(ch, ch)


_SCRIPT = """
const DATA = JSON.parse(document.getElementById("data").textContent);
function color(v) {
  v = Math.max(-1, Math.min(1, v));
  if (v >= 0) { const c = Math.round(255 * (1 - v)); return `rgb(255, ${c}, ${c})`; }
  const c = Math.round(255 * (1 + v)); return `rgb(${c}, ${c}, 255)`;
}
function show(layer, unit) {
  const acts = DATA.activations[layer];
  document.querySelectorAll("#text span.ch").forEach((span, i) => {
    const v = acts[i][unit];
    span.style.backgroundColor = color(v);
    span.dataset.value = v.toFixed(3);
  });
  document.getElementById("current").textContent = `layer ${layer}, unit ${unit}`;
}
const select = document.getElementById("unit");
select.addEventListener("change", () => { const [l, u] = select.value.split(":").map(Number); show(l, u); });
const tip = document.getElementById("tip");
document.querySelectorAll("#text span.ch").forEach((span, i) => {
  span.addEventListener("mouseenter", () => {
    const guesses = DATA.top[i].map(([c, p]) => `${c} ${(100 * p).toFixed(1)}%`).join("  ");
    tip.textContent = `activation ${span.dataset.value}  |  next: ${guesses}`;
  });
});
function fromHash() {
  const m = location.hash.match(/unit=(\\d+):(\\d+)/);
  if (m) { select.value = `${m[1]}:${m[2]}`; select.dispatchEvent(new Event("change")); }
}
window.addEventListener("hashchange", fromHash);
fromHash();
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
header p { margin: .2em 0; }
#text { font-family: ui-monospace, monospace; }
span.col { display: inline-flex; flex-direction: column; vertical-align: top; margin: 0 0 .6em 0; }
span.ch { display: block; min-width: .7em; padding: .1em 0; text-align: center; white-space: pre; font-size: 1.15em; }
span.guess { display: flex; flex-direction: column; font-size: .62em; line-height: 1.15em; text-align: center; }
span.guess b { font-weight: normal; color: #333; }
span.guess b.actual { outline: 1px solid #000; outline-offset: -1px; }
#tip { position: sticky; top: 0; background: #f6f6f6; padding: .3em; font-family: ui-monospace, monospace; }
table { border-collapse: collapse; } td, th { padding: .1em .6em; text-align: left; }
"""


def write_report(result: Inspection, out: str | os.PathLike, model_name: str, layer: int | None = None,
                 units: list[int] | None = None, curves: str | None = None) -> Path:
    """Writes the self-contained HTML page (inline CSS and JS, no network) to ``out``.

    Args:
        result: from ``inspect``.
        out: the HTML file.
        model_name: shown in the header.
        layer: restrict the selector to this layer (default: all).
        units: restrict the selector to these units (default: the best-scoring first, then all).
        curves: path of a training-curves PNG to link from the page.
    """
    from keras_charrnn.fileio import atomic_write_text

    n_layers = len(result.activations)
    if layer is not None and not 0 <= layer < n_layers:
        raise CharRNNError(f"--layer {layer} does not exist: the model has layers 0..{n_layers - 1}")
    layers = [layer] if layer is not None else list(range(n_layers))
    width = result.activations[0].shape[1]
    if units is not None:
        bad = [u for u in units if not 0 <= u < width]
        if bad:
            raise CharRNNError(f"--units {bad} do not exist: each layer has units 0..{width - 1}")
    ranked = [s for s in score_units(result) if s["layer"] in layers and (units is None or s["unit"] in units)]
    options = [(s["layer"], s["unit"], f'{s["feature"]} r={s["correlation"]:+.2f}') for s in ranked]
    first_layer, first_unit = options[0][:2]
    acts0 = result.activations[first_layer][:, first_unit]

    spans = []
    for i, ch in enumerate(result.text):
        guesses = ""
        if i < len(result.text) - 1:
            actual = result.text[i + 1]
            rows = []
            for gid, p in zip(result.top_ids[i], result.top_probs[i]):
                c = result.chars[gid]
                cls = ' class="actual"' if c == actual else ""
                rows.append(f'<b{cls} style="background:rgba(40,160,40,{0.7 * p:.2f})">{html.escape(_display(c))}</b>')
            guesses = f'<span class="guess">{"".join(rows)}</span>'
        spans.append(f'<span class="col"><span class="ch" data-i="{i}" data-value="{acts0[i]:.3f}" '
                     f'style="background-color: {activation_color(acts0[i])}">{html.escape(_display(ch))}</span>'
                     f'{guesses}</span>')
        if ch == "\n":
            spans.append("<br>")

    hardest = np.argsort(-result.losses)[:10]
    hard_rows = "".join(
        f"<tr><td>{j + 1}</td><td>{html.escape(_display(result.text[j + 1]))}</td><td>{result.losses[j] / math.log(2):.2f}"
        f"</td><td>{html.escape(repr(result.text[max(0, j - 15):j + 2]))}</td></tr>" for j in hardest)
    data = {
        "activations": [np.round(result.activations[l], 3).tolist() if l in layers else [] for l in range(n_layers)],
        "top": [[[_display(result.chars[g]), round(float(p), 4)] for g, p in zip(ids, probs)]
                for ids, probs in zip(result.top_ids, result.top_probs)],
    }
    option_html = "".join(f'<option value="{l}:{u}">layer {l} unit {u} — {html.escape(label)}</option>'
                          for l, u, label in options)
    data_json = json.dumps(data).replace("</", "<\\/")  # cannot close the script element early
    curves_html = f'<p><a href="{html.escape(curves)}">training curves</a></p>' if curves else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(model_name)}: hidden units</title>
<style>{_STYLE}</style></head>
<body>
<header>
<h1>{html.escape(model_name)}</h1>
<p>{len(result.text)} characters, <b id="bpc">{result.bits_per_char:.3f}</b> bits per character.
Colour: the selected unit's activation (blue -1, white 0, red +1). Under each character: the model's
top guesses for the next one, shaded by probability; the boxed one is what came next.</p>
{curves_html}
<p><label>unit <select id="unit">{option_html}</select></label> <span id="current">layer {first_layer}, unit {first_unit}</span></p>
</header>
<div id="tip">hover a character</div>
<div id="text">{"".join(spans)}</div>
<h2>Hardest characters</h2>
<table><tr><th>position</th><th>char</th><th>bits</th><th>context</th></tr>{hard_rows}</table>
<script type="application/json" id="data">{data_json}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    atomic_write_text(out, page)
    return Path(out)
