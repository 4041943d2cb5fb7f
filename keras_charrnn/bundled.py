"""The model shipped inside the package: where it is, wherever the package is installed.

The wheel carries the latest version of the bundled Shakespeare model as package data,
``keras_charrnn/models/shakespeare/VERSION/`` (a TF Serving base path: one folder per model,
one numbered folder per version). In a clone that folder is a symbolic link to the
repository's ``saved_models/shakespeare/VERSION``, the one copy of the files, which the serving
examples (``serving/``, ``charrnn serve --model_base_path saved_models/shakespeare``) use;
building the wheel copies the files it points to. Everything here is a path: re-exporting the
model in place (same version folder) needs no change here. No TensorFlow is imported.
"""

from __future__ import annotations

from pathlib import Path

from keras_charrnn.errors import ConfigError, InputError
from keras_charrnn.versions import latest_version_dir

BUNDLED_NAME = "shakespeare"  # the bundled model's name (its folder under ``bundled_base_path()``)


def bundled_base_path() -> Path:
    """The folder of the bundled models, laid out as TF Serving's base path (``NAME/VERSION/``).

    Returns:
        The absolute path of ``keras_charrnn/models`` in the installed package.

    Example:

    >>> (bundled_base_path() / "shakespeare").is_dir()
    True
    """
    return Path(__file__).resolve().parent / "models"


def bundled_model_path(name: str = BUNDLED_NAME) -> Path:
    """The SavedModel folder of a bundled model's latest version, as installed with the package.

    Apps load it with TensorFlow alone (``tf.saved_model.load``), with ``keras_charrnn.load``,
    or serve it (its parent folder is a TF Serving ``model_base_path``).

    Args:
        name: the bundled model (only ``"shakespeare"`` ships).

    Returns:
        The absolute path of the version folder, e.g. ``.../keras_charrnn/models/shakespeare/1``.

    Raises:
        ConfigError: no bundled model of that name, or its files are missing from the installation.

    Example:

    >>> path = bundled_model_path()
    >>> path.name, (path / "saved_model.pb").is_file()
    ('1', True)
    >>> import tensorflow as tf                                      # doctest: +SKIP
    >>> tf.saved_model.load(str(path)).signatures["generate_text"]  # doctest: +SKIP
    """
    base = bundled_base_path() / name
    if not base.is_dir():
        found = sorted(p.name for p in bundled_base_path().glob("*") if p.is_dir())
        raise ConfigError(f"no bundled model {name!r} (bundled: {', '.join(found) or 'none'})")
    try:
        return latest_version_dir(base)
    except InputError as exc:
        raise ConfigError(f"the bundled model's files are missing from this installation ({exc})") from None
