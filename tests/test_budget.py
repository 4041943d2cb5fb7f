"""Training under a time budget: the duration parser, the rule, a run that stops on time and says why, CLI errors."""

import dataclasses
import json
import time

import pytest

from conftest import in_background, make_corpus, run_cli
from keras_charrnn.budget import CHARS_PER_PARAM, MIN_STEPS, _judge, count_params, plan
from keras_charrnn.config import TrainConfig, parse_duration
from keras_charrnn.errors import ConfigError


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), ("600", 600.0), (" 2M ", 120.0), ("1d", 86400.0), (45, 45.0)],
)
def test_durations_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "-5m", "0", "5x", "1.5.2h", "m"])
def test_bad_durations_are_refused_naming_time_budget(text):
    with pytest.raises(ConfigError, match="time_budget"):
        parse_duration(text)


def test_a_budget_too_short_for_a_probe_is_refused():
    with pytest.raises(ConfigError, match="time_budget must be between 10 seconds"):
        TrainConfig(time_budget=5).validate()


def _size(layers, units, chars_per_s):
    return {
        "layers": layers,
        "units": units,
        "params": count_params("lstm", layers, units, 64, 66),
        "batch_size": 32,
        "seq_len": 100,
        "first_step_s": 1.0,
        "step_s": 3200 / chars_per_s,
        "chars_per_s": chars_per_s,
        "measured": True,
    }


def test_the_rule_picks_the_largest_model_that_sees_enough_characters_per_parameter():
    # tinyshakespeare-like: 1M training characters, 10 minutes, the speeds on a 2-core CPU.
    config, train_chars = TrainConfig(), 1_000_000
    sizes = [
        _size(1, 128, 60_000),
        _size(2, 128, 40_000),
        _size(2, 256, 22_000),
        _size(2, 384, 13_000),
        _size(2, 512, 7_500),
    ]
    judged = [_judge(s, 600.0, 10.0, train_chars, 100_000, config) for s in sizes]
    assert [j["fits"] for j in judged] == [True, True, True, False, False]
    choice, pick = plan(config, judged, train_chars, fixed=set())
    assert (choice["layers"], choice["units"]) == (2, 256)
    assert pick["chars_per_param"] >= CHARS_PER_PARAM
    assert choice["seq_len"] == 50  # 4,000 steps at 100, 8,000 at 50: see the next test
    assert choice["schedule_steps"] == int(pick["chars"] / (32 * 50))
    assert choice["epochs"] >= pick["passes"]  # the clock, not the epochs, ends the run
    # A short budget picks the smallest, and a given width is kept.
    short = [_judge(s, 30.0, 5.0, train_chars, 100_000, config) for s in sizes]
    assert plan(config, short, train_chars, set())[0]["units"] == 128
    assert "units" not in plan(config, short, train_chars, {"units"})[0]


@pytest.mark.parametrize("budget_s, seq_len", [(60.0, 25), (600.0, 50), (3600.0, 100)])
def test_a_short_run_trains_shorter_sequences_for_more_optimizer_steps(budget_s, seq_len):
    # Step-limited: the longest of 100, 50, 25 that gives MIN_STEPS steps (the same characters either way).
    config, train_chars = TrainConfig(), 1_000_000
    judged = [_judge(_size(2, 256, 22_000), budget_s, 10.0, train_chars, 100_000, config)]
    choice, pick = plan(config, judged, train_chars, fixed=set())
    assert choice["seq_len"] == seq_len
    assert choice["schedule_steps"] == int(pick["chars"] / (32 * seq_len))
    assert seq_len == 25 or choice["schedule_steps"] >= MIN_STEPS
    # A seq_len the user gave is kept, and the schedule counts its steps.
    given = dataclasses.replace(config, seq_len=100)
    choice, pick = plan(given, judged, train_chars, fixed={"seq_len"})
    assert "seq_len" not in choice and choice["schedule_steps"] == int(pick["chars"] / 3200)


