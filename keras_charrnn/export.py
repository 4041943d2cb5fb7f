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

States are named ``h_0``, ``c_0`` (the LSTMs only), ``h_1``, ... and are float32
[B, units]; the zero state starts a session.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import keras
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from keras_charrnn import cells, generation_graph, warmup
from keras_charrnn.cell_types import cell_spec
from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.fileio import atomic_write_dir
from keras_charrnn.metrics import bits_per_char
from keras_charrnn.model import describe, recurrent_layers, state_names
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.generation import (
    CONTROLLED_SIGNATURES,
    MAX_CHARS_PER_CALL,
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    PLAIN_SIGNATURES,
    inputs_of,
)
from keras_charrnn.versions import DEFAULT_BASE_PATH, next_version
from keras_charrnn.vocab import UNKNOWN_CHAR, Vocabulary
from keras_charrnn.xla import TWINNED, xla_twin

SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "position")  # what the loop reads of every row


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
        self.cell_spec = cell_spec(self.cell)
        self.vocab_size = vocab.size
        self.alternatives = min(MAX_LOGPROBS, vocab.size - 1)  # the scores' widest top-N (static: XLA compiles once)
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
            "max_stops": MAX_STOPS,
            "max_stop_chars": MAX_STOP_CHARS,
            "max_logprobs": min(MAX_LOGPROBS, vocab.size - 1),
            "generate_signatures": list(PLAIN_SIGNATURES + CONTROLLED_SIGNATURES),
            "format": "keras-charrnn/1",
            "xla": jit_compile,
            "xla_signatures": [xla_twin(n) for n in TWINNED] if jit_compile else [],
            **(info or {}),
        }
        self.config_json = json.dumps(config)  # a dict attribute would be wrapped by tf.Module tracking
        self._config_tensor = tf.constant(self.config_json)
        self.jit_compile = jit_compile
        # The same loop twice: traced plainly for the default signatures, XLA-compiled for the twins.
        self._sample_loop = tf.function(self._sample_loop_plain, autograph=False)
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
            xw = self.cell_spec.project(x, weights)  # every step's input projection at once

            def body(t, states, outputs, xw=xw, weights=weights):  # this layer's, bound now
                h, updated = self.cell_spec.recur(xw[t], states, weights)
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
        last_h = self.cell_spec.output(new_states[-len(self.cell_spec.states) :])
        return layer_outputs, self._logits(last_h), new_states

    def _step_one(self, ids, flat_states):
        """Feeds one id per row; returns ``(logits [B, V], flat_states)``."""
        x = tf.gather(self.embedding, ids)
        new_states = []
        for weights, states in zip(self.rnn, self._split_states(flat_states)):
            x, states = self.cell_spec.recur(self.cell_spec.project(x, weights), states, weights)
            new_states.extend(states)
        return self._logits(x), new_states

    def _generate(self, signature: str, ids, lengths, flat_states, rows: dict, xla: bool = False) -> dict:
        """Feeds the input, then samples up to ``num_chars[b]`` ids for each row b.

        Returns ``generation_graph.sample_loop``'s results cut to the longest row (``ids``
        [B, n], 0 past a row's end; scores [B, n(, K)]); a row's states are those after
        feeding its input and every sampled id but its last. Rows may ask for different
        counts, so TF Serving's batching may merge any calls. ``xla`` runs the sampling loop
        XLA-compiled (the rest, checks included, is the same graph either way).
        """
        batch = tf.shape(ids)[0]
        checks = generation_graph.graph_checks(signature, rows, batch, self.vocab_size) + [
            tf.debugging.assert_equal(
                tf.shape(state)[0], batch, message=f"{name} must have one row per row of the input"
            )
            for name, state in zip(self.state_names, flat_states)
        ]
        with tf.control_dependencies(checks):
            checks.append(
                tf.debugging.assert_greater(
                    tf.reduce_min(lengths), 0, message="the input (prime) must hold at least one character"
                )
            )
            stop_checks, controls = generation_graph.controls_of(rows, self._encode, self.vocab_size)
        with tf.control_dependencies(checks + stop_checks):  # nothing runs before the inputs pass the checks
            ids, lengths = tf.identity(ids), tf.identity(lengths)
            rows = {k: tf.identity(v) for k, v in rows.items()}  # the loop reads them: gated too
            controls = None if controls is None else {k: tf.identity(v) for k, v in controls.items()}
        # The input's last character is fed inside the loop, by the step that feeds every sampled character
        # (``generation_graph.sample_loop``): calls that continue from it compute what one longer call does.
        sampling = {k: rows[k] for k in SAMPLING_KEYS}
        _, _, states = self._feed(ids, lengths - 1, flat_states)
        args = (rows["num_chars"], tf.gather(ids, lengths - 1, batch_dims=1), states, sampling, controls)
        result = self._sample_loop_xla_rows(*args) if xla else self._sample_loop(*args)
        n = tf.reduce_max(rows["num_chars"])
        valid = tf.range(n)[None, :] < result["num_generated"][:, None]
        result["ids"] = tf.where(valid, result["ids"][:, :n], 0)
        if controls is not None:
            k = tf.clip_by_value(tf.reduce_max(controls["logprobs"]), 0, self.alternatives)
            result["char_logprobs"] = tf.where(valid, result["char_logprobs"][:, :n], 0.0)
            result["top_ids"] = tf.where(valid[:, :, None], result["top_ids"][:, :n, :k], 0)
            result["top_logprobs"] = tf.where(valid[:, :, None], result["top_logprobs"][:, :n, :k], 0.0)
        return result

    def _sample_loop_xla_rows(self, *args):
        """The XLA-compiled sampling loop on at least ``cells.MIN_LOOP_ROWS`` rows.

        XLA drops a batch dimension of size 1 and compiles the ops of a lone row into other
        code than those of two or more rows (other bits), so a lone row is run beside a copy
        of itself and its results are cut back out.
        """
        batch = tf.shape(args[0])[0]
        take = tf.concat([tf.range(batch), tf.zeros([tf.maximum(cells.MIN_LOOP_ROWS - batch, 0)], tf.int32)], 0)
        result = self._sample_loop_xla(
            *tf.nest.map_structure(lambda t: None if t is None else tf.gather(t, take), args)
        )
        return tf.nest.map_structure(lambda t: t[:batch], result)

    def _input_spec(self, spec) -> tf.TensorSpec:
        """The ``TensorSpec`` of a generation input (``generation.INPUTS``): a batch of rows of its row shape."""
        dims = {"stops": None, "vocab": self.vocab_size}
        dtype = tf.string if spec.dtype == "object" else tf.as_dtype(spec.dtype)
        return tf.TensorSpec([None] + [dims[d] for d in spec.row_shape], dtype, name=spec.name)

    def _sample_loop_impl(self, num_chars, last, states, rows, controls):
        return generation_graph.sample_loop(self._step_one, num_chars, last, states, rows, controls, self.alternatives)

    def _sample_loop_plain(self, num_chars, last, states, rows, controls):
        """The loop of the plain graph: a batch that uses no control runs without them (fewer ops per step)."""
        return generation_graph.sample_loop(
            self._step_one, num_chars, last, states, rows, controls, self.alternatives, skip_idle_controls=True
        )

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
        ids_spec = tf.TensorSpec([None, None], tf.int32, name="ids")
        state_specs = [tf.TensorSpec([None, self.units], tf.float32, name=n) for n in self.state_names]
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

        def generating(signature: str, xla: bool):
            """A generate signature's function: (prime or ids, *states, *its generation inputs) -> outputs."""
            names = [i.name for i in inputs_of(signature)]
            text_in = signature.startswith("generate_text")

            def generate(given, *rest):
                ids, lengths = (
                    self._encode(given) if text_in else (given, tf.fill([tf.shape(given)[0]], tf.shape(given)[1]))
                )
                result = self._generate(signature, ids, lengths, list(rest[:k]), dict(zip(names, rest[k:])), xla=xla)
                out = {"text": self._decode(result["ids"])} if text_in else {"ids": result["ids"]}
                if signature in CONTROLLED_SIGNATURES:
                    stopped = result["stop_index"] >= 0
                    out.update(
                        num_generated=result["num_generated"],
                        stop_index=result["stop_index"],
                        finish_reason=tf.where(stopped, tf.constant("stop"), tf.constant("length")),
                        char_logprobs=result["char_logprobs"],
                        top_ids=result["top_ids"],
                        top_logprobs=result["top_logprobs"],
                    )
                return {**out, **named_states(result["states"])}  # padding (id 0) decodes to ""

            given = tf.TensorSpec([None], tf.string, name="prime") if text_in else ids_spec
            specs = [given] + state_specs + [self._input_spec(i) for i in inputs_of(signature)]
            return tf.function(generate, input_signature=specs)

        def metadata():
            return {"vocabulary": self._chars, "config": self._config_tensor}

        self.step_function = tf.function(step, input_signature=[ids_spec] + state_specs)
        self.inspect_function = tf.function(inspect, input_signature=[ids_spec] + state_specs)
        # Attributes named ``*_function`` (see ``signatures``), one per generate signature and flavour.
        for name in PLAIN_SIGNATURES + CONTROLLED_SIGNATURES:
            setattr(self, f"{name}_function", generating(name, xla=False))
            if self.jit_compile:
                setattr(self, f"{xla_twin(name)}_function", generating(name, xla=True))
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
        return {name: function.get_concrete_function() for name, function in self._signature_functions().items()}

    def _signature_functions(self) -> dict[str, Any]:
        """The ``tf.function`` of each signature, by signature name (not traced yet)."""
        functions = {
            "step": self.step_function,
            "inspect": self.inspect_function,
            "serving_default": self.generate_text_function,
            "metadata": self.metadata_function,
        }
        for name in PLAIN_SIGNATURES + CONTROLLED_SIGNATURES:
            functions[name] = getattr(self, f"{name}_function")
            if self.jit_compile:
                functions[xla_twin(name)] = getattr(self, f"{xla_twin(name)}_function")
        return functions

    def named_signatures(self) -> Mapping[str, Callable[..., dict]]:
        """The signatures called as a loaded SavedModel's are: tensors by input name, e.g. ``f(ids=..., h_0=...)``.

        So an in-memory module (a training run opened by ``keras_charrnn.load``)
        and its exported SavedModel are run by the same code. Each signature is traced
        when it is first looked up, so a caller pays only for the ones it runs.

        Returns:
            ``{signature name: function of keyword tensors returning a dict of tensors}`` (a read-only mapping).
        """
        return _TracedOnUse(self._signature_functions())


