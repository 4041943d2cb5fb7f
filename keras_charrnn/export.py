"""Export: a trained model -> a TF Serving-ready SavedModel whose signatures carry the state.

The SavedModel is a stateless twin of the stateful training model: the same
weights, any batch size, and every layer's hidden state passed in and handed
back, so a model server keeps no per-client state and any replica can answer
any call. Signatures (all tensors batch-first, named):

``step``
    ``ids`` int32 [B, T] + states -> ``logits`` float32 [B, T, V] + states.
``inspect``
    like ``step``, plus every layer's outputs ``layer_0``, ``layer_1``, ...
    float32 [B, T, units] (for visualising what the units do).
``generate``
    ``ids`` int32 [B, T>=1], states, and per row ``num_chars`` int32,
    ``temperature`` float32 (0 = greedy), ``top_k`` int32 (0 = off),
    ``top_p`` float32 (1 = off), ``seed`` int64, ``position`` int64 ->
    ``ids`` int32 [B, max(num_chars)] + the states after the input and every
    sampled character but the last (pass that last one as the next ``ids``).
    Rows past their own ``num_chars`` are padded with id 0.
``generate_text`` (also ``serving_default``)
    the same with ``prime`` string [B] (UTF-8) in place of ``ids`` and ``text``
    string [B] out.
``metadata``
    no inputs -> ``vocabulary`` string [V] (id order) and ``config`` (JSON).
``generate_xla``, ``generate_text_xla`` (unless exported with ``xla=False``)
    XLA-compiled twins of ``generate`` and ``generate_text``: the same inputs,
    outputs and text, several times faster, but only on a server with XLA JIT
    (``tensorflow_model_server --xla_cpu_compilation_enabled=true``; the embedded
    server and in-process use have it). Nothing the other signatures reach is
    must-compile, so a stock server serves them; callers try a twin first and
    fall back once (see ``keras_charrnn.xla``).

``assets.extra/tf_serving_warmup_requests`` holds TF Serving's warm-up
records (``keras_charrnn.warmup``).

Besides the signatures, the object has a ``keras_step`` function (``step`` taking
one dict) for ``keras.layers.TFSMLayer``.

States are named ``h_0``, ``c_0`` (LSTM only), ``h_1``, ... and are float32
[B, units]; the zero state starts a session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from collections.abc import Callable, Iterable

import keras
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from keras_charrnn import cells, decoding, warmup
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.fileio import atomic_write_dir, fsync_path
from keras_charrnn.metrics import bits_per_char
from keras_charrnn.model import describe, recurrent_layers, state_names
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.sampling import MAX_CHARS_PER_CALL
from keras_charrnn.versions import DEFAULT_BASE_PATH, next_version
from keras_charrnn.vocab import UNKNOWN_CHAR, Vocabulary
from keras_charrnn.xla import TWINNED, xla_twin


class CharRNNModule(tf.Module):
    """The exported model: weights as variables, signatures as ``tf.function``s.

    Args:
        model: a model made by ``build_model`` (stateful or not).
        vocab: its vocabulary.
        info: extra facts recorded in the ``config`` metadata (validation bpc, corpus size).
        jit_compile: add the XLA-compiled twins ``generate_xla`` and ``generate_text_xla``
            (the other signatures never need XLA).

    Raises:
        InputError: the model's output size and the vocabulary disagree.
    """

    def __init__(self, model: keras.Model, vocab: Vocabulary, info: dict | None = None, jit_compile: bool = True):
        super().__init__(name="charrnn")
        spec = describe(model)
        if spec["vocab_size"] != vocab.size:
            raise InputError(
                f"vocab holds {vocab.size} ids but model's logits layer has {spec['vocab_size']}; "
                f"give the vocabulary the model was trained with"
            )
        self.cell, self.units, self.num_layers = spec["cell"], spec["units"], spec["layers"]
        self.vocab_size = vocab.size
        self.state_names = tuple(state_names(self.cell, self.num_layers))
        self.embedding = tf.Variable(model.get_layer("embedding").get_weights()[0], trainable=False, name="embedding")
        self.rnn = [
            [tf.Variable(w, trainable=False, name=f"rnn_{i}_{j}") for j, w in enumerate(layer.get_weights())]
            for i, layer in enumerate(recurrent_layers(model))
        ]
        kernel, bias = model.get_layer("logits").get_weights()
        self.logits_kernel = tf.Variable(kernel, trainable=False, name="logits_kernel")
        self.logits_bias = tf.Variable(bias, trainable=False, name="logits_bias")

        points, ids = vocab.sorted_code_points()
        self._sorted_points = tf.constant(points)
        self._sorted_ids = tf.constant(ids)
        self._chars = tf.constant([UNKNOWN_CHAR] + vocab.chars)
        self._decode_table = tf.constant([""] + vocab.chars)  # id 0 is never generated: it only pads
        config = {
            **spec,
            "vocab_size": vocab.size,
            "unknown_id": 0,
            "state_names": list(self.state_names),
            "state_size": self.units,
            "max_chars_per_call": MAX_CHARS_PER_CALL,
            "format": "keras-charrnn/1",
            "xla": jit_compile,
            "xla_signatures": [xla_twin(n) for n in TWINNED] if jit_compile else [],
            **(info or {}),
        }
        self.config_json = json.dumps(config)  # a dict attribute would be wrapped by tf.Module tracking
        self._config_tensor = tf.constant(self.config_json)
        self.jit_compile = jit_compile
        # The same loop twice: traced plainly for the default signatures, XLA-compiled for the twins.
        self._sample_loop = tf.function(self._sample_loop_impl, autograph=False)
        self._sample_loop_xla = tf.function(self._sample_loop_impl, jit_compile=True, autograph=False)
        self._build_signatures()

    def assign_weights(self, model: keras.Model) -> None:
        """Copies the current weights of ``model`` (the same architecture) into this module.

        The traced signatures are kept, so a training run can sample from its latest
        weights through this module's ``generate_text`` without tracing it again.

        Args:
            model: a model like the one this module was made from (e.g. the training model).
        """
        self.embedding.assign(model.get_layer("embedding").get_weights()[0])
        for variables, layer in zip(self.rnn, recurrent_layers(model)):
            for variable, value in zip(variables, layer.get_weights()):
                variable.assign(value)
        kernel, bias = model.get_layer("logits").get_weights()
        self.logits_kernel.assign(kernel)
        self.logits_bias.assign(bias)

    # ----- the model, batched over rows and time ---------------------------------------------

    def _logits(self, h):
        return cells.matmul_rows(h, self.logits_kernel) + self.logits_bias  # batch-invariant (cells.matmul)

    def _split_states(self, flat):
        per = len(flat) // self.num_layers
        return [tuple(flat[i * per : (i + 1) * per]) for i in range(self.num_layers)]

    def _feed(self, ids, lengths, flat_states):
        """Runs ``ids`` [B, T] through the layers; row b uses its first ``lengths[b]`` ids.

        Returns ``(layer_outputs, last_logits [B, V], flat_states)``: every layer's
        outputs [T, B, U] (bottom first), the logits after each row's last id, and
        the new states.
        """
        x = tf.transpose(tf.gather(self.embedding, ids), [1, 0, 2])  # [T, B, E]
        steps = tf.shape(ids)[1]
        active = tf.range(steps)[:, None] < lengths[None, :]  # [T, B]
        new_states, layer_outputs = [], []
        for weights, states in zip(self.rnn, self._split_states(flat_states)):
            xw = cells.project(self.cell, x, weights)  # every step's input projection at once

            # Bound as defaults: tf.while_loop runs body within this iteration, with this layer's xw and weights.
            def body(t, states, outputs, xw=xw, weights=weights):
                h, updated = cells.recur(self.cell, xw[t], states, weights)
                keep = active[t][:, None]
                updated = tuple(tf.where(keep, new, old) for new, old in zip(updated, states))
                return t + 1, updated, outputs.write(t, h)

            _, states, outputs = tf.while_loop(
                lambda t, *_: t < steps, body, (tf.constant(0), states, tf.TensorArray(tf.float32, size=steps))
            )
            x = outputs.stack()
            layer_outputs.append(x)
            new_states.extend(states)
        # The top layer's h state is its output after each row's last active step.
        last_h = new_states[-2] if self.cell == "lstm" else new_states[-1]
        return layer_outputs, self._logits(last_h), new_states

    def _step_one(self, ids, flat_states):
        """Feeds one id per row; returns ``(logits [B, V], flat_states)``."""
        x = tf.gather(self.embedding, ids)
        new_states = []
        for weights, states in zip(self.rnn, self._split_states(flat_states)):
            x, states = cells.recur(self.cell, cells.project(self.cell, x, weights), states, weights)
            new_states.extend(states)
        return self._logits(x), new_states

    def _generate(
        self, ids, lengths, flat_states, num_chars, temperature, top_k, top_p, seed, position, xla: bool = False
    ):
        """Feeds the input, then samples ``num_chars[b]`` ids for each row b.

        Returns ``(ids [B, max(num_chars)], flat_states)``; a row's ids past its own
        ``num_chars`` are 0 (padding), and its states are those after feeding its
        input and every sampled id but its last. Rows may ask for different counts, so
        TF Serving's batching may merge any calls. ``xla`` runs the sampling loop
        XLA-compiled (the rest, checks included, is the same graph either way).
        """
        checks = self._check_sampling(ids, lengths, flat_states, num_chars, temperature, top_k, top_p, seed, position)
        with tf.control_dependencies(checks):  # nothing runs before the inputs pass the checks
            ids, lengths, num_chars = tf.identity(ids), tf.identity(lengths), tf.identity(num_chars)
        _, logits, states = self._feed(ids, lengths, flat_states)
        if xla:
            out, states = self._sample_loop_xla_rows(
                num_chars, logits, states, temperature, top_k, top_p, seed, position
            )
        else:
            out, states = self._sample_loop(num_chars, logits, states, temperature, top_k, top_p, seed, position)
        n = tf.reduce_max(num_chars)
        valid = tf.range(n)[None, :] < num_chars[:, None]
        return tf.where(valid, out[:, :n], 0), states

    def _sample_loop_xla_rows(self, *rows):
        """The XLA-compiled sampling loop on at least ``cells.MIN_LOOP_ROWS`` rows.

        XLA drops a batch dimension of size 1 and compiles the ops of a lone row into other
        code than those of two or more rows (other bits), so a lone row is run beside a copy
        of itself and its results are cut back out.
        """
        batch = tf.shape(rows[0])[0]
        take = tf.concat([tf.range(batch), tf.zeros([tf.maximum(cells.MIN_LOOP_ROWS - batch, 0)], tf.int32)], 0)
        out, states = self._sample_loop_xla(*tf.nest.map_structure(lambda t: tf.gather(t, take), rows))
        return out[:batch], [state[:batch] for state in states]

    def _sample_loop_impl(self, num_chars, logits, states, temperature, top_k, top_p, seed, position):
        n = tf.reduce_max(num_chars)

        def body(i, logits, states, out):
            chosen = decoding.choose(logits, temperature, top_k, top_p, seed, position + tf.cast(i, tf.int64))
            new_logits, new_states = self._step_one(chosen, states)
            feeding = (i < num_chars - 1)[:, None]  # a row stops before feeding its last sample
            states = [tf.where(feeding, new, old) for new, old in zip(new_states, states)]
            return i + 1, new_logits, states, out.write(i, chosen)

        _, logits, states, out = tf.while_loop(
            lambda i, *_: i < n - 1,
            body,
            # A fixed-size buffer: XLA compiles once, not once per distinct num_chars.
            (tf.constant(0), logits, states, tf.TensorArray(tf.int32, size=MAX_CHARS_PER_CALL)),
        )
        last = decoding.choose(logits, temperature, top_k, top_p, seed, position + tf.cast(n - 1, tf.int64))
        out = out.write(n - 1, last)
        return tf.transpose(out.stack()), states

    def _check_sampling(self, ids, lengths, flat_states, num_chars, temperature, top_k, top_p, seed, position):
        batch = tf.shape(ids)[0]
        same_batch = [
            tf.debugging.assert_equal(tf.shape(t)[0], batch, message=f"{name} must have one row per row of the input")
            for name, t in [
                ("num_chars", num_chars),
                ("temperature", temperature),
                ("top_k", top_k),
                ("top_p", top_p),
                ("seed", seed),
                ("position", position),
            ]
            + list(zip(self.state_names, flat_states))
        ]
        with tf.control_dependencies(same_batch):
            return [
                tf.debugging.assert_greater(batch, 0, message="the batch is empty"),
                tf.debugging.assert_greater(
                    tf.reduce_min(lengths), 0, message="the input (prime) must hold at least one character"
                ),
                tf.debugging.assert_greater(tf.reduce_min(num_chars), 0, message="num_chars must be at least 1"),
                tf.debugging.assert_less_equal(
                    tf.reduce_max(num_chars),
                    MAX_CHARS_PER_CALL,
                    message=f"num_chars must be at most {MAX_CHARS_PER_CALL} per call",
                ),
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(temperature), 0.0, message="temperature must be 0 (greedy) or positive"
                ),
                tf.debugging.assert_greater_equal(tf.reduce_min(top_k), 0, message="top_k must be 0 (off) or positive"),
                tf.debugging.assert_less_equal(
                    tf.reduce_max(top_k),
                    self.vocab_size - 1,
                    message=f"top_k must be at most the vocabulary size ({self.vocab_size - 1})",
                ),
                tf.debugging.assert_greater(tf.reduce_min(top_p), 0.0, message="top_p must be in (0, 1]"),
                tf.debugging.assert_less_equal(tf.reduce_max(top_p), 1.0, message="top_p must be in (0, 1]"),
                tf.debugging.assert_greater_equal(
                    tf.reduce_min(position), tf.constant(0, tf.int64), message="position must be 0 or more"
                ),
            ]

    # ----- text <-> ids inside the graph ------------------------------------------------------

    def _encode(self, text):
        """UTF-8 strings [B] -> (ids [B, T] padded with 0, lengths [B]); unknown characters -> 0."""
        points = tf.strings.unicode_decode(text, "UTF-8", errors="replace")
        lengths = tf.cast(points.row_lengths(), tf.int32)
        dense = points.to_tensor(default_value=-1)
        pos = tf.minimum(
            tf.searchsorted(self._sorted_points, tf.reshape(dense, [-1])), tf.size(self._sorted_points) - 1
        )
        found = tf.gather(self._sorted_points, pos) == tf.reshape(dense, [-1])
        ids = tf.where(found, tf.gather(self._sorted_ids, pos), 0)
        return tf.reshape(ids, tf.shape(dense)), lengths

    def _decode(self, ids):
        return tf.strings.reduce_join(tf.gather(self._decode_table, ids), axis=-1)

    # ----- signatures -------------------------------------------------------------------------

    def _build_signatures(self):
        state_specs = [tf.TensorSpec([None, self.units], tf.float32, name=n) for n in self.state_names]
        row = lambda dtype, name: tf.TensorSpec([None], dtype, name=name)  # noqa: E731
        sampling_specs = [
            row(tf.int32, "num_chars"),
            row(tf.float32, "temperature"),
            row(tf.int32, "top_k"),
            row(tf.float32, "top_p"),
            row(tf.int64, "seed"),
            row(tf.int64, "position"),
        ]
        k = len(self.state_names)

        def named_states(states):
            return dict(zip(self.state_names, states))

        def step(ids, *states):
            lengths = tf.fill([tf.shape(ids)[0]], tf.shape(ids)[1])
            outputs, _, new_states = self._feed(ids, lengths, list(states))
            return {"logits": self._logits(tf.transpose(outputs[-1], [1, 0, 2])), **named_states(new_states)}

        def inspect(ids, *states):
            lengths = tf.fill([tf.shape(ids)[0]], tf.shape(ids)[1])
            outputs, _, new_states = self._feed(ids, lengths, list(states))
            layers = {f"layer_{i}": tf.transpose(out, [1, 0, 2]) for i, out in enumerate(outputs)}
            return {"logits": self._logits(layers[f"layer_{len(outputs) - 1}"]), **layers, **named_states(new_states)}

        def generate_with(xla):
            def generate(ids, *rest):
                lengths = tf.fill([tf.shape(ids)[0]], tf.shape(ids)[1])
                out, states = self._generate(ids, lengths, list(rest[:k]), *rest[k:], xla=xla)
                return {"ids": out, **named_states(states)}

            return generate

        def generate_text_with(xla):
            def generate_text(prime, *rest):
                ids, lengths = self._encode(prime)
                out, states = self._generate(ids, lengths, list(rest[:k]), *rest[k:], xla=xla)
                return {"text": self._decode(out), **named_states(states)}  # padding (id 0) decodes to ""

            return generate_text

        def metadata():
            return {"vocabulary": self._chars, "config": self._config_tensor}

        ids_spec = tf.TensorSpec([None, None], tf.int32, name="ids")
        self.step_function = tf.function(step, input_signature=[ids_spec] + state_specs)
        self.inspect_function = tf.function(inspect, input_signature=[ids_spec] + state_specs)
        generate_specs = [ids_spec] + state_specs + sampling_specs
        text_specs = [tf.TensorSpec([None], tf.string, name="prime")] + state_specs + sampling_specs
        self.generate_function = tf.function(generate_with(False), input_signature=generate_specs)
        self.generate_text_function = tf.function(generate_text_with(False), input_signature=text_specs)
        if self.jit_compile:
            self.generate_xla_function = tf.function(generate_with(True), input_signature=generate_specs)
            self.generate_text_xla_function = tf.function(generate_text_with(True), input_signature=text_specs)
        self.metadata_function = tf.function(metadata, input_signature=[])
        # For keras.layers.TFSMLayer(path, call_endpoint="keras_step"): Keras passes one
        # positional input, so this endpoint takes step's inputs as one dict.
        self.keras_step = tf.function(
            lambda inputs: step(inputs["ids"], *[inputs[n] for n in self.state_names]),
            input_signature=[{"ids": ids_spec, **{s.name: s for s in state_specs}}],
        )

    def signatures(self) -> dict:
        """The concrete functions to save, by signature name.

        The functions are attributes named ``*_function``, not by the signature names, so
        loaders that look attributes up first (``keras.layers.TFSMLayer``) find the
        keyword-argument signatures.
        """
        text = self.generate_text_function.get_concrete_function()
        sigs = {
            "step": self.step_function.get_concrete_function(),
            "inspect": self.inspect_function.get_concrete_function(),
            "generate": self.generate_function.get_concrete_function(),
            "generate_text": text,
            "serving_default": text,
            "metadata": self.metadata_function.get_concrete_function(),
        }
        if self.jit_compile:
            sigs["generate_xla"] = self.generate_xla_function.get_concrete_function()
            sigs["generate_text_xla"] = self.generate_text_xla_function.get_concrete_function()
        return sigs

    def named_signatures(self) -> dict[str, Callable[..., dict]]:
        """The signatures called as a loaded SavedModel's are: tensors by input name, e.g. ``f(ids=..., h_0=...)``.

        So an in-memory module (a training run opened by ``keras_charrnn.load``)
        and its exported SavedModel are run by the same code.

        Returns:
            ``{signature name: function of keyword tensors returning a dict of tensors}``.
        """

        def by_name(function):
            names = [spec.name for spec in tf.nest.flatten(function.structured_input_signature)]
            return lambda **inputs: function(*[inputs[name] for name in names])

        return {name: by_name(function) for name, function in self.signatures().items()}


def save_savedmodel(
    model: keras.Model,
    vocab: Vocabulary,
    path: str | os.PathLike,
    info: dict | None = None,
    xla: bool = True,
    warmup_batch_sizes: Iterable[int] = warmup.DEFAULT_BATCH_SIZES,
    warmup_xla: bool = False,
) -> Path:
    """Writes the SavedModel of ``model`` to the folder ``path`` atomically (build, then rename).

    Args:
        model: a model made by ``build_model``.
        vocab: its vocabulary.
        path: the version folder to create, e.g. ``saved_models/shakespeare/3``; must not exist.
        info: extra facts for the ``config`` metadata.
        xla: add the XLA-compiled twins ``generate_xla`` and ``generate_text_xla``
            (several times faster where the server has XLA JIT; the default
            signatures serve without it either way).
        warmup_batch_sizes: the batch sizes of the warm-up records (see ``keras_charrnn.warmup``).
        warmup_xla: warm the XLA twins too; only for servers started with XLA JIT
            (``--xla_cpu_compilation_enabled=true``): a stock server fails the load on them.

    Returns:
        ``path``.

    Raises:
        ConfigError: bad warm-up batch sizes.
        InputError: the folder cannot be written.
    """
    return _save_module(CharRNNModule(model, vocab, info, jit_compile=xla), path, warmup_batch_sizes, warmup_xla)


def _save_module(
    module: CharRNNModule,
    path: str | os.PathLike,
    warmup_batch_sizes: Iterable[int] = warmup.DEFAULT_BATCH_SIZES,
    warmup_xla: bool = False,
) -> Path:
    signatures = list(warmup.WARMUP_SIGNATURES)
    if warmup_xla and module.jit_compile:
        signatures += [xla_twin(s) for s in warmup.WARMUP_SIGNATURES if s in TWINNED]
    sizes = warmup.check_batch_sizes(list(warmup_batch_sizes), signatures)

    def write(tmp: str) -> None:
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        saved = saved_model_pb2.SavedModel.FromString((Path(tmp) / "saved_model.pb").read_bytes())
        warmup.write_warmup_file(tmp, warmup.warmup_requests(saved.meta_graphs[0].signature_def, sizes, signatures))

    try:
        atomic_write_dir(path, write)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the SavedModel ({exc.strerror or exc})") from None
    return Path(path)


RUN_FACTS = ("val_loss", "val_bpc", "corpus_chars", "corpus", "trained_epochs")  # what ``run_facts`` records


def run_facts(record: dict) -> dict:
    """What the ``config`` metadata records of a training run: validation loss, corpus, epochs.

    Only facts that mean something on another machine: the corpus by file name,
    never a path of the training machine.

    Args:
        record: ``RunFolder.record()``.

    Returns:
        ``{"val_loss", "val_bpc", "corpus_chars", "corpus", "trained_epochs"}``.
    """
    best = record.get("best_val_loss")
    corpus = record.get("corpus", {})
    facts = {
        "val_loss": best,
        "val_bpc": bits_per_char(best) if best is not None else None,
        "corpus_chars": corpus.get("chars"),
        "corpus": os.path.basename(corpus.get("path", "")) or None,
        "trained_epochs": record.get("epochs_done"),
    }
    return {key: facts[key] for key in RUN_FACTS}


def module_from_run(run_dir: str | os.PathLike, which: str = "best", xla: bool = True) -> CharRNNModule:
    """The exported module of a training run, in memory: what ``export_run`` would write.

    Args:
        run_dir: a run folder written by ``train``.
        which: ``"best"`` model by validation loss or ``"latest"`` weights.
        xla: add the XLA-compiled twins of the generating signatures.

    Returns:
        The module; ``named_signatures()`` runs it as the SavedModel would be run.
    """
    run = RunFolder(run_dir)
    return CharRNNModule(run.load_model(which), run.vocab(), run_facts(run.record()), jit_compile=xla)


def export_run(
    run_dir: str | os.PathLike,
    name: str,
    base_path: str | os.PathLike = DEFAULT_BASE_PATH,
    version: int | None = None,
    which: str = "best",
    xla: bool = True,
    warmup_batch_sizes: Iterable[int] = warmup.DEFAULT_BATCH_SIZES,
    warmup_xla: bool = False,
) -> Path:
    """Exports a training run as ``base_path/name/version``, the layout TF Serving polls.

    Args:
        run_dir: a run folder written by ``train``.
        name: the model name (a folder under ``base_path``).
        base_path: the folder of all models.
        version: the version number; defaults to the next integer.
        which: ``"best"`` model by validation loss or ``"latest"`` weights.
        xla: add the XLA-compiled twins (see ``save_savedmodel``).
        warmup_batch_sizes: the batch sizes of the warm-up records, e.g.
            ``settings.batch_sizes_from_batching_parameters("serving/batching_parameters.txt")``.
        warmup_xla: warm the XLA twins too (see ``save_savedmodel``).

    Returns:
        The version folder written.

    Raises:
        ConfigError: ``name``, ``version``, ``which`` or ``warmup_batch_sizes`` is invalid.
        InputError: the run cannot be loaded, or the version folder exists or cannot be written.

    Example:

    >>> export_run("runs/shakespeare", "shakespeare")  # doctest: +SKIP
    PosixPath('saved_models/shakespeare/1')
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"name {name!r}: use letters, digits, '_', '.' and '-'")
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ConfigError(f"version must be a positive integer, got {version}")
    base = Path(base_path) / name
    target = base / str(version or next_version(base))
    if target.exists():
        raise InputError(f"{target} already exists; choose another version")
    sizes = warmup.check_batch_sizes(list(warmup_batch_sizes), warmup.WARMUP_SIGNATURES)  # before the slow part
    return _save_module(module_from_run(run_dir, which, xla), target, sizes, warmup_xla)


