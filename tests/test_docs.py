"""The documented snippets run as written and print what the package computes; the README's CLI examples parse."""

import ast
import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, side_by_side

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "savedmodels.md"
BUNDLED = ROOT / "saved_models" / "shakespeare"


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _sections(path: Path, language: str) -> dict[str, str]:
    """The one ``language`` block under each ``## heading`` that has one."""
    sections = {}
    for part in re.split(r"^## ", path.read_text(), flags=re.M)[1:]:
        heading, _, body = part.partition("\n")
        blocks = _blocks(body, language)
        assert len(blocks) <= 1, f"{heading}: one {language} block per section"
        if blocks:
            sections[heading.strip()] = blocks[0]
    return sections


@pytest.fixture(scope="module")
def bundled():
    from keras_charrnn.inprocess import load

    return load(BUNDLED)


SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")


@pytest.fixture(scope="module")
def snippet_runs() -> dict:
    """Every python snippet of the SavedModel doc and its saved_model_cli commands (when installed), each run
    in its own process, side by side, once: heading (or "saved_model_cli") -> CompletedProcess."""
    calls = {
        heading: functools.partial(
            subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        for heading, code in _sections(DOC, "python").items()
    }
    if SAVED_MODEL_CLI.exists():
        script = _sections(DOC, "bash")["With saved_model_cli"].replace("saved_model_cli", str(SAVED_MODEL_CLI))
        calls["saved_model_cli"] = functools.partial(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
    return dict(zip(calls, side_by_side(*calls.values())))


def _stdout(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _tensorflow_alone(model) -> str:
    whole = model.generate("ROMEO:", 200, temperature=0.8, seed=1)  # one call == two calls continued
    return "ROMEO:" + whole[:100] + "\n" + whole[100:] + "\n"


def _keras_layer(model) -> str:
    return f"(1, 3, {model.vocab.size})\n"


def _this_package(model, stdout: str) -> None:
    from keras_charrnn.sampling import SamplingParams

    session = model.session("JULIET:", SamplingParams(top_k=5, seed=2))
    texts = model.generate("ROMEO:", 100, temperature=0.8, seed=1) + "\n" + session.generate(100) + "\n"
    assert stdout.startswith(texts)
    printed = ast.literal_eval(stdout[len(texts) :])
    expected = model.score("To be, or not to be, that is the question.")
    assert printed.keys() == expected.keys() and printed["chars"] == expected["chars"]
    assert printed["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def _stops_and_scores(model) -> str:
    vocabulary = model.info.vocabulary
    result = model.complete(
        "ROMEO:",
        300,
        logprobs=2,
        seed=1,
        temperature=0.8,
        stop=["\n\n"],
        bias={d: -100 for d in "0123456789" if d in vocabulary},
    )
    top = sorted(result.top_logprobs[0].items(), key=lambda kv: -kv[1])
    return (
        f"{result.text!r}\n{result.finish_reason} {result.num_chars}\n"
        f"{[round(v, 4) for v in result.logprobs[:3]]}\n{[c for c, _ in top]}\n"
    )


EXPECTED = {
    "With TensorFlow alone": _tensorflow_alone,
    "As a Keras layer": _keras_layer,
    "Stops, finish reasons and scores with TensorFlow alone": _stops_and_scores,
}
CHECKED = {"With this package": _this_package}


def test_every_python_snippet_of_the_savedmodel_doc_has_a_check():
    assert set(_sections(DOC, "python")) == set(EXPECTED) | set(CHECKED)


@pytest.mark.slow
@pytest.mark.parametrize("heading", sorted(EXPECTED))
def test_savedmodel_doc_snippet_prints_what_the_package_computes(bundled, snippet_runs, heading):
    assert _stdout(snippet_runs[heading]) == EXPECTED[heading](bundled)


@pytest.mark.slow
@pytest.mark.parametrize("heading", sorted(CHECKED))
def test_package_doc_snippet_prints_its_texts_and_score(bundled, snippet_runs, heading):
    CHECKED[heading](bundled, _stdout(snippet_runs[heading]))


@pytest.mark.slow
def test_savedmodel_doc_saved_model_cli_commands_run(bundled, snippet_runs):
    if not SAVED_MODEL_CLI.exists():
        pytest.skip("saved_model_cli is not installed beside this Python")
    result = snippet_runs["saved_model_cli"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inputs['prime'] tensor_info" in result.stdout  # 'show' lists the signature's inputs
    text = result.stdout.split("Result for output key text:\n", 1)[1].splitlines()[0]
    assert ast.literal_eval(text) == [bundled.generate("ROMEO:", 60, temperature=0.8, seed=1).encode()]


def _readme_commands() -> list[list[str]]:
    commands = []
    for block in _blocks((ROOT / "README.md").read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part.strip(), comments=True)
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value charrnn ...
                    words = words[1:]
                if words[:1] == ["charrnn"] and len(words) > 1:
                    commands.append(words[1:])
    return commands


@pytest.mark.slow
def test_readme_cli_examples_parse_and_each_commands_help_lists_the_flags_the_readme_uses():
    from keras_charrnn.cli import build_parser

    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"train", "export", "serve", "sample", "demo", "eval", "visualize"}
    parser = build_parser()
    for words in commands:
        parser.parse_args(words)  # exits with status 2 and one line if a flag is wrong
    for sub in sorted({c[0] for c in commands}):
        shown = run_cli(sub, "--help")
        assert shown.returncode == 0, shown.stderr
        flags = {w.split("=", 1)[0] for c in commands if c[0] == sub for w in c[1:] if w.startswith("--")}
        listed = set(re.findall(r"(?<![\w-])--[\w-]+", shown.stdout))
        assert flags <= listed, f"charrnn {sub} --help does not list {sorted(flags - listed)}"


def test_help_shows_every_train_config_field_and_loads_arguments():
    import dataclasses
    import pydoc

    from keras_charrnn.config import TrainConfig

    shown = pydoc.render_doc(TrainConfig, renderer=pydoc.plaintext)
    for f in dataclasses.fields(TrainConfig):
        assert f"{f.name}: {f.metadata['help'][:30]}" in " ".join(shown.split()), f.name
    from keras_charrnn import inprocess  # imports TensorFlow

    doc = inprocess.load.__doc__
    assert "Args:" in doc and "path:" in doc and "which:" in doc and "Returns:" in doc and "Raises:" in doc


def test_readme_layout_names_every_module_of_the_package():
    root = Path(__file__).resolve().parents[1]
    layout = root.joinpath("README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:serving/)?\w+\.py)`", layout))
    package = root / "keras_charrnn"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert modules - named == set(), "modules missing from README's layout"
    assert named - modules == set(), "README's layout names modules that do not exist"
