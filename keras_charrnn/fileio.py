"""Atomic file writes: write beside the target, fsync, rename over it, fsync the folder.

A crash at any point leaves either the old file or the new one, never a
half-written one: the data reaches the disk before the rename, and the
rename itself (an entry of the containing folder) after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file's data, or a folder's entries, to the disk.

    Args:
        path: a file or a folder.
    """
    flags = os.O_RDONLY
    if os.path.isdir(path):
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """fsyncs every file and folder under ``root``, deepest first, ``root`` last."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Calls ``write(tmp_path)`` then renames ``tmp_path`` over ``path``.

    Args:
        path: the final file.
        write: writes the content to the path it is given.
        suffix: ending of the temporary name (some writers insist on one, e.g. ``.keras``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` as UTF-8 to ``path`` atomically.

    Args:
        path: the final file.
        text: its content.
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_dir(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_dir)`` then renames the folder to ``path``.

    The temporary folder starts with a dot, which TensorFlow Serving's
    version poller ignores (it only loads folders named by an integer).
    Every file and folder written is fsynced before the rename, and the
    containing folder after it. Fails if ``path`` already exists.

    Args:
        path: the final folder.
        write: fills the folder it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a server in a container must read it
        os.rename(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
