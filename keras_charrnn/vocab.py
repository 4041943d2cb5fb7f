"""Vocabulary: map the characters of a corpus to integer ids and back.

Ids are Unicode code points seen in the training corpus, sorted by code
point, shifted by one: id 0 (``UNKNOWN_ID``) is reserved for characters the
model never saw in training. ``encode`` is vectorised with NumPy; training
corpora (files, folders, globs) are read and encoded in blocks by ``corpus.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from keras_charrnn.errors import InputError
from keras_charrnn.fileio import atomic_write_text

UNKNOWN_ID = 0
UNKNOWN_CHAR = "\ufffd"  # what decode() prints for the reserved id
MAX_CODE_POINT = 0x10FFFF


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class Vocabulary:
    """The characters a model knows, with one reserved id for unknown ones.

    Args:
        chars: the known characters, each a single code point, in id order
            (id 1 is ``chars[0]``).

    Example:

    >>> vocab = Vocabulary.from_text("hello")
    >>> vocab.encode("hex").tolist()
    [2, 1, 0]
    >>> vocab.decode([4, 1])
    'oe'
    """

    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = list(chars)
        if any(len(c) != 1 for c in self.chars):
            raise InputError("vocabulary entries must be single characters")
        if len(set(self.chars)) != len(self.chars):
            raise InputError("vocabulary has duplicate characters")
        points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._order = np.argsort(points)
        self._sorted = points[self._order]

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        """Builds the vocabulary of ``text``: its distinct characters by code point."""
        return cls(chr(int(p)) for p in np.unique(_code_points(text)))

    @property
    def size(self) -> int:
        """Number of ids, the reserved unknown id included."""
        return len(self.chars) + 1

    def __len__(self) -> int:
        return self.size

    @property
    def id_dtype(self) -> np.dtype:
        """The smallest integer type holding every id: uint8, uint16 or int32 (what corpora are encoded in)."""
        if self.size <= 1 << 8:
            return np.dtype(np.uint8)
        if self.size <= 1 << 16:
            return np.dtype(np.uint16)
        return np.dtype(np.int32)

    def lookup_table(self) -> np.ndarray:
        """Every code point's id, for encoding large texts by indexing.

        Returns:
            An array of ``MAX_CODE_POINT + 1`` ids of type ``id_dtype`` (1-4 MB), indexed by code point;
            ``UNKNOWN_ID`` for characters not in the vocabulary.
        """
        table = np.zeros(MAX_CODE_POINT + 1, dtype=self.id_dtype)
        table[self._sorted] = self._order + 1
        return table

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text`` as int32; unknown characters get ``UNKNOWN_ID``."""
        points = _code_points(text)
        if not len(self._sorted):
            return np.zeros(len(points), dtype=np.int32)
        pos = np.searchsorted(self._sorted, points)
        pos = np.minimum(pos, len(self._sorted) - 1)
        known = self._sorted[pos] == points
        ids = np.where(known, self._order[pos] + 1, UNKNOWN_ID)
        return ids.astype(np.int32)

    def sorted_code_points(self) -> tuple[np.ndarray, np.ndarray]:
        """The lookup table ``encode`` searches: code points in increasing order and their ids.

        Returns:
            ``(points, ids)``, both int32 [len(chars)]: ``chars`` as code points sorted,
            and the id of each (what an exported model's graph searches too).
        """
        return self._sorted.astype(np.int32), (self._order + 1).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of ``ids``; the unknown id decodes to U+FFFD."""
        table = [UNKNOWN_CHAR] + self.chars
        return "".join(table[int(i)] for i in ids)

    def to_json(self) -> str:
        """The vocabulary as JSON: ``{"unknown_id": 0, "chars": [...]}``."""
        return json.dumps({"unknown_id": UNKNOWN_ID, "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str) -> Vocabulary:
        """Reads what ``to_json`` wrote.

        Args:
            data: the JSON text.

        Returns:
            The vocabulary.

        Raises:
            InputError: the text is not a vocabulary.
        """
        try:
            obj = json.loads(data)
            return cls(obj["chars"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"malformed vocabulary JSON ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as JSON, atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Reads a vocabulary file written by ``save``.

        Args:
            path: the JSON file.

        Returns:
            The vocabulary.

        Raises:
            InputError: the file is missing or malformed (the message names it).
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no vocabulary file")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (InputError, OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"Vocabulary(size={self.size})"
