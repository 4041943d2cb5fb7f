"""The documented snippets run as written, and the README's CLI examples parse."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks(ROOT / "docs" / "savedmodels.md", "python"))))
def test_savedmodel_doc_python_snippets_run(index):
    code = _blocks(ROOT / "docs" / "savedmodels.md", "python")[index]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()


def test_savedmodel_doc_saved_model_cli_commands_run():
    cli = Path(sys.executable).with_name("saved_model_cli")
    if not cli.exists():
        pytest.skip("saved_model_cli is not installed beside this Python")
    script = _blocks(ROOT / "docs" / "savedmodels.md", "bash")[0].replace("saved_model_cli", str(cli))
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generate_text" in result.stdout or "text" in result.stdout


def _readme_commands() -> list[list[str]]:
    commands = []
    for block in _blocks(ROOT / "README.md", "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;", line):
                words = shlex.split(part.strip(), comments=True)
                if words[:1] == ["charrnn"] and len(words) > 1:
                    commands.append(words[1:])
    return commands


def test_readme_cli_examples_parse():
    from keras_charrnn.cli import build_parser

    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"train", "export", "serve", "sample", "demo", "eval"}
    parser = build_parser()
    for words in commands:
        parser.parse_args(words)  # exits with status 2 and one line if a flag is wrong
    for sub in sorted({c[0] for c in commands}):
        assert run_cli(sub, "--help").returncode == 0
