"""Training under ``tf.distribute``: several devices (``MirroredStrategy``) or machines
(``MultiWorkerMirroredStrategy``, configured by ``TF_CONFIG``), each replica owning its own streams.

How it works (``train(..., strategy="mirrored")`` does all of it):

- The corpus is cut into the *global* batch's streams as on one device
  (``config.batch_size``); the model is built inside ``strategy.scope()`` with the
  per-replica batch ``batch_size // replicas``. Keras' ``fit`` distributes the batches:
  replica r (across workers: worker w's replica r, in order) gets rows
  ``r*B/R ... (r+1)*B/R - 1`` of every batch, so it owns a contiguous share of the streams.
- Each recurrent layer's hidden states (``layers.CharLSTM`` etc.) are
  ``synchronization="on_read", aggregation="none"`` variables: every replica reads and
  writes its own copy, the state of its own streams, from one batch to the next.
  ``read_states``/``write_states`` gather and split them in stream order, so checkpoints
  hold the same arrays as a single-device run and a run may resume on another layout.
- ``GlobalClipAdam``: stock Keras clips each replica's partial gradient by its own
  norm before the all-reduce; this one all-reduces first, so the clip stays global.
- Checkpoints: under ``MultiWorkerMirroredStrategy`` every worker takes part in
  gathering the states (a collective), only the chief writes to the run folder;
  the other workers write into a temporary folder that is removed at the end
  (Keras' and TensorFlow's multi-worker convention). Every worker restores from the
  run folder, which must be on a volume they share, taking its own rows of the states.

Only the TensorFlow backend distributes; on JAX, ``strategy_from_name`` raises a
``ConfigError``. This module imports TensorFlow, and the training code imports it
only on the TensorFlow backend.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import types
import weakref
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_charrnn.errors import ConfigError

STRATEGIES = ("mirrored", "multi-worker")
LOGICAL_CPUS_ENV = "CHARRNN_LOGICAL_CPUS"  # split the CPU into this many devices (tests, CPU-only machines)

__all__ = [
    "STRATEGIES",
    "strategy_from_name",
    "resolve",
    "Distribution",
    "GlobalClipAdam",
    "read_states",
    "write_states",
    "local_components",
]


def _check_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise ConfigError(
            f"distributed training needs the TensorFlow backend (KERAS_BACKEND is "
            f"{keras.backend.backend()!r}); unset distribute or use backend tensorflow"
        )


def _split_cpu(n: int) -> None:
    """Makes ``n`` logical CPU devices of the (first) physical CPU; only possible before TF starts its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        raise ConfigError(
            f"{LOGICAL_CPUS_ENV}={n}: TensorFlow's devices were already started; set it "
            f"before the process uses TensorFlow"
        ) from None


