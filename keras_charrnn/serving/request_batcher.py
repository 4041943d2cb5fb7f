"""Request batching: concurrent calls merged along the batch axis into one model call.

Calls are grouped by (model, version, signature, and every input dimension
but the batch one): only such calls can be stacked. ``num_chars`` and the
prime's length are per-row values, so calls that differ only in them share
batches. A batch is closed when it holds ``max_batch_size`` rows, or when its
oldest call has waited ``batch_timeout_micros`` and no other batch is running
(batches share the CPU: one started beside another only takes cores from it,
and a loaded server would split its callers into many small batches). A batch
holding fewer rows than the group's last batch, or still receiving calls (each
within ``batch_timeout_micros`` of the one before), waits longer for the rest
of the last batch's callers to call again, by at most the time that batch took
to run: running the first few alone would hold the others back that long anyway;
``num_batch_threads`` threads run the closed batches, the next one starting
as soon as a model run ends, while the last batch's callers get their rows.
Ready groups take turns (round robin), so no group waits behind a busy one
for more than its timeout plus one batch run. A call whose caller has gone
(cancelled, or past its deadline) is dropped before its batch runs; the others get their rows. A group's
queue is removed when it empties. A queue holding ``max_enqueued_batches``
full batches refuses more calls with UNAVAILABLE.

The server checks each call on its own before it is queued, so a batch holds
only rows the model accepts, and one bad call cannot fail its neighbours.
Batches are padded to a few sizes (``allowed_batch_sizes``, or powers of two)
so the XLA-compiled sampling loop is compiled for those sizes only, at load
(the server runs each size once when a version loads).

The exported model keys its randomness by each row's (seed, position), so a
row's result does not depend on which other calls share its batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from collections.abc import Callable, Hashable
from typing import Literal

import numpy as np

from keras_charrnn.errors import ConfigError, ServingError
from keras_charrnn.serving import monitoring
from keras_charrnn.serving.memory import release_freed_memory
from keras_charrnn.serving.version_loader import LoadedVersion

log = logging.getLogger("charrnn.serve")


@dataclass(frozen=True)
class BatchingOptions:
    """How calls are batched: TF Serving's ``BatchingParameters``, and the one home of their defaults.

    Args:
        max_batch_size: most rows in one model call.
        batch_timeout_micros: longest a call waits for others to join it.
        num_batch_threads: threads running batches.
        max_enqueued_batches: queue capacity, in full batches, per group.
        allowed_batch_sizes: sizes batches are padded to (empty: powers of two up to ``max_batch_size``).

    Example:

    >>> BatchingOptions(max_batch_size=16).padded_sizes()
    [1, 2, 4, 8, 16]
    """

    max_batch_size: int = 64
    batch_timeout_micros: int = 2000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 16
    allowed_batch_sizes: tuple[int, ...] = ()

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid parameter."""
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ConfigError(f"batch_timeout_micros must be 0 or more, got {self.batch_timeout_micros}")
        self.padded_sizes()

    def padded_sizes(self) -> list[int]:
        """The batch sizes batches are padded to (see ``padded_sizes``)."""
        return padded_sizes(self.max_batch_size, list(self.allowed_batch_sizes) or None)


@dataclass
class _Call:
    inputs: dict[str, np.ndarray]
    rows: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    alive: Callable[[], bool] | None = None  # False once the caller has gone

    def wanted(self) -> bool:
        """Still wanted: not cancelled, and its caller (if it told how to ask) still waits."""
        if self.future.cancelled():
            return False
        try:
            return self.alive is None or bool(self.alive())
        except Exception:  # a broken liveness check must not take the batch down
            return True


def padded_sizes(max_batch_size: int, allowed: list[int] | None = None) -> list[int]:
    """The batch sizes batches are padded to.

    Args:
        max_batch_size: the largest batch.
        allowed: TF Serving's ``allowed_batch_sizes``: increasing, ending at ``max_batch_size``.

    Returns:
        ``allowed`` when given, else the powers of two below ``max_batch_size``, then ``max_batch_size``.

    Raises:
        ConfigError: ``allowed`` does not increase or does not end at ``max_batch_size``.

    Example:

    >>> padded_sizes(12), padded_sizes(8, [2, 8])
    ([1, 2, 4, 8, 12], [2, 8])
    """
    if allowed:
        if any(b <= a for a, b in zip(allowed, allowed[1:])) or allowed[0] < 1 or allowed[-1] != max_batch_size:
            raise ConfigError(
                f"allowed_batch_sizes must increase and end with max_batch_size ({max_batch_size}), got {list(allowed)}"
            )
        return list(allowed)
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


