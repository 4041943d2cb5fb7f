"""What the hidden units do, and how well the model predicts a text: the one scoring path.

``inspect`` runs a model over a text (in windows, the state carried between
them) and returns every layer's activations, the top-k next-character
guesses and each character's loss, as NumPy arrays; ``char_losses`` is the
same computation keeping only the losses (what ``CharRNN.score`` averages).
``score_units`` finds the units that track simple features of the text
(inside a quote, inside brackets, position in the line, ...);
``keras_charrnn.report`` draws it all into an HTML page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import tensorflow as tf

from keras_charrnn.errors import InputError
from keras_charrnn.metrics import bits_per_char
from keras_charrnn.vocab import Vocabulary

WINDOW = 512  # characters per model call: bounds the memory of one call


class Model(Protocol):
    """What ``inspect`` needs of a model: a ``CharRNN`` from ``keras_charrnn.load``."""

    path: Path
    vocab: Vocabulary
    config: dict

    @property
    def signatures(self) -> Mapping[str, Callable[..., dict]]: ...

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]: ...


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
        """The mean loss in bits per character (NaN for no predictions)."""
        return bits_per_char(float(self.losses.mean())) if len(self.losses) else float("nan")


@dataclass
class _Window:
    layers: list[np.ndarray]  # per layer [w, units]
    logits: np.ndarray  # [w, V]
    losses: np.ndarray  # [w] or [w - 1] for the last window: nats of each next character


def _windows(model: Model, ids: np.ndarray) -> Iterator[_Window]:
    """Feeds ``ids`` through the model's ``inspect`` signature ``WINDOW`` ids at a time, carrying the state."""
    if "inspect" not in model.signatures:
        raise InputError(f"{model.path}: exported before the 'inspect' signature existed; export it again")
    states = {k: tf.constant(v) for k, v in model.zero_state().items()}
    for start in range(0, len(ids), WINDOW):
        out = model.signatures["inspect"](ids=tf.constant(ids[None, start : start + WINDOW]), **states)
        states = {k: out[k] for k in states}
        logits = out["logits"].numpy()[0].astype(np.float64)
        targets = ids[start + 1 : start + 1 + WINDOW]
        log_norm = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        losses = (log_norm[: len(targets)] - logits[np.arange(len(targets)), targets]).astype(np.float32)
        yield _Window([out[f"layer_{i}"].numpy()[0] for i in range(model.config["layers"])], logits, losses)


def _encode(model: Model, text: str) -> np.ndarray:
    if len(text) < 2:
        raise InputError("text must hold at least two characters")
    return model.vocab.encode(text)


def char_losses(model: Model, text: str) -> np.ndarray:
    """Nats the model spends on each next character of ``text``: ``inspect(...).losses``, in bounded memory.

    Args:
        model: a ``CharRNN`` (``keras_charrnn.load``: a SavedModel or a training run).
        text: at least two characters.

    Returns:
        float32 [len(text) - 1].
    """
    return np.concatenate([w.losses for w in _windows(model, _encode(model, text))])


def inspect(model: Model, text: str, top: int = 5) -> Inspection:
    """Runs ``model`` over ``text`` and collects activations and predictions.

    Args:
        model: a ``CharRNN`` (``keras_charrnn.load``: a SavedModel or a training run).
        text: the text to analyse (at least two characters).
        top: how many next-character guesses to keep per character.

    Returns:
        An ``Inspection``.

    Example:

    >>> result = inspect(keras_charrnn.load("saved_models/shakespeare"), "ROMEO: Hi")  # doctest: +SKIP
    >>> result.activations[0].shape                                                   # doctest: +SKIP
    (9, 512)
    """
    ids = _encode(model, text)
    windows = list(_windows(model, ids))
    chars = [""] + model.vocab.chars
    logits = np.concatenate([w.logits for w in windows])
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    top_ids = np.argsort(-probs, axis=-1)[:, : max(1, min(top, len(chars) - 1))].astype(np.int32)
    return Inspection(
        text=text,
        activations=[np.concatenate([w.layers[i] for w in windows]) for i in range(len(windows[0].layers))],
        top_ids=top_ids,
        top_probs=np.take_along_axis(probs, top_ids, axis=-1).astype(np.float32),
        losses=np.concatenate([w.losses for w in windows]),
        chars=chars,
    )


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
    feats = {
        name: np.zeros(n, np.float32)
        for name in ("inside quotes", "inside brackets", "position in line", "after newline", "inside a word")
    }
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
