"""Training under a time budget: measure this machine, pick the model that fits the time, stop on time.

``charrnn train CORPUS --out RUN --time-budget 10m`` (or ``train(..., TrainConfig(time_budget=600))``,
or ``plan_budget`` then ``train``) does, with the clock started when it is called:

1. **Probe** (counted in the budget): a few timed training steps of the candidate sizes ``CANDIDATES``
   of the run's cell, smallest first, at ``PROBE_BATCH_SIZE`` x ``SEQ_LEN``, until a size fails the
   rule or ``PROBE_FRACTION`` of the budget is spent; larger sizes are predicted by parameter ratio.
2. **Rule**: the largest candidate that trains on at least ``CHARS_PER_PARAM`` characters per
   parameter in the time left, with at most ``MAX_PARAMS_PER_TRAIN_CHAR`` parameters per training
   character; else the smallest.
3. **The rest**: ``seq_len``, the longest of ``SEQ_LENS`` giving ``MIN_STEPS`` optimizer steps;
   ``batch_size`` ``PROBE_BATCH_SIZE`` (or ``BATCH_SIZE`` for a run of fewer than
   ``MIN_STEPS_FOR_BATCH_64`` steps, halved for a short corpus); ``dropout`` 0 under
   ``MIN_PASSES_FOR_DROPOUT`` passes; a cosine schedule over the predicted batches, and ``epochs``
   covering ``EPOCHS_HEADROOM`` times them.
4. **Stop on time**: ``BudgetStop`` ends training after the batch past which the next batch and the
   end-of-epoch work (validation, checkpoints) would overrun the deadline.

A budget leaving less than ``MIN_TRAIN_FRACTION`` of itself for training is refused after the probe
(``ConfigError``). Flags given are kept: only the unspecified fields among ``CHOSEN`` are chosen. The
choice and its reasons go to ``config.json`` (``budget``), what happened to its ``outcome``. Resuming a
budget run continues its chosen settings up to its planned epochs, with no clock.

Why these rules and numbers, with the measurements behind them: BENCHMARKS.md, "How the time-budget
rules were chosen".
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable
from typing import Any

import keras
import numpy as np

from keras_charrnn.cell_types import cell_spec
from keras_charrnn.config import TrainConfig
from keras_charrnn.corpus import load_corpus
from keras_charrnn.errors import ConfigError
from keras_charrnn.model import compile_model, make_optimizer, model_from_config
from keras_charrnn.run_folder import RunFolder
from keras_charrnn.tbptt import TBPTTBatches, split_train_val

__all__ = ["CANDIDATES", "CHARS_PER_PARAM", "BudgetStop", "count_params", "plan", "plan_budget", "probe"]

CANDIDATES: tuple[tuple[int, int], ...] = ((1, 128), (2, 128), (2, 256), (2, 384), (2, 512))  # (layers, units)
CHARS_PER_PARAM = 10.0  # the least characters trained on per parameter (see the module doc)
MAX_PARAMS_PER_TRAIN_CHAR = 2.0  # the most parameters per character of training text
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
SEQ_LEN: int = _DEFAULTS["seq_len"]  # the shape a budget starts from: TrainConfig's defaults
BATCH_SIZE: int = _DEFAULTS["batch_size"]
MIN_STEPS_FOR_BATCH_64 = 1000  # fewer optimizer steps than this at 64: batch 32 (see the module doc)
SEQ_LENS = (100, 50, 25)  # a budget run's seq_len: the longest giving MIN_STEPS steps, else the shortest
MIN_STEPS = 5000  # optimizer steps a short run is given by cutting its sequences (see the module doc)
PROBE_BATCH_SIZE = 64  # candidates are probed at this batch (see the module doc)
MIN_PASSES_FOR_DROPOUT = 20.0
MIN_TRAIN_FRACTION = 0.25  # a budget leaving less than this for training batches is refused
# Epochs cover 1.5x the predicted batches: a machine faster than predicted still trains to the end.
EPOCHS_HEADROOM = 1.5
PROBE_FRACTION = 0.05  # of the budget, at most, for probing beyond the first (smallest) candidate
PROBE_STEPS = 3  # timed steps per candidate after the first (tracing) step
PROBE_MIN_SECONDS = 0.3  # and at least this long (up to 20 steps)
SAVE_SECONDS = 1.0  # estimate of writing best.keras, state.npz and the curves at an epoch end
CHOSEN = ("layers", "units", "batch_size", "seq_len", "epochs", "dropout", "schedule_steps")


def count_params(cell: str, layers: int, units: int, embedding_dim: int, vocab_size: int) -> int:
    """Trainable parameters of a ``model.build_model`` model (embedding, recurrent layers, output layer).

    Args:
        cell: a cell type of ``cell_types.CELLS``.
        layers: recurrent layers.
        units: units per layer.
        embedding_dim: the embedding's size.
        vocab_size: ids in the vocabulary.

    Returns:
        The parameter count (each layer's as ``CellSpec.params`` counts it).

    Example:

    >>> count_params("lstm", 2, 256, 64, 66)
    875202
    """
    spec = cell_spec(cell)
    total = vocab_size * embedding_dim + units * vocab_size + vocab_size
    return total + sum(spec.params(embedding_dim if i == 0 else units, units) for i in range(layers))


def _now() -> float:
    return time.perf_counter()


def _batch_shape(train_chars: int, val_chars: int, batch_size: int, seq_len: int) -> tuple[int, int]:
    """The batch shape, halved (batch first, down to 4; then seq_len, down to 25) until the training part gives
    4 batches and the validation part one."""

    def fits(b: int, s: int) -> bool:
        return train_chars > 4 * b * s and (val_chars == 0 or val_chars > b * s)

    while not fits(batch_size, seq_len) and batch_size > 4:
        batch_size //= 2
    while not fits(batch_size, seq_len) and seq_len > 25:
        seq_len //= 2
    return batch_size, seq_len


def _measure(config: TrainConfig, vocab_size: int, train_ids: np.ndarray, step_seconds: float) -> dict:
    """Times training steps of ``config``'s model on the corpus: the first (tracing) step, then the steady ones."""

    keras.utils.set_random_seed(config.seed)
    model = compile_model(model_from_config(config, vocab_size), make_optimizer(config, 1000))
    batches = TBPTTBatches(train_ids, config.batch_size, config.seq_len, name="corpus (probe)")
    start = _now()
    model.train_on_batch(*batches[0])
    first = _now() - start
    steps, start = 0, _now()
    while steps < PROBE_STEPS or (_now() - start < step_seconds and steps < 20):
        model.train_on_batch(*batches[(steps + 1) % len(batches)])
        steps += 1
    per_step = (_now() - start) / steps
    params = int(model.count_params())
    del model
    return {
        "layers": config.layers,
        "units": config.units,
        "params": params,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "first_step_s": round(first, 3),
        "step_s": round(per_step, 4),
        "steps_timed": steps,
        "chars_per_s": round(config.batch_size * config.seq_len / per_step, 1),
        "measured": True,
    }


def _candidates(config: TrainConfig, fixed: set[str]) -> list[tuple[int, int]]:
    """The (layers, units) to consider, smallest first, keeping a given layers and/or units."""
    if {"layers", "units"} <= fixed:
        return [(config.layers, config.units)]
    if "units" in fixed:
        return [(layers, config.units) for layers in sorted({lay for lay, _ in CANDIDATES})]
    if "layers" in fixed:
        return [(config.layers, units) for units in sorted({u for _, u in CANDIDATES})]
    return list(CANDIDATES)


def _train_seconds(budget: float, spent: float, first_step: float, end_cost: float) -> float:
    """Seconds left for training batches: the budget less what is spent, one tracing step and the final epoch end."""
    return max(budget - spent - first_step - end_cost, 0.0)


def _end_cost(first_step: float, chars_per_s: float, val_chars: int, sample_chars: int) -> float:
    """Estimated seconds of the first epoch end: tracing and running validation (forward only, about 3x
    the training speed), saving, and sampling (tracing the sampling module: about one tracing step).

    Measured on the test corpus (2 loaded cores): first step 2.5 s, estimate 5.8 s, first epoch end 4.5 s."""
    cost = 0.7 * first_step + val_chars / (3.0 * chars_per_s) + SAVE_SECONDS
    if sample_chars:
        cost += first_step + 0.5
    return cost


def _judge(size: dict, budget: float, spent: float, train_chars: int, val_chars: int, config: TrainConfig) -> dict:
    """A candidate's figures under the rule: characters it can train on, per parameter, passes, and whether it fits."""
    end = _end_cost(size["first_step_s"], size["chars_per_s"], val_chars, config.sample_chars)
    seconds = _train_seconds(budget, spent, size["first_step_s"], end)
    chars = size["chars_per_s"] * seconds
    per_param = chars / size["params"]
    fits_time = per_param >= CHARS_PER_PARAM
    fits_data = size["params"] <= MAX_PARAMS_PER_TRAIN_CHAR * train_chars
    why = (
        "fits"
        if fits_time and fits_data
        else f"too few characters per parameter ({per_param:.1f} < {CHARS_PER_PARAM:g})"
        if not fits_time
        else f"too many parameters for the text ({size['params'] / train_chars:.2f} > "
        f"{MAX_PARAMS_PER_TRAIN_CHAR:g} per training character)"
    )
    return {
        **size,
        "train_seconds": round(seconds, 1),
        "end_seconds": round(end, 2),
        "chars": int(chars),
        "chars_per_param": round(per_param, 2),
        "passes": round(chars / train_chars, 2),
        "fits": fits_time and fits_data,
        "why": why,
    }


def probe(
    config: TrainConfig,
    vocab_size: int,
    train_ids: np.ndarray,
    val_chars: int,
    budget: float,
    started: float,
    fixed: set[str],
) -> list[dict]:
    """Measures the candidate sizes (smallest first) and judges each by the rule.

    Args:
        config: the run's config (its cell, embedding, batch shape, seed, ``sample_chars``).
        vocab_size: the vocabulary's size.
        train_ids: the training part of the encoded corpus.
        val_chars: characters held out for validation.
        budget: the time budget in seconds.
        started: ``time.perf_counter()`` when the budget's clock started.
        fixed: fields the user gave (their values are kept).

    Returns:
        One dict per candidate: its probe figures (``chars_per_s``, ``first_step_s``, ``measured``) and
        its judgement (``chars``, ``chars_per_param``, ``passes``, ``fits``, ``why``).
    """
    results: list[dict] = []
    probe_until = _now() + PROBE_FRACTION * budget
    for layers, units in _candidates(config, fixed):
        params = count_params(config.cell, layers, units, config.embedding_dim, vocab_size)
        if results and (not results[-1]["fits"] or _now() > probe_until):
            last = next(r for r in reversed(results) if r["measured"])  # predicted from the largest one measured
            scale = params / last["params"]
            size = {
                "layers": layers,
                "units": units,
                "params": params,
                "batch_size": last["batch_size"],
                "seq_len": last["seq_len"],
                "first_step_s": last["first_step_s"],
                "step_s": round(last["step_s"] * scale, 4),
                "steps_timed": 0,
                "chars_per_s": round(last["chars_per_s"] / scale, 1),
                "measured": False,
            }
        else:
            size = _measure(
                dataclasses.replace(config, layers=layers, units=units), vocab_size, train_ids, PROBE_MIN_SECONDS
            )
        results.append(_judge(size, budget, _now() - started, len(train_ids), val_chars, config))
    return results


def _seq_len_for_steps(chars: float, batch: int, longest: int) -> int:
    """The longest of ``SEQ_LENS`` (at most ``longest``) that gives ``MIN_STEPS`` optimizer steps over ``chars``
    characters in batches of ``batch`` rows, else the shortest (see the module doc)."""
    allowed = [s for s in SEQ_LENS if s <= longest] or [longest]
    return next((s for s in allowed if chars / (batch * s) >= MIN_STEPS), allowed[-1])


def plan(config: TrainConfig, results: list[dict], train_chars: int, fixed: set[str]) -> tuple[dict, dict]:
    """The fields the rule chooses, from the judged candidates.

    Args:
        config: the run's config.
        results: ``probe``'s figures.
        train_chars: characters of the training part.
        fixed: fields the user gave (kept).

    Returns:
        ``(choice, pick)``: the chosen field values (only fields not in ``fixed``, plus ``schedule_steps``)
        and the candidate picked.
    """
    fitting = [r for r in results if r["fits"]]
    pick = fitting[-1] if fitting else results[0]
    batch, seq_len = pick["batch_size"], pick["seq_len"]
    if "seq_len" not in fixed:
        seq_len = _seq_len_for_steps(pick["chars"], batch, seq_len)
    steps = pick["chars"] / (batch * seq_len)
    steps_per_epoch = max((train_chars - 1) // (batch * seq_len), 1)
    epochs = max(1, math.ceil(EPOCHS_HEADROOM * steps / steps_per_epoch))
    if "epochs" in fixed:
        epochs = config.epochs
        steps = min(steps, epochs * steps_per_epoch)
    choice: dict[str, Any] = {
        "layers": pick["layers"],
        "units": pick["units"],
        "batch_size": batch,
        "seq_len": seq_len,
        "epochs": epochs,
        "dropout": 0.0 if pick["passes"] < MIN_PASSES_FOR_DROPOUT else config.dropout,
        "schedule_steps": max(1, int(steps)),
    }
    return {k: v for k, v in choice.items() if k not in fixed or k == "schedule_steps"}, pick


class BudgetStop(keras.callbacks.Callback):
    """Stops training in time for the last epoch end (validation, best model, checkpoint) to finish by a deadline.

    After each batch it stops training if another batch plus the end-of-epoch work would pass the
    deadline. The end-of-epoch work is ``end_seconds`` until an epoch end has been measured (the time
    from an epoch's last batch to the next epoch's start), then the latest measured one x1.25 + 0.5 s.
    It writes ``record`` as config.json's ``budget`` section when training starts, with an ``outcome``
    added when it ends.

    Args:
        deadline: ``time.perf_counter()`` value by which training must be over.
        end_seconds: estimate of the first epoch end's seconds.
        run: the run folder (None: no record written).
        record: the ``budget`` section.
        started: ``time.perf_counter()`` when the budget's clock started.
    """

    def __init__(
        self,
        deadline: float,
        end_seconds: float,
        run: RunFolder | None = None,
        record: dict | None = None,
        started: float | None = None,
    ):
        super().__init__()
        self.deadline, self.end_seconds = deadline, end_seconds
        self.run, self.record = run, dict(record or {})
        self.started = _now() if started is None else started
        self.stopped_early = False
        self.batches = 0
        self.end_measured: list[float] = []  # seconds of each epoch end measured (validation, saves, samples)
        self._batch_s: float | None = None
        self._last: float | None = None
        self._epoch_ended = False

    def _write(self) -> None:
        if self.run is not None and self.run.config_path.is_file():
            self.run.update_record(budget=self.record)

    def on_train_begin(self, logs=None):
        self._write()
        self._last = None

    def on_epoch_begin(self, epoch, logs=None):
        now = _now()
        if self._epoch_ended and self._last is not None:
            self.end_measured.append(round(now - self._last, 2))
            self.end_seconds = 1.25 * (now - self._last) + 0.5
        self._epoch_ended = False
        self._last = now

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_ended = True

    def on_train_batch_end(self, batch, logs=None):
        now = _now()
        if self._last is not None and self.batches:  # the first batch traces: not a step time
            step = now - self._last
            self._batch_s = step if self._batch_s is None else 0.8 * self._batch_s + 0.2 * step
        self._last = now
        self.batches += 1
        if now + (self._batch_s or 0.0) + self.end_seconds >= self.deadline:
            self.stopped_early = True
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.record["outcome"] = {
            "stopped_by": "time budget" if self.stopped_early else "epochs done",
            "batches": self.batches,
            "seconds_at_train_end": round(_now() - self.started, 1),
            "first_epoch_end_estimate_s": round(self.record.get("picked", {}).get("end_seconds", 0.0), 2),
            "epoch_ends_measured_s": self.end_measured[:20],
            "last_epoch_end_estimate_s": round(self.end_seconds, 2),
        }
        self._write()
        print(
            f"time budget: {self.record['outcome']['stopped_by']} after {self.batches} batches, "
            f"{_now() - self.started:.1f}s of {self.deadline - self.started:g}s",
            flush=True,
        )


RULE = (
    f"largest candidate with chars >= {CHARS_PER_PARAM:g} x params and params <= "
    f"{MAX_PARAMS_PER_TRAIN_CHAR:g} x training chars (else the smallest); chars = probe chars/s x seconds "
    f"left for batches; seq_len the longest of {', '.join(map(str, SEQ_LENS))} giving >= {MIN_STEPS} steps, "
    f"else {SEQ_LENS[-1]}; probed at batch {PROBE_BATCH_SIZE}, kept if >= {MIN_STEPS_FOR_BATCH_64} steps, "
    f"else {BATCH_SIZE}; dropout 0 below "
    f"{MIN_PASSES_FOR_DROPOUT:g} passes; cosine over the predicted batches; epochs = "
    f"{EPOCHS_HEADROOM:g} x predicted passes, rounded up; stopped by the clock"
)


def _fixed_from_defaults(config: TrainConfig) -> set[str]:
    default = TrainConfig()
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(default, f.name)}


def plan_budget(
    corpus: str | os.PathLike,
    run_dir: str | os.PathLike,
    config: TrainConfig,
    fixed: Iterable[str] | None = None,
    strict: bool = False,
) -> tuple[TrainConfig, BudgetStop]:
    """Plans a run of ``config.time_budget`` seconds: probes this machine, picks the model size and schedule.

    The clock starts here; ``train.train`` runs the plan (it calls this when given a ``time_budget``).

    Args:
        corpus: a file, a folder or a glob pattern (see ``train.train``).
        run_dir: the new run's folder.
        config: the run's config; ``time_budget`` (seconds) is required.
        fixed: fields the user gave, whose values are kept (default: the fields that differ from
            ``TrainConfig()``'s defaults).
        strict: refuse a corpus file that is not UTF-8.

    Returns:
        The config to train with (``schedule_steps`` set) and the callback that stops training on
        time and writes the ``budget`` section of ``config.json``.

    Raises:
        ConfigError: no or a bad ``time_budget``, a budget too short for the corpus (the message says how
            long it should be), or ``run_dir`` already holds a run.
        InputError: the corpus is missing, unreadable or too short, or ``run_dir`` cannot be written.

    Example:

    >>> config, stop = plan_budget("input.txt", "runs/quick", TrainConfig(time_budget=600))  # doctest: +SKIP
    >>> train("input.txt", "runs/quick", config, callbacks=[stop])  # doctest: +SKIP
    """
    started = _now()
    if config.time_budget is None:
        raise ConfigError("time_budget is required to train within a budget")
    config.validate()
    fixed = set(_fixed_from_defaults(config) if fixed is None else fixed) - {"time_budget"}
    run = RunFolder(run_dir)
    run.check_new_run()
    budget = float(config.time_budget)
    data = load_corpus(corpus, strict=strict)
    train_ids, val_ids = split_train_val(data.ids, config.val_frac)
    batch, seq_len = _batch_shape(
        len(train_ids),
        len(val_ids),
        config.batch_size if "batch_size" in fixed else PROBE_BATCH_SIZE,
        config.seq_len if "seq_len" in fixed else SEQ_LEN,
    )
    batch = config.batch_size if "batch_size" in fixed else batch  # a given shape is kept (TBPTT says if too long)
    seq_len = config.seq_len if "seq_len" in fixed else seq_len
    shaped = dataclasses.replace(config, batch_size=batch, seq_len=seq_len, schedule_steps=None)
    results = probe(shaped, data.vocab.size, train_ids, len(val_ids), budget, started, fixed)
    choice, pick = plan(shaped, results, len(train_ids), fixed)
    if (
        "batch_size" not in fixed
        and batch > BATCH_SIZE
        and pick["chars"] / (batch * choice.get("seq_len", seq_len)) < MIN_STEPS_FOR_BATCH_64
    ):
        small = _batch_shape(len(train_ids), len(val_ids), BATCH_SIZE, seq_len)[0]
        again = _measure(
            dataclasses.replace(shaped, layers=pick["layers"], units=pick["units"], batch_size=small),
            data.vocab.size,
            train_ids,
            PROBE_MIN_SECONDS,
        )
        remeasured = _judge(again, budget, _now() - started, len(train_ids), len(val_ids), shaped)
        remeasured["why"] = (
            f"under {MIN_STEPS_FOR_BATCH_64} steps at batch {batch}: the pick measured again at "
            f"batch {small}: {remeasured['why']}"
        )
        results.append(remeasured)
        choice, pick = plan(shaped, [remeasured], len(train_ids), fixed)
    if pick["train_seconds"] < MIN_TRAIN_FRACTION * budget:
        need = (_now() - started + pick["first_step_s"] + pick["end_seconds"]) / (1 - MIN_TRAIN_FRACTION)
        raise ConfigError(
            f"time_budget {budget:g}s is too short for this corpus on this machine: reading it, the "
            f"probe, building and validating {len(val_ids):,} held-out characters take about "
            f"{budget - pick['train_seconds']:.0f}s; give at least {math.ceil(need / 10) * 10:g}s "
            f"(or a smaller val_frac)"
        )
    chosen = dataclasses.replace(shaped, **choice)
    chosen.validate()
    probe_seconds = _now() - started
    record = {
        "seconds": budget,
        "rule": RULE,
        "numbers": {
            "chars_per_param": CHARS_PER_PARAM,
            "max_params_per_train_char": MAX_PARAMS_PER_TRAIN_CHAR,
            "min_steps_for_batch_64": MIN_STEPS_FOR_BATCH_64,
            "probe_batch_size": PROBE_BATCH_SIZE,
            "seq_lens": list(SEQ_LENS),
            "min_steps": MIN_STEPS,
            "min_passes_for_dropout": MIN_PASSES_FOR_DROPOUT,
        },
        "given": sorted(fixed & set(CHOSEN) | fixed & {"cell", "lr", "lr_schedule"}),
        "chosen": {k: getattr(chosen, k) for k in CHOSEN},
        "train_chars": int(len(train_ids)),
        "val_chars": int(len(val_ids)),
        "probe_seconds": round(probe_seconds, 2),
        "candidates": results,
        "picked": {
            k: pick[k]
            for k in (
                "layers",
                "units",
                "params",
                "chars_per_s",
                "chars",
                "chars_per_param",
                "passes",
                "end_seconds",
                "why",
            )
        },
        "predicted_batches": chosen.schedule_steps,
    }
    print(
        f"time budget {budget:g}s: probed in {probe_seconds:.1f}s; chose {chosen.cell} {chosen.layers}x"
        f"{chosen.units} ({pick['params']:,} parameters), batch {chosen.batch_size} x seq_len {chosen.seq_len}, "
        f"{chosen.epochs} epochs, dropout {chosen.dropout:g}, cosine over {chosen.schedule_steps} batches "
        f"(~{pick['chars_per_s']:,.0f} chars/s, {pick['chars_per_param']:.1f} chars per parameter)",
        flush=True,
    )
    return chosen, BudgetStop(started + budget, pick["end_seconds"], run, record, started)