class _TracedOnUse(Mapping):
    """Signature name -> a function of keyword tensors, traced on first lookup (``CharRNNModule.named_signatures``)."""

    def __init__(self, functions: dict[str, Any]):
        self._functions = functions
        self._traced: dict[str, Callable[..., dict]] = {}

    def __getitem__(self, name: str) -> Callable[..., dict]:
        if name not in self._traced:
            concrete = self._functions[name].get_concrete_function()
            names = [spec.name for spec in tf.nest.flatten(concrete.structured_input_signature)]
            self._traced[name] = lambda **inputs: concrete(*[inputs[n] for n in names])
        return self._traced[name]

    def __iter__(self):
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)


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
    return save_module(CharRNNModule(model, vocab, info, jit_compile=xla), path, warmup_batch_sizes, warmup_xla)


def save_module(
    module: CharRNNModule,
    path: str | os.PathLike,
    warmup_batch_sizes: Iterable[int] = warmup.DEFAULT_BATCH_SIZES,
    warmup_xla: bool = False,
) -> Path:
    """Writes a module's SavedModel, with its warm-up records, to the folder ``path`` atomically.

    Args:
        module: the module (``CharRNNModule``, ``module_from_run``, ``reexport.module_from_savedmodel``).
        path: the version folder to create; must not exist.
        warmup_batch_sizes: the batch sizes of the warm-up records.
        warmup_xla: warm the XLA twins too (see ``save_savedmodel``).

    Returns:
        ``path``.

    Raises:
        ConfigError: bad warm-up batch sizes.
        InputError: the folder cannot be written.
    """
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
    return save_module(module_from_run(run_dir, which, xla), target, sizes, warmup_xla)