def strategy_from_name(name: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy that a name stands for.

    Args:
        name: ``"mirrored"``: every GPU of this machine, or, without GPUs, every
            logical CPU device (one unless ``CHARRNN_LOGICAL_CPUS`` splits the CPU);
            ``"multi-worker"``: ``MultiWorkerMirroredStrategy``, the cluster and this
            worker's place in it from the ``TF_CONFIG`` environment variable. Create it
            before anything else uses TensorFlow (collectives are set up at start-up).

    Returns:
        The strategy.

    Raises:
        ConfigError: an unknown name, another backend than TensorFlow, or a missing/bad ``TF_CONFIG``.

    Example:

    >>> strategy = strategy_from_name("mirrored")  # doctest: +SKIP
    """
    _check_backend()
    if name not in STRATEGIES:
        raise ConfigError(f"distribute must be one of {', '.join(STRATEGIES)}, got {name!r}")
    cpus = os.environ.get(LOGICAL_CPUS_ENV)
    if cpus:
        _split_cpu(int(cpus))
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    try:
        cluster = json.loads(os.environ["TF_CONFIG"])
        workers = cluster["cluster"]["worker"]
        cluster["task"]["index"]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            'distribute multi-worker needs TF_CONFIG: {"cluster": {"worker": ["host:port", ...]}, '
            '"task": {"type": "worker", "index": i}}'
        ) from None
    if not workers:
        raise ConfigError("TF_CONFIG names no workers")
    return tf.distribute.MultiWorkerMirroredStrategy()


def resolve(strategy: str | tf.distribute.Strategy | None) -> tf.distribute.Strategy | None:
    """A strategy from a name (``strategy_from_name``), a strategy, or the one whose scope is open (else None)."""
    if isinstance(strategy, str):
        return strategy_from_name(strategy)
    if strategy is None:
        return tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    _check_backend()
    return strategy


def _is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._num_workers > 1


# ---------------------------------------------------------------------------------------- hidden states


def in_cross_replica_context() -> bool:
    """Whether a strategy's scope is open outside its replicas (where a replica-local state cannot be read)."""
    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context()


def local_components(var) -> list:
    """The per-replica ``tf.Variable``s of a Keras variable on this worker, in replica order (``[var]`` if plain)."""
    value = var.value
    strategy = getattr(value, "_distribute_strategy", None)
    return list(strategy.experimental_local_results(value)) if strategy is not None else [value]


def zero_local(var) -> None:
    """Zeroes every replica's copy of a state variable (``var.assign`` refuses that outside the replicas)."""
    for c in local_components(var):
        c.assign(tf.zeros_like(c))


def _strategy_of(variables) -> tf.distribute.Strategy | None:
    return getattr(variables[0].value, "_distribute_strategy", None) if variables else None


def _gather(strategy: tf.distribute.Strategy, variables: list) -> list[np.ndarray]:
    """Every worker's rows of each state, in stream order: an all-gather every worker must run at the same point."""
    cache = strategy.__dict__.setdefault("_charrnn_gathers", {})
    key = tuple(id(v) for v in variables)
    if key not in cache:

        @tf.function
        def gather():
            def replica_fn():
                ctx = tf.distribute.get_replica_context()
                return [ctx.all_gather(tf.identity(v.value), axis=0) for v in variables]

            return strategy.run(replica_fn)

        cache[key] = gather
    return [np.array(strategy.experimental_local_results(out)[0].numpy()) for out in cache[key]()]


def read_states(variables: list) -> list[np.ndarray]:
    """The states as whole-batch arrays, rows in stream order, gathered from every replica and worker."""
    strategy = _strategy_of(variables)
    if strategy is None:
        return [np.array(v.numpy()) for v in variables]
    if _is_multi_worker(strategy):
        return _gather(strategy, variables)
    return [np.concatenate([c.numpy() for c in local_components(v)], axis=0) for v in variables]


def write_states(variables: list, values: list[np.ndarray]) -> None:
    """Sets whole-batch states: each replica (of each worker) takes its own rows."""
    strategy = _strategy_of(variables)
    if strategy is None:
        for v, value in zip(variables, values):
            v.assign(value)
        return
    first = strategy.cluster_resolver.task_id if _is_multi_worker(strategy) else 0
    for v, value in zip(variables, values):
        comps = local_components(v)
        parts = np.split(np.asarray(value), strategy.num_replicas_in_sync, axis=0)
        for i, c in enumerate(comps):
            c.assign(parts[first * len(comps) + i])


# ----------------------------------------------------------------------------------------- optimizer


class GlobalClipAdam(keras.optimizers.Adam):
    """Adam whose ``global_clipnorm`` (and ``clipnorm``, ``clipvalue``) clip the all-reduced gradient.

    Keras 3's optimizer (TF backend) clips in ``_backend_apply_gradients`` before
    ``_backend_update_step`` sums the gradients over the replicas, so under a strategy
    each replica clips its partial gradient by its own norm: the update differs from a
    single device's whenever the clip applies. This one sums first, clips the sum and
    turns the later sum into a no-op. Outside a strategy (or with one replica) it is Adam.
    Both overridden methods are private Keras methods (checked with Keras 3.15);
    ``tests/test_distribute.py`` compares the result with one device.
    """

    def _clip_gradients(self, grads):
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return list(grads_and_vars)  # already summed in _clip_gradients


# ----------------------------------------------------------------- MultiWorkerMirroredStrategy fixes


def _zero_batch_symbolic_build(model: keras.Model) -> None:
    """Fix 1 (this model only). Keras 3.15's TF trainer builds the model before ``fit`` by
    taking one distributed batch and ``strategy.reduce("MEAN", ...)``-ing it to get
    shapes; under ``MultiWorkerMirroredStrategy`` that reduce of an int ``PerReplica``
    raises "Attempt to convert a value (PerReplica...) to a Tensor". The batch only
    supplies shapes, so this model is given a zero batch of its input shape instead."""
    build = model._maybe_symbolic_build

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            shape = tuple(self.inputs[0].shape)
            data_batch = (np.zeros(shape, "int32"), np.zeros(shape, "int32"))
        return build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)


def _patch_scalar_log_reduce() -> None:
    """Fix 2 (process-wide, but a change only under multi-worker). Keras 3.15's
    ``reduce_per_replica(..., "auto")`` reduces the step's scalar logs (the loss) with
    ``strategy.reduce("MEAN", v, axis=0)`` under ``MultiWorkerMirroredStrategy``, which
    raises "Invalid reduction dimension 0 for input with 0 dimensions". Scalars are
    reduced with ``axis=None`` (the mean over replicas); everything else goes to Keras."""
    from keras.src.backend.tensorflow import trainer as tf_trainer
    from keras.src import tree

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_charrnn", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and _is_multi_worker(strategy):
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0), values
            )
        return original(values, strategy, reduction)

    reduce_per_replica._charrnn = True  # type: ignore[attr-defined]  # marks the patch as made
    tf_trainer.reduce_per_replica = reduce_per_replica


class Distribution:
    """What ``train`` needs to know of a strategy: replicas, the chief, where this worker writes.

    Args:
        strategy: the ``tf.distribute`` strategy.
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        self.strategy = strategy
        self.replicas = strategy.num_replicas_in_sync
        self.multi_worker = _is_multi_worker(strategy)
        self.is_chief = bool(strategy.extended.should_checkpoint)
        self._scratch: str | None = None

    def check_batch(self, batch_size: int) -> None:
        """Refuses a global batch that does not split evenly over the replicas.

        Raises:
            ConfigError: ``batch_size`` is not a multiple of the number of replicas.
        """
        if batch_size % self.replicas:
            raise ConfigError(
                f"batch_size {batch_size} must be a multiple of the {self.replicas} replicas of the distributed run"
            )

    def scope(self):
        """The strategy's scope: build, compile and restore the model in it."""
        return self.strategy.scope()

    def optimizer_class(self) -> type:
        """``GlobalClipAdam``: Adam whose clipping stays global over the replicas."""
        return GlobalClipAdam

    def prepare(self, model: keras.Model) -> keras.Model:
        """Applies the multi-worker fixes to a compiled model (nothing for one worker)."""
        if self.multi_worker:
            _zero_batch_symbolic_build(model)
            _patch_scalar_log_reduce()
        return model

    def write_dir(self, run_dir: str | os.PathLike) -> Path:
        """Where this worker writes: the run folder for the chief, a temporary folder for the others."""
        if self.is_chief:
            return Path(run_dir)
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="charrnn-worker-")
            weakref.finalize(self, shutil.rmtree, self._scratch, True)  # also removed if training fails
        return Path(self._scratch)

    def cleanup(self) -> None:
        """Removes a non-chief worker's temporary folder."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
