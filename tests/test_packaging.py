"""What ships: the wheel's files, the bundled model inside the package, the version, ``python -m keras_charrnn``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import keras_charrnn
from conftest import run_cli
from keras_charrnn import demo
from keras_charrnn.bundled import bundled_base_path
from keras_charrnn.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = {
    "saved_model.pb",
    "fingerprint.pb",
    "variables/variables.index",
    "variables/variables.data-00000-of-00001",
    "assets.extra/tf_serving_warmup_requests",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("keras_charrnn-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_the_package_its_data_and_the_latest_bundled_model_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert wheel.stat().st_size < 20 * 1024 * 1024
    version = f"keras_charrnn/models/shakespeare/{keras_charrnn.bundled_model_path().name}/"
    assert {n[len(version) :] for n in names if n.startswith(version)} == MODEL_FILES
    assert {n.split("/")[3] for n in names if n.startswith("keras_charrnn/models/shakespeare/")} == {
        keras_charrnn.bundled_model_path().name,
        "MODEL_CARD.md",
    }  # one version
    for data in (
        "keras_charrnn/templates/report.html",
        "keras_charrnn/serving/playground.html",
        "keras_charrnn/py.typed",
        "keras_charrnn/__main__.py",
        "keras_charrnn/bundled.py",
    ):
        assert data in names, data
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {n.split("/")[0] for n in names} == {"keras_charrnn", f"keras_charrnn-{keras_charrnn.__version__}.dist-info"}
    assert not [n for n in names if re.search(r"(^|/)(tests|bench|runs|saved_models|serving/k8s)/", n)]
    assert f"Version: {keras_charrnn.__version__}" in metadata
    assert re.search(r"^Requires-Dist: tensorflow<2\.22,>=2\.21$", metadata, re.M), "the bounds travel with the wheel"


def test_every_dependency_has_a_lower_and_an_upper_bound_and_constraints_pin_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for extra, requirements in {"": project["dependencies"], **project["optional-dependencies"]}.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            assert ("==" in requirement) or (">=" in requirement and "<" in requirement), (extra, requirement)
            if extra != "bench":
                assert re.sub(r"[-_.]+", "-", name).lower() in pinned, f"constraints.txt does not pin {name}"


def test_bundled_model_is_a_savedmodel_inside_the_package_and_the_one_copy_in_the_repository():
    path = keras_charrnn.bundled_model_path()
    assert path.parent.parent == bundled_base_path()
    assert bundled_base_path().parent == Path(keras_charrnn.__file__).parent
    assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} == MODEL_FILES
    # In a clone the package's folder is a link to saved_models/, the layout the serving examples use.
    assert path.resolve() == (ROOT / "saved_models" / "shakespeare" / path.name).resolve()
    assert (ROOT / "saved_models" / "shakespeare" / path.name).is_symlink() is False
    with pytest.raises(ConfigError, match="no bundled model 'nope' \\(bundled: shakespeare\\)"):
        keras_charrnn.bundled_model_path("nope")


@pytest.mark.slow
def test_bundled_model_loads_with_tensorflow_alone_and_is_what_its_model_card_says():
    import tensorflow as tf

    config = json.loads(
        tf.saved_model.load(str(keras_charrnn.bundled_model_path())).signatures["metadata"]()["config"].numpy()
    )
    card = (bundled_base_path() / "shakespeare" / "MODEL_CARD.md").read_text()
    assert (config["cell"], config["layers"], config["units"], config["vocab_size"]) == ("lstm", 2, 512, 66)
    assert f"| {config['val_loss']:.4f} | {config['val_bpc']:.4f} |" in card
    assert f"{config['corpus_chars']:,} characters" in card


@pytest.mark.slow
def test_sample_without_model_uses_the_bundled_model_from_any_folder(tmp_path):
    model = keras_charrnn.load(keras_charrnn.bundled_model_path())
    done = run_cli("sample", "-n", "40", "--seed", "3", "--prime", "ROMEO:", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ROMEO:" + model.generate("ROMEO:", 40, seed=3) + "\n"


def test_demo_serves_saved_models_here_when_it_holds_one_else_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.demo_base_path(None) == bundled_base_path()
    assert demo.demo_base_path(None, training=True) == Path("saved_models")  # exports there, then serves it
    assert demo.demo_base_path("elsewhere") == Path("elsewhere")
    (tmp_path / "saved_models" / "mine" / "1").mkdir(parents=True)
    assert demo.demo_base_path(None) == bundled_base_path()  # no saved_model.pb: not a model
    (tmp_path / "saved_models" / "mine" / "1" / "saved_model.pb").write_bytes(b"")
    assert demo.demo_base_path(None) == Path("saved_models")


@pytest.mark.slow
def test_version_flag_and_python_m_keras_charrnn_are_the_charrnn_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "keras_charrnn.__version__"}
    assert f"## {keras_charrnn.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    as_module = subprocess.run([sys.executable, "-m", "keras_charrnn", "--version"], capture_output=True, text=True)
    assert as_module.returncode == 0 and as_module.stdout == f"charrnn {keras_charrnn.__version__}\n"
    helps = [
        subprocess.run([sys.executable, "-m", module, "train", "--help"], capture_output=True, text=True).stdout
        for module in ("keras_charrnn", "keras_charrnn.cli")
    ]
    assert helps[0] == helps[1] and "--backend" in helps[0]


def test_bundled_module_examples_run():
    import doctest

    from keras_charrnn import bundled

    assert doctest.testmod(bundled).failed == 0