def module_from_savedmodel(path: str | os.PathLike, xla: bool = True) -> CharRNNModule:
    """A SavedModel of this package rebuilt by this package's code: its weights, vocabulary and facts.

    The SavedModel's own graph may come from older code; only its variables and its
    ``metadata`` (vocabulary, architecture, run facts) are taken, so the module computes
    what this version of the package exports.

    Args:
        path: a version folder written by ``save_savedmodel`` / ``export_run``.
        xla: add the XLA-compiled twins of the generating signatures.

    Returns:
        The module; ``named_signatures()`` runs it as a SavedModel.

    Raises:
        InputError: the folder holds no SavedModel of this package.

    Example:

    >>> module = module_from_savedmodel("saved_models/shakespeare/1")  # doctest: +SKIP
    >>> module.cell, module.units                                       # doctest: +SKIP
    ('lstm', 512)
    """
    from keras_charrnn.model import build_model  # the model's layers, only to carry the weights

    try:
        checkpoint = tf.train.load_checkpoint(str(Path(path) / "variables" / "variables"))
        metadata = tf.saved_model.load(str(path)).signatures["metadata"]()
    except (OSError, ValueError, KeyError, tf.errors.OpError) as exc:
        raise InputError(f"{path}: not a SavedModel of this package ({str(exc).splitlines()[0]})") from None
    config = json.loads(metadata["config"].numpy())
    chars = [c.decode("utf-8") for c in metadata["vocabulary"].numpy()[1:]]

    def weight(name):
        return checkpoint.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

    model = build_model(
        len(chars) + 1,
        config["cell"],
        units=config["units"],
        layers=config["layers"],
        embedding_dim=config["embedding_dim"],
        dropout=config.get("dropout", 0.0),
        batch_size=None,
        seq_len=None,
        stateful=False,
    )
    model.get_layer("embedding").set_weights([weight("embedding")])
    for i, layer in enumerate(recurrent_layers(model)):
        layer.set_weights([weight(f"rnn/{i}/{j}") for j in range(3)])
    model.get_layer("logits").set_weights([weight("logits_kernel"), weight("logits_bias")])
    info = {key: config[key] for key in RUN_FACTS if key in config}
    return CharRNNModule(model, Vocabulary(chars), info, jit_compile=xla)


def reexport_savedmodel(
    path: str | os.PathLike, warmup_batch_sizes: Iterable[int] = warmup.DEFAULT_BATCH_SIZES
) -> Path:
    """Rewrites a SavedModel in place with this package's graph: same folder, weights, vocabulary and facts.

    For a bundled or long-served version whose graph should gain what a newer package
    exports, without a new version number. The new folder is written beside the old one
    and swapped in by renames; a server polling the base path sees either version whole.

    Args:
        path: the version folder, e.g. ``saved_models/shakespeare/1``.
        warmup_batch_sizes: the batch sizes of the warm-up records.

    Returns:
        ``path``.

    Raises:
        InputError: the folder holds no SavedModel of this package, or cannot be written.
    """
    path = Path(path)
    had = tf.saved_model.load(str(path)).signatures
    module = module_from_savedmodel(path, xla=any(xla_twin(n) in had for n in TWINNED))
    fresh = path.with_name(f".{path.name}.new")
    old = path.with_name(f".{path.name}.old")
    _save_module(module, fresh, warmup_batch_sizes)
    os.rename(path, old)
    os.rename(fresh, path)
    fsync_path(path.parent)
    shutil.rmtree(old)
    return path
