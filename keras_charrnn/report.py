"""The HTML page of an ``Inspection``: the text coloured by a unit's activation.

One self-contained page (inline CSS and JavaScript, no network), drawn from
the template ``keras_charrnn/templates/report.html``: the text coloured by
the selected unit, a selector for layer and unit (best-scoring units first),
under each character the model's guesses for the next one, and the hardest
characters.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np

from keras_charrnn.analysis import Inspection, score_units
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.fileio import atomic_write_text

TEMPLATE = "report.html"  # in keras_charrnn/templates/


def activation_color(value: float) -> str:
    """Diverging scale: -1 blue, 0 white, +1 red (clipped to [-1, 1]; the page's JavaScript does the same).

    Args:
        value: an activation.

    Returns:
        A CSS colour, e.g. ``"rgb(255, 128, 128)"``.
    """
    v = max(-1.0, min(1.0, round(float(value), 3)))  # the page carries activations to 3 decimals
    if v >= 0:
        c = math.floor(255 * (1 - v) + 0.5)  # JavaScript's Math.round
        return f"rgb(255, {c}, {c})"
    c = math.floor(255 * (1 + v) + 0.5)
    return f"rgb({c}, {c}, 255)"


def _display(ch: str) -> str:
    return {"\n": "⏎", " ": "␣", "\t": "⇥", "": "∅"}.get(ch, ch)


def unit_choices(
    result: Inspection, layer: int | None = None, units: list[int] | None = None
) -> list[tuple[int, int, str]]:
    """The units the page offers, best-scoring first, then any unit no feature ranks.

    Args:
        result: from ``analysis.inspect``.
        layer: only this layer (default: all).
        units: only these units (default: all).

    Returns:
        ``[(layer, unit, label), ...]``, never empty.

    Raises:
        ConfigError: ``layer`` or ``units`` do not exist in the model.
    """
    n_layers = len(result.activations)
    width = result.activations[0].shape[1]
    if layer is not None and not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} does not exist: the model has layers 0..{n_layers - 1}")
    bad = [u for u in units or [] if not 0 <= u < width]
    if bad:
        raise ConfigError(f"units {bad} do not exist: each layer has units 0..{width - 1}")
    layers = [layer] if layer is not None else list(range(n_layers))
    wanted = units if units else list(range(width))
    choices = [
        (s["layer"], s["unit"], f"{s['feature']} r={s['correlation']:+.2f}")
        for s in score_units(result)
        if s["layer"] in layers and s["unit"] in wanted
    ]
    ranked = {(lay, u) for lay, u, _ in choices}
    return choices + [(lay, u, "unscored") for lay in layers for u in wanted if (lay, u) not in ranked]


def _columns(result: Inspection, first: np.ndarray) -> str:
    """Each character over its next-character guesses, coloured by ``first`` (one unit's activations)."""
    parts = []
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
        parts.append(
            f'<span class="col"><span class="ch" data-i="{i}" data-value="{first[i]:.3f}" '
            f'style="background-color: {activation_color(first[i])}">{html.escape(_display(ch))}</span>'
            f"{guesses}</span>"
        )
        if ch == "\n":
            parts.append("<br>")
    return "".join(parts)


def _hardest(result: Inspection, count: int = 10) -> str:
    """Table rows of the ``count`` characters that cost the most bits."""
    return "".join(
        f"<tr><td>{j + 1}</td><td>{html.escape(_display(result.text[j + 1]))}</td>"
        f"<td>{result.losses[j] / math.log(2):.2f}</td>"
        f"<td>{html.escape(repr(result.text[max(0, j - 15) : j + 2]))}</td></tr>"
        for j in np.argsort(-result.losses)[:count]
    )


def _fill(template: str, values: dict[str, str]) -> str:
    """Replaces every ``{{ name }}`` of the template; a name without a value is a bug (KeyError)."""
    return re.sub(r"\{\{ (\w+) \}\}", lambda m: values[m.group(1)], template)


def write_report(
    result: Inspection,
    out: str | os.PathLike,
    model_name: str,
    layer: int | None = None,
    units: list[int] | None = None,
    curves: str | None = None,
) -> Path:
    """Writes the self-contained HTML page (inline CSS and JS, no network) to ``out``, atomically.

    Args:
        result: from ``analysis.inspect``.
        out: the HTML file.
        model_name: shown in the header.
        layer: restrict the selector to this layer (default: all).
        units: restrict the selector to these units (default: the best-scoring first, then all).
        curves: address of a training-curves PNG to link from the page.

    Returns:
        ``out``.

    Raises:
        ConfigError: ``layer`` or ``units`` do not exist in the model.
        InputError: ``out`` cannot be written.
    """
    choices = unit_choices(result, layer, units)
    first_layer, first_unit = choices[0][:2]
    shown = {lay for lay, _, _ in choices}
    data = {
        "activations": [np.round(a, 3).tolist() if lay in shown else [] for lay, a in enumerate(result.activations)],
        "top": [
            [[_display(result.chars[g]), round(float(p), 4)] for g, p in zip(ids, probs)]
            for ids, probs in zip(result.top_ids, result.top_probs)
        ],
    }
    template = resources.files("keras_charrnn").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    page = _fill(
        template,
        {
            "title": html.escape(model_name),
            "num_chars": str(len(result.text)),
            "bpc": f"{result.bits_per_char:.3f}",
            "curves": f'<p><a href="{html.escape(curves)}">training curves</a></p>' if curves else "",
            "options": "".join(
                f'<option value="{lay}:{u}">layer {lay} unit {u} — {html.escape(label)}</option>'
                for lay, u, label in choices
            ),
            "first_layer": str(first_layer),
            "first_unit": str(first_unit),
            "columns": _columns(result, result.activations[first_layer][:, first_unit]),
            "hardest": _hardest(result),
            "data": json.dumps(data).replace("</", "<\\/"),  # cannot close the script element early
        },
    )
    try:
        atomic_write_text(out, page)
    except OSError as exc:
        raise InputError(f"out {out}: cannot write the page ({exc.strerror or exc})") from None
    return Path(out)
