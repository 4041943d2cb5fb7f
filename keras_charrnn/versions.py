"""Numbered version folders: ``BASE/1/``, ``BASE/2/``, ... as TF Serving lays them out.

The one place that decides what counts as a version folder. A version is a
folder named by a non-negative integer in canonical form (``7``, not ``007``
or ``+7``), so the number read is always the folder that gets loaded; other
names (``.7.tmp`` while an export is being written, ``007``) are ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from keras_charrnn.errors import InputError

DEFAULT_BASE_PATH = "saved_models"  # the folder of all models (saved_models/NAME/VERSION), when none is given
_CANONICAL = re.compile(r"0|[1-9][0-9]{0,17}")


def version_number(name: str) -> int | None:
    """The version a folder name stands for, or None when it is not a version folder.

    Example:

    >>> version_number("12"), version_number("007"), version_number(".3.tmp")
    (12, None, None)
    """
    return int(name) if _CANONICAL.fullmatch(name) else None


def list_versions(base: str | os.PathLike, complete_only: bool = False) -> dict[int, Path]:
    """The version folders under ``base``, by number (empty when ``base`` is missing).

    Args:
        base: a model's base path (``saved_models/NAME``).
        complete_only: keep only folders that hold a ``saved_model.pb``.

    Returns:
        ``{version: path}``, in increasing version order.
    """
    base = Path(base)
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found = {}
    for entry in entries:
        number = version_number(entry.name)
        if number is None or not entry.is_dir():
            continue
        if complete_only and not os.path.isfile(os.path.join(entry.path, "saved_model.pb")):
            continue
        found[number] = Path(entry.path)
    return dict(sorted(found.items()))


def is_version_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one exported version (it holds ``saved_model.pb``)."""
    return (Path(path) / "saved_model.pb").is_file()


def latest_version_dir(path: str | os.PathLike) -> Path:
    """A version folder itself, or the highest complete version under a base path.

    Raises:
        InputError: nothing loadable is there.
    """
    path = Path(path)
    if is_version_dir(path):
        return path
    if not path.is_dir():
        raise InputError(f"{path}: no such model folder")
    versions = list_versions(path, complete_only=True)
    if not versions:
        raise InputError(f"{path}: no SavedModel version folders (1/, 2/, ...) inside")
    return versions[max(versions)]


def next_version(base: str | os.PathLike) -> int:
    """The version number after the highest one under ``base`` (1 for a new model)."""
    versions = list_versions(base)
    return max(versions) + 1 if versions else 1
