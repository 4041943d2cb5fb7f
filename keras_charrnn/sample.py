"""In-process use of an exported model: load, generate, sessions, scoring.

``load`` reads a SavedModel folder written by ``charrnn export`` (a base path
such as ``saved_models/shakespeare``, whose highest version is taken, or one
version folder) with TensorFlow alone and returns a ``CharRNN``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow as tf

from keras_charrnn.errors import CharRNNError, graph_error_message
from keras_charrnn.metrics import bits_per_char, perplexity
from keras_charrnn.session import DEFAULT_CHUNK, ModelInfo, SamplingParams, Session
from keras_charrnn.vocab import Vocabulary

SCORE_WINDOW = 1024  # characters per step call when scoring


def resolve_version_dir(path: str | os.PathLike) -> Path:
    """A version folder (holding ``saved_model.pb``), or the highest numeric one under a base path."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    if path.is_dir():
        versions = sorted((int(p.name), p) for p in path.iterdir()
                          if re.fullmatch(r"\d+", p.name) and (p / "saved_model.pb").is_file())
        if versions:
            return versions[-1][1]
        raise CharRNNError(f"{path}: no SavedModel version folders (1/, 2/, ...) inside")
    raise CharRNNError(f"{path}: no such model folder")


class _InProcessRunner:
    def __init__(self, loaded, version: int | None):
        self._loaded, self._version = loaded, version

    def run(self, signature, inputs, version):
        fn = self._loaded.signatures[signature]
        try:
            out = fn(**{k: tf.constant(v) if v.dtype != object else tf.constant(list(v), tf.string)
                        for k, v in inputs.items()})
        except tf.errors.InvalidArgumentError as exc:
            raise CharRNNError(graph_error_message(exc.message)) from None
        return {k: v.numpy() for k, v in out.items()}, self._version


class CharRNN:
    """An exported character model, loaded in this process.

    Args:
        path: a version folder or a base path (its highest version is used).

    Example:

    >>> model = CharRNN("saved_models/shakespeare")                     # doctest: +SKIP
    >>> model.generate("ROMEO:", 200, temperature=0.8, seed=1)          # doctest: +SKIP
    >>> model.score("To be, or not to be")["bits_per_char"]             # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_version_dir(path)
        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except (OSError, ValueError, tf.errors.OpError) as exc:
            raise CharRNNError(f"{self.path}: cannot load the SavedModel ({str(exc).splitlines()[0]})") from None
        if "metadata" not in self._loaded.signatures:
            raise CharRNNError(f"{self.path}: not a keras-charrnn model (no 'metadata' signature)")
        meta = self._loaded.signatures["metadata"]()
        self.config: dict = json.loads(meta["config"].numpy().decode("utf-8"))
        self.vocab = Vocabulary([c.decode("utf-8") for c in meta["vocabulary"].numpy()[1:]])
        version = int(self.path.name) if self.path.name.isdigit() else None
        self.info = ModelInfo.from_config(self.path.parent.name, self.config)
        self._runner = _InProcessRunner(self._loaded, version)

    @property
    def signatures(self):
        """The SavedModel's signatures (``step``, ``generate``, ``generate_text``, ``metadata``)."""
        return self._loaded.signatures

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The state that starts a session: zeros, one [batch, units] array per state name."""
        return {n: np.zeros((batch, self.info.state_size), np.float32) for n in self.info.state_names}

    def session(self, prime: str = "\n", temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                seed: int | None = None) -> Session:
        """A session that keeps the hidden state between calls (see ``Session``)."""
        return Session(self._runner, self.info, prime, SamplingParams(temperature, top_k, top_p, seed))

    def restore(self, saved: str) -> Session:
        """Continues a session saved with ``Session.to_json``."""
        return Session.from_json(saved, self._runner, self.info)

    def generate(self, prime: str, n: int, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> str:
        """Returns ``n`` characters that follow ``prime``.

        Args:
            prime: the text to continue (at least one character).
            n: how many characters to generate.
            temperature: 0 picks the most likely character; higher is more varied.
            top_k: sample only among the k most likely characters (0: all).
            top_p: sample only among the most likely characters whose mass reaches p (1: all).
            seed: makes the text reproducible; None draws one.

        Returns:
            The generated text (without the prime).
        """
        return self.session(prime, temperature, top_k, top_p, seed).generate(n)

    def stream(self, prime: str, n: int, chunk: int = DEFAULT_CHUNK, **kwargs) -> Iterator[str]:
        """Like ``generate``, yielding the text ``chunk`` characters at a time."""
        return self.session(prime, **kwargs).stream(n, chunk)

    def score(self, text: str) -> dict[str, float]:
        """How well the model predicts ``text``: each character from those before it.

        Returns:
            ``{"loss": nats/char, "bits_per_char": ..., "perplexity": ..., "chars": n}``.
        """
        ids = self.vocab.encode(text)
        if len(ids) < 2:
            raise CharRNNError("scoring needs a text of at least two characters")
        step = self._loaded.signatures["step"]
        states = {k: tf.constant(v) for k, v in self.zero_state().items()}
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, SCORE_WINDOW):
            x = ids[start:start + SCORE_WINDOW]
            y = ids[start + 1:start + 1 + SCORE_WINDOW]
            x = x[:len(y)]
            out = step(ids=tf.constant(x[None, :]), **states)
            states = {k: out[k] for k in self.info.state_names}
            logp = tf.nn.log_softmax(out["logits"][0], axis=-1).numpy()
            total -= float(logp[np.arange(len(y)), y].sum())
            count += len(y)
        loss = total / count
        return {"loss": loss, "bits_per_char": bits_per_char(loss), "perplexity": perplexity(loss), "chars": count}


def load(path: str | os.PathLike) -> CharRNN:
    """Loads an exported model for in-process sampling and scoring (see ``CharRNN``)."""
    return CharRNN(path)