class Batcher:
    """Merges concurrent calls of one signature into batched model calls.

    Args:
        run: executes a batch: ``run(loaded, signature, inputs) -> outputs`` (NumPy dicts), with the
            ``signature`` its calls were submitted with (the server's: ``signature_runner.run_batch``).
        options: the batching parameters (defaults: ``BatchingOptions()``).

    Raises:
        ConfigError: an invalid batching parameter.
    """

    def __init__(self, run, options: BatchingOptions | None = None):
        options = options or BatchingOptions()
        options.validate()
        self.options = options
        self.allowed_batch_sizes = options.padded_sizes()
        self._run = run
        self.max_batch_size = options.max_batch_size
        self.timeout = options.batch_timeout_micros / 1e6
        self.max_rows_queued = options.max_enqueued_batches * options.max_batch_size
        self.batch_rows_run: Counter[int] = Counter()  # rows of each batch run (before padding) -> how many
        self._shapes_run: set[tuple] = set()  # (version, signature, padded size) run at least once
        # (version, signature) -> its last batch: rows, seconds its run took, when the run ended (monotonic)
        self._last_batch: dict[tuple, tuple[int, float, float]] = {}
        self._queues: dict[tuple, deque[_Call]] = {}
        self._targets: dict[tuple, tuple[LoadedVersion, Hashable]] = {}
        self._cond = threading.Condition()
        self._running = 0  # batches taken whose model run has not ended
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self,
        loaded: LoadedVersion,
        signature: Hashable,
        inputs: dict[str, np.ndarray],
        alive: Callable[[], bool] | None = None,
    ) -> Future:
        """Queues one call.

        Args:
            loaded: the model version to run on.
            signature: the signature: its name, or anything hashable that stands for it (the server's
                ``SignatureCall``); calls of equal signatures share batches.
            inputs: the call's tensors; all share the first (batch) dimension.
            alive: tells whether the caller still waits (e.g. ``grpc.ServicerContext.is_active``);
                a call whose caller has gone, or whose future was cancelled, is dropped before its batch runs.

        Returns:
            A future that resolves to the call's own rows of the outputs.

        Raises:
            ServingError: INVALID_ARGUMENT for inputs that cannot be batched, UNAVAILABLE when the queue is full.
        """
        rows = {v.shape[0] if v.ndim else -1 for v in inputs.values()}
        if len(rows) != 1 or -1 in rows:
            raise ServingError("INVALID_ARGUMENT", "all inputs must have the same batch size (first dimension)")
        (n,) = rows
        if n > self.max_batch_size:
            raise ServingError("INVALID_ARGUMENT", f"batch of {n} rows exceeds max_batch_size {self.max_batch_size}")
        shape_key = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items()))
        key = (loaded.name, loaded.version, id(loaded), signature, shape_key)
        call = _Call(inputs, n, alive=alive)
        with self._cond:
            if self._closed:
                raise ServingError("UNAVAILABLE", "server is shutting down")
            queue = self._queues.setdefault(key, deque())
            if sum(c.rows for c in queue) + n > self.max_rows_queued:
                raise ServingError("UNAVAILABLE", "the batching queue is full; retry later")
            queue.append(call)
            self._targets[key] = (loaded, signature)
            self._cond.notify()
        return call.future

    def _take(self) -> tuple[tuple[LoadedVersion, Hashable], list[_Call]] | None:
        """Waits for a batch that is full, or whose oldest call has waited long enough while no batch runs.

        The batch threads share the CPU with each other: a batch started beside a running
        one takes cores from it rather than adding any, and on a loaded server such batches
        split the callers into many small batches. So a batch that is not full waits, past
        its timeout, until the batches running now have run (or it fills up); full batches
        start on any free thread. While the last batch's callers are coming back, it waits
        longer (``_ready_at``). Ready groups take turns (round robin: a group that has
        just run goes to the back), and a group held back holds back the groups behind it,
        so a busy group delays another by at most one batch run per group.
        Calls whose callers have gone are dropped here; an emptied group is removed.
        """
        with self._cond:
            while True:
                if self._closed and not any(self._queues.values()):
                    return None
                now = time.monotonic()
                wait: float | None = None
                chosen: tuple | Literal[False] | None = None  # a group's key; False: the ready group waits
                for key, queue in list(self._queues.items()):
                    while queue and not queue[0].wanted():  # gone before its turn: never run it
                        self._drop(queue.popleft())
                    if not queue:
                        self._forget(key)
                        continue
                    if chosen is not None:
                        continue
                    ready_at = self._ready_at(queue, self._targets[key])
                    if self._rows_queued(queue) >= self.max_batch_size or self._closed:
                        chosen = key
                    elif now >= ready_at:
                        if self._running:  # the first ready group in turn waits for the CPU; so do those behind it
                            chosen = False
                        else:
                            chosen = key
                    else:
                        wait = ready_at - now if wait is None else min(wait, ready_at - now)
                if chosen:
                    queue, target = self._queues[chosen], self._targets[chosen]
                    batch, rows = [], 0
                    while queue and rows + queue[0].rows <= self.max_batch_size:
                        call = queue.popleft()
                        if not call.wanted():
                            self._drop(call)
                            continue
                        batch.append(call)
                        rows += call.rows
                    if not queue:
                        self._forget(chosen)
                    else:
                        self._queues[chosen] = self._queues.pop(chosen)  # to the back of the rotation
                    if batch:
                        self._running += 1
                        return target, batch
                    continue
                # Woken by a new call, a batch ending, or the next timeout (held back: a batch ending).
                self._cond.wait(timeout=None if chosen is False else wait)

    def _ready_at(self, queue: deque[_Call], target: tuple[LoadedVersion, Hashable]) -> float:
        """When a group that is not full may close (see the module's docstring).

        Its oldest call's timeout; while it holds fewer rows than the last batch of its
        model version and signature, or calls keep coming, later: by at most the time
        that batch took to run, counted from its timeout or from that batch's end.
        """
        ready_at = queue[0].enqueued + self.timeout
        loaded, signature = target
        last_rows, last_seconds, last_end = self._last_batch.get((id(loaded), signature), (0, 0.0, 0.0))
        held_until = max(ready_at, last_end) + last_seconds
        if self._rows_queued(queue) < last_rows:
            return held_until
        return min(max(ready_at, queue[-1].enqueued + self.timeout), held_until)

    @staticmethod
    def _rows_queued(queue: deque[_Call]) -> int:
        return sum(c.rows for c in queue)

    def _forget(self, key: tuple) -> None:
        """Removes an empty group (its queue and its reference to the model version)."""
        self._queues.pop(key, None)
        self._targets.pop(key, None)

    @staticmethod
    def _drop(call: _Call) -> None:
        """Forgets a call whose caller has gone; its future ends cancelled (or with CANCELLED)."""
        if not call.future.cancel() and not call.future.done():
            call.future.set_exception(ServingError("CANCELLED", "the caller went away before its batch ran"))
        log.debug("dropped a call of %d row(s) whose caller had gone", call.rows)

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            (loaded, signature), batch = taken
            ended = threading.Event()

            # ``ended`` bound as a default: run_ended is called within this iteration (by _run_batch, then below).
            def run_ended(ended: threading.Event = ended) -> None:  # once per batch: batches held back may start
                if not ended.is_set():
                    ended.set()
                    with self._cond:
                        self._running -= 1
                        self._cond.notify_all()

            try:
                self._run_batch(loaded, signature, batch, run_ended)
            finally:
                run_ended()

    def _run_batch(self, loaded: LoadedVersion, signature: Hashable, batch: list[_Call], run_ended) -> None:
        """Runs one taken batch; every caller gets its rows, or the batch's error.

        ``run_ended`` is called once the model has run, before the callers get their rows,
        so the next batch runs while this one's answers go out.
        """
        # From here a call can no longer be cancelled; one cancelled just now is left out.
        batch = [c for c in batch if c.future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            rows = sum(c.rows for c in batch)
            size = next(b for b in self.allowed_batch_sizes if b >= rows)
            # Pad with copies of the last row up to an allowed size: the model is compiled
            # (XLA) once per batch size, so a few sizes keep compilation off the hot path.
            merged = {
                k: np.concatenate([c.inputs[k] for c in batch] + [batch[-1].inputs[k][-1:]] * (size - rows))
                for k in batch[0].inputs
            }
            started = time.monotonic()
            monitoring.record_batch([c.rows for c in batch], [started - c.enqueued for c in batch], size)
            try:
                outputs = self._run(loaded, signature, merged)
                with self._cond:  # before run_ended wakes the batches held back: they read it
                    self.batch_rows_run[rows] += 1
                    first = (id(loaded), signature, size) not in self._shapes_run
                    self._shapes_run.add((id(loaded), signature, size))
                    if len(self._last_batch) > 256:  # versions come and go: forget those long unloaded
                        self._last_batch.clear()
                    finished = time.monotonic()
                    self._last_batch[(id(loaded), signature)] = (rows, finished - started, finished)
            finally:
                run_ended()
            if first:  # a new batch size was compiled (XLA): the compiler's freed heap goes back to the system
                release_freed_memory()
            log.debug(
                "ran a batch of %d rows from %d calls (padded to %d) on %s version %d %s",
                rows,
                len(batch),
                size,
                loaded.name,
                loaded.version,
                signature,
            )
            start = 0
            for call in batch:
                if not call.future.done():
                    call.future.set_result({k: v[start : start + call.rows] for k, v in outputs.items()})
                start += call.rows
        except BaseException as exc:  # every caller of the batch gets the error
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)

    def close(self) -> None:
        """Runs what is queued, then stops the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)
