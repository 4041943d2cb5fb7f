"""In-process use of a model: load, generate, sessions, scoring.

``load`` opens an exported SavedModel (a base path such as
``saved_models/shakespeare``, whose highest version is taken, or one version
folder) with TensorFlow alone, or a training run folder, whose model becomes
the exported module in memory (what ``charrnn export`` would write). Both are
run through the same signatures by the same code, so a run folder and its
export give the same text, activations and scores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from keras_charrnn import analysis
from keras_charrnn.errors import InputError, graph_error_message
from keras_charrnn.export import module_from_run
from keras_charrnn.generation import LOGPROBS_OFF, Completion
from keras_charrnn.metrics import bits_per_char, perplexity
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.sampling import DEFAULT_CHUNK, DEFAULT_PRIME, SamplingParams
from keras_charrnn.session import ModelInfo, Session
from keras_charrnn.versions import latest_version_dir, version_number
from keras_charrnn.vocab import Vocabulary
from keras_charrnn.xla import xla_twin


class _InProcessRunner:
    """A session's ``Runner`` in this process; errors of the model's input checks become ``InputError``.

    Args:
        signatures: the model's signatures by name.
        info: the model's facts (its ``version``: the version folder's, None for a run folder).
    """

    def __init__(self, signatures: Mapping, info: ModelInfo, xla: bool = True):
        self._signatures, self._info, self._xla = signatures, info, xla

    def model_info(self, version: int | None) -> ModelInfo:
        """The model's facts: this process holds one version."""
        return self._info

    def run(
        self, signature: str, inputs: Mapping[str, np.ndarray], version: int | None
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """Runs ``signature`` on ``inputs``; ``version`` is this process's one version."""
        # The XLA twin when the model has one: the same text, faster (this process has XLA JIT).
        fn = (self._xla and self._signatures.get(xla_twin(signature))) or self._signatures[signature]
        try:
            out = fn(
                **{
                    k: tf.constant(v) if v.dtype != object else tf.constant(list(v), tf.string)
                    for k, v in inputs.items()
                }
            )
        except tf.errors.InvalidArgumentError as exc:
            raise InputError(graph_error_message(exc.message)) from None
        return {k: v.numpy() for k, v in out.items()}, self._info.version


class CharRNN:
    """A character model loaded in this process: an exported SavedModel or a training run.

    Args:
        path: a SavedModel version folder, a base path (its highest version is
            used), or a training run folder (``RunFolder.is_run`` decides).
        which: for a run folder, its ``"best"`` model or its ``"latest"`` weights.
        xla: run the generating signatures' XLA twins when the model has them (the same text,
            several times faster; the states agree to about 1e-6, not bit for bit, with the plain
            signatures', whose states are bit for bit the same however a session's calls are cut).

    Raises:
        InputError: nothing loadable at ``path``.

    Example:

    >>> model = CharRNN("saved_models/shakespeare")                     # doctest: +SKIP
    >>> model.generate("ROMEO:", 200, temperature=0.8, seed=1)          # doctest: +SKIP
    >>> model.score("To be, or not to be")["bits_per_char"]             # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, which: str = "best", xla: bool = True):
        path = Path(path)
        self._model: Any  # a CharRNNModule (a run folder) or a loaded SavedModel
        if RunFolder.is_run(path):
            self.path, name, version = path, path.name, None
            self._model = module_from_run(path, which)  # kept: the signatures use its variables
            self._signatures = self._model.named_signatures()
        else:
            self.path = latest_version_dir(path)
            name, version = self.path.parent.name, version_number(self.path.name)
            try:
                self._model = tf.saved_model.load(str(self.path))
            except (OSError, ValueError, tf.errors.OpError) as exc:
                raise InputError(f"{self.path}: cannot load the SavedModel ({str(exc).splitlines()[0]})") from None
            self._signatures = self._model.signatures
        if "metadata" not in self._signatures:
            raise InputError(f"{self.path}: not a keras-charrnn model (no 'metadata' signature)")
        meta = self._signatures["metadata"]()
        self.config: dict = json.loads(meta["config"].numpy().decode("utf-8"))
        chars = [c.decode("utf-8") for c in meta["vocabulary"].numpy()]
        self.vocab = Vocabulary(chars[1:])
        self.info = ModelInfo.from_config(
            name, self.config, version, signatures=self._signatures.keys(), vocabulary=chars
        )
        self._runner = _InProcessRunner(self._signatures, self.info, xla)

    @property
    def signatures(self) -> Mapping:
        """The signatures (``step``, ``inspect``, ``generate``, ``generate_text``, ``metadata``), called with named
        tensors."""
        return self._signatures

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The state that starts a session: zeros, one [batch, units] array per state name."""
        return {n: np.zeros((batch, self.info.state_size), np.float32) for n in self.info.state_names}

    def session(self, prime: str = DEFAULT_PRIME, params: SamplingParams | None = None, **fields: Any) -> Session:
        """A session that keeps the hidden state between calls (see ``Session``).

        Args:
            prime: the text to continue (at least one character).
            params: how characters are chosen and when a call stops; or give its fields as keywords
                (``temperature=``, ``top_k=``, ``top_p=``, ``seed=``, ``min_p=``, ``bias=``, ``stop=``,
                ``min_chars=``; see ``SamplingParams``).

        Returns:
            A new session.
        """
        return Session(self._runner, self.info, prime, SamplingParams.of(params, **fields))

    def restore(self, saved: str) -> Session:
        """Continues a session saved with ``Session.to_json``."""
        return Session.from_json(saved, self._runner, self.info)

    def generate(self, prime: str, n: int, params: SamplingParams | None = None, **fields: Any) -> str:
        """Returns ``n`` characters that follow ``prime``.

        Args:
            prime: the text to continue (at least one character).
            n: how many characters to generate.
            params: how characters are chosen, or its fields as keywords (see ``session``).

        Returns:
            The generated text (without the prime).
        """
        return self.session(prime, params, **fields).generate(n)

    def complete(
        self, prime: str, n: int, logprobs: int = LOGPROBS_OFF, params: SamplingParams | None = None, **fields: Any
    ) -> Completion:
        """Up to ``n`` characters after ``prime``, with why they ended and (if asked) their scores.

        Args:
            prime: the text to continue.
            n: the most characters to generate.
            logprobs: -1: no scores; 0: each character's log-probability; N: also N alternatives.
            params: as in ``session``, or its fields as keywords.

        Returns:
            The ``Completion``.

        Example:

        >>> model.complete("ROMEO:", 200, stop="\n\n", seed=1).finish_reason  # doctest: +SKIP
        'stop'
        """
        return self.session(prime, params, **fields).complete(n, logprobs)

    def samples(
        self,
        prime: str,
        n: int,
        num_chars: int,
        logprobs: int = LOGPROBS_OFF,
        params: SamplingParams | None = None,
        **fields: Any,
    ) -> list[Completion]:
        """``n`` samples after ``prime`` in one batch (see ``Session.samples``: sample 0 is ``generate``'s text).

        Args:
            prime: the text to continue.
            n: how many samples.
            num_chars: the most characters of each.
            logprobs: as in ``complete``.
            params: as in ``session``, or its fields as keywords.

        Returns:
            One ``Completion`` per sample, each with its own ``session`` to continue.
        """
        return self.session(prime, params, **fields).samples(n, num_chars, logprobs)

    def stream(
        self, prime: str, n: int, chunk: int = DEFAULT_CHUNK, params: SamplingParams | None = None, **fields: Any
    ) -> Iterator[str]:
        """Like ``generate``, yielding the text ``chunk`` characters at a time."""
        return self.session(prime, params, **fields).stream(n, chunk)

    def score(self, text: str) -> dict[str, float]:
        """How well the model predicts ``text``: the mean of ``analysis.inspect``'s per-character losses.

        Args:
            text: at least two characters; each is predicted from those before it.

        Returns:
            ``{"loss": nats/char, "bits_per_char": ..., "perplexity": ..., "chars": n}``.
        """
        losses = analysis.char_losses(self, text)
        loss = float(losses.mean(dtype=np.float64))
        return {
            "loss": loss,
            "bits_per_char": bits_per_char(loss),
            "perplexity": perplexity(loss),
            "chars": len(losses),
        }


def load(path: str | os.PathLike, which: str = "best", xla: bool = True) -> CharRNN:
    """Loads a SavedModel or a training run for in-process sampling and scoring.

    Args:
        path: a SavedModel base path (``saved_models/NAME``: its highest version is loaded),
            one version folder (``saved_models/NAME/3``), or a training run folder.
        which: for a run folder, its ``"best"`` model (lowest validation loss) or its
            ``"latest"`` weights; ignored for a SavedModel.
        xla: run the XLA twins of the generating signatures where the model has them (see ``CharRNN``).

    Returns:
        The model, with ``generate``, ``stream``, ``session``, ``restore`` and ``score``
        (see ``CharRNN``); its ``info.version`` is the version folder's (None for a run folder).

    Raises:
        InputError: nothing loadable at ``path`` (no run, no version folder, a damaged SavedModel).

    Example:

    >>> model = keras_charrnn.load("saved_models/shakespeare")      # doctest: +SKIP
    >>> model.generate("ROMEO:", 100, temperature=0.8, seed=1)      # doctest: +SKIP
    """
    return CharRNN(path, which, xla)