@pytest.mark.parametrize("budget_s, batch", [(600.0, 64), (30.0, 32)])
def test_sizes_are_probed_at_batch_64_and_a_run_of_few_steps_falls_back_to_32(tmp_path, monkeypatch, budget_s, batch):
    from keras_charrnn import budget

    measured = []

    def fake_measure(config, vocab_size, train_ids, step_seconds):  # 64 rows train 1.5x faster per char than 32
        measured.append((config.units, config.batch_size))
        chars_per_s = 4e9 / count_params("lstm", config.layers, config.units, 64, vocab_size)
        chars_per_s *= 1.0 if config.batch_size == 64 else 1 / 1.5
        return {
            "layers": config.layers,
            "units": config.units,
            "batch_size": config.batch_size,
            "params": count_params("lstm", config.layers, config.units, 64, vocab_size),
            "seq_len": config.seq_len,
            "first_step_s": 0.5,
            "step_s": config.batch_size * config.seq_len / chars_per_s,
            "steps_timed": 3,
            "chars_per_s": chars_per_s,
            "measured": True,
        }

    monkeypatch.setattr(budget, "_measure", fake_measure)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(400_000), encoding="utf-8")
    config, _ = budget.plan_budget(corpus, tmp_path / "run", TrainConfig(time_budget=budget_s))
    assert {b for _, b in measured[:-1]} == {64}  # every candidate judged at the batch the run would use
    assert config.batch_size == batch
    if batch == 32:  # under MIN_STEPS_FOR_BATCH_64 steps at 64: the pick is measured again at 32 and planned with it
        assert measured[-1] == (config.units, 32)


@pytest.fixture(scope="module")
def cli_budget_run(tmp_path_factory):
    """``charrnn train --time-budget 30s --layers 1 --units 48`` started in the background; yields
    ``(run folder, Future of its CompletedProcess)``.

    A budget run takes its budget whatever else the machine does, so the CLI's run goes on beside the
    in-process one (which asks for this fixture first) instead of after it. 30 s: beside that run and the other
    pytest-xdist worker's tests, reading the corpus, the probe and the first steps took 16 s on a loaded machine,
    and a 20 s budget, which must leave a quarter of itself for training, was refused.
    """
    tmp = tmp_path_factory.mktemp("cli_budget")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus(3000), encoding="utf-8")
    with in_background(
        lambda: run_cli(
            "train", corpus, "--out", tmp / "run", "--time-budget", "30s", "--layers", "1", "--units", "48", "--quiet"
        )
    ) as result:
        yield tmp / "run", result


@pytest.mark.slow
def test_a_budget_run_stops_on_time_records_its_choice_and_keeps_the_best_model(tmp_path, cli_budget_run):
    from keras_charrnn.run_folder import RunFolder
    from keras_charrnn.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(8000), encoding="utf-8")
    budget = 40.0  # room for the probe on a machine busy with the other worker: 25 s was refused as too short once
    start = time.perf_counter()
    train(corpus, tmp_path / "run", TrainConfig(time_budget=budget, sample_chars=40), verbose=0)
    elapsed = time.perf_counter() - start
    assert 0.75 * budget <= elapsed <= 1.1 * budget, elapsed

    run = RunFolder(tmp_path / "run")
    record = run.record()
    chosen, saved = record["budget"]["chosen"], record["config"]
    assert record["budget"]["seconds"] == budget and saved["time_budget"] == budget
    assert {k: saved[k] for k in chosen} == chosen  # what it chose is what it trained
    probed = [c for c in record["budget"]["candidates"] if c["measured"]]
    assert probed and all(c["chars_per_s"] > 0 and c["params"] > 0 for c in probed)
    assert "chars" in record["budget"]["rule"] and record["budget"]["probe_seconds"] < budget
    assert record["budget"]["outcome"]["batches"] > 0
    assert record["best_val_loss"] is not None
    model = run.load_model("best")
    assert model.count_params() == record["budget"]["picked"]["params"]


@pytest.mark.slow
def test_cli_budget_keeps_the_model_flags_given(cli_budget_run):
    run, result = cli_budget_run
    result = result.result()
    assert result.returncode == 0, result.stderr
    record = json.loads((run / "config.json").read_text())
    assert (record["config"]["layers"], record["config"]["units"]) == (1, 48)
    assert {"layers", "units"} <= set(record["budget"]["given"])
    assert "time budget" in result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--time-budget", "5 minutes"], "time_budget must be a duration"),
        (["--time-budget", "3s"], "time_budget must be between"),
    ],
)
@pytest.mark.slow
def test_cli_refuses_a_bad_budget_in_one_line(tmp_path, flags, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(200), encoding="utf-8")
    result = run_cli("train", corpus, "--out", tmp_path / "run", *flags)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.slow
def test_a_budget_too_short_for_the_corpus_is_refused_saying_how_long_it_should_be(tmp_path, monkeypatch):
    from keras_charrnn import budget
    from keras_charrnn.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(2000), encoding="utf-8")
    monkeypatch.setattr(budget, "MIN_TRAIN_FRACTION", 0.99)  # no budget leaves 99% of itself for batches
    with pytest.raises(ConfigError, match=r"^time_budget 20s is too short .* give at least \d+s") as info:
        train(corpus, tmp_path / "run", TrainConfig(time_budget=20), verbose=0)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "state.npz").exists()
