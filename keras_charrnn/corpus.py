"""Reading a training corpus: one file, a folder or a glob pattern -> one text, as ids.

``CORPUS`` may be

- a file: its text;
- a folder: every file under it (recursively; names starting with ``.``, such as
  ``.git``, are left out), sorted by their path relative to the folder;
- a glob pattern (``"src/**/*.py"``, quoted so the shell leaves it alone): every
  file it matches, sorted.

The files' texts are joined with ``SEPARATOR`` (a blank line, ``"\\n\\n"``)
between consecutive files, so one file gives exactly its own text. Files that
are not valid UTF-8 are named in a warning and skipped, or refused with
``strict=True``; empty files add nothing and are left out.

Large corpora are read in blocks, never whole: a first pass checks the UTF-8,
collects the characters (the vocabulary) and hashes the joined text; a second
pass encodes each block straight into one id array of the smallest integer type
that holds the vocabulary (``uint8`` up to 255 characters, ``uint16`` up to
65,535, else ``int32``). Memory is that array (1-4 bytes per character) plus a
few blocks; ``bench/corpus_memory.py`` measures it.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from keras_charrnn.errors import InputError
from keras_charrnn.vocab import MAX_CODE_POINT, Vocabulary

SEPARATOR = "\n\n"  # between the texts of consecutive files
BLOCK_BYTES = 4 << 20  # bytes read at a time

log = logging.getLogger("charrnn.corpus")


@dataclass
class Corpus:
    """An encoded corpus.

    Attributes:
        ids: the joined text's ids, 1-D (``Vocabulary.id_dtype`` of ``vocab``).
        vocab: the vocabulary it was encoded with.
        record: what ``config.json`` keeps of it (see ``CorpusScan.record``).
    """

    ids: np.ndarray
    vocab: Vocabulary
    record: dict


@dataclass
class CorpusScan:
    """What the first pass over a corpus found.

    Attributes:
        spec: the corpus as given (file, folder or pattern).
        files: the UTF-8 files used, in order.
        names: how each is recorded: relative to the folder, or as given/matched.
        skipped: ``(name, reason)`` of each file left out for not being UTF-8.
        chars: characters of the joined text.
        sha256: hex SHA-256 of the joined text's UTF-8 bytes.
        chars_seen: the distinct characters of the joined text, by code point.
    """

    spec: str
    files: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    chars: int = 0
    sha256: str = ""
    chars_seen: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """The corpus record of ``config.json``.

        Returns:
            ``{"path", "files", "skipped", "separator", "chars", "sha256"}``: ``--resume``
            checks ``sha256`` (the joined text) and names the files that differ.
        """
        return {
            "path": self.spec,
            "files": self.names,
            "skipped": [name for name, _ in self.skipped],
            "separator": SEPARATOR,
            "chars": self.chars,
            "sha256": self.sha256,
        }


def _is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def find_files(spec: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The files of a corpus, in the order they are joined.

    Args:
        spec: a file, a folder, or a glob pattern (``**`` matches folders recursively).

    Returns:
        ``(paths, names)``: the files, and how each is named in records and messages
        (relative to a folder; as given or matched otherwise).

    Raises:
        InputError: nothing there, or a folder or pattern without any file.

    Example:

    >>> find_files("src/**/*.py")  # doctest: +SKIP
    ([PosixPath('src/a.py'), PosixPath('src/b/c.py')], ['src/a.py', 'src/b/c.py'])
    """
    path = Path(spec)
    if path.is_file():
        return [path], [str(spec)]
    if path.is_dir():
        found: list[Path] = []
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(Path(root, f) for f in files if not f.startswith("."))
        found = [p for p in found if p.is_file()]
        named = sorted((p.relative_to(path).as_posix(), p) for p in found)
        if not named:
            raise InputError(f"{spec}: the folder holds no files")
        return [p for _, p in named], [n for n, _ in named]
    if _is_pattern(str(spec)):
        matched = sorted(m for m in glob.glob(str(spec), recursive=True) if os.path.isfile(m))
        if not matched:
            raise InputError(f"{spec}: no file matches the pattern")
        return [Path(m) for m in matched], matched
    raise InputError(f"{spec}: no such file or folder")


def _blocks(path: Path, block_bytes: int) -> Iterator[str]:
    """Yields the text of a UTF-8 file block by block; raises ``_NotUTF8`` naming the first bad byte's offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(block_bytes)
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    raise _NotUTF8(
                        f"not valid UTF-8 (bad byte 0x{exc.object[exc.start]:02x} "
                        f"at byte offset {offset - pending + exc.start})"
                    ) from None
                if text:
                    yield text
                if not data:
                    return
                offset += len(data)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


class _NotUTF8(Exception):
    pass


def scan(spec: str | os.PathLike, strict: bool = False, block_bytes: int = BLOCK_BYTES) -> CorpusScan:
    """The first pass: checks every file's UTF-8, collects the characters, hashes the joined text.

    Args:
        spec: a file, a folder or a glob pattern (see the module's notes).
        strict: refuse a file that is not valid UTF-8 instead of skipping it (always so
            when ``spec`` is one file).
        block_bytes: bytes read at a time.

    Returns:
        What was found.

    Raises:
        InputError: no files, a file unreadable, not UTF-8 with ``strict`` (the message
            names it), or no text at all.
    """
    paths, names = find_files(spec)
    strict = strict or Path(spec).is_file()  # a file named on its own is never skipped
    result = CorpusScan(spec=str(spec))
    seen = np.zeros(MAX_CODE_POINT + 1, dtype=bool)
    digest = hashlib.sha256()
    sep_bytes = SEPARATOR.encode("utf-8")
    for path, name in zip(paths, names):
        before, chars = digest.copy(), 0
        if result.files:
            digest.update(sep_bytes)
        file_points = []  # the distinct code points of each block
        try:
            for text in _blocks(path, block_bytes):
                file_points.append(np.flatnonzero(np.bincount(np.frombuffer(text.encode("utf-32-le"), np.uint32))))
                digest.update(text.encode("utf-8"))
                chars += len(text)
        except _NotUTF8 as exc:
            if strict:
                raise InputError(f"{path}: {exc}") from None
            log.warning("warning: %s: %s; skipped", path, exc)
            result.skipped.append((name, str(exc)))
            digest = before
            continue
        if not chars:
            digest = before  # an empty file adds nothing, not even a separator
            continue
        if result.files:
            result.chars += len(SEPARATOR)
            seen[[ord(c) for c in SEPARATOR]] = True
        seen[np.concatenate(file_points)] = True
        result.files.append(path)
        result.names.append(name)
        result.chars += chars
    if not result.chars:
        raise InputError(
            f"{spec}: file is empty" if Path(spec).is_file() else f"{spec}: no text (every file is empty or skipped)"
        )
    result.sha256 = digest.hexdigest()
    result.chars_seen = [chr(int(p)) for p in np.flatnonzero(seen)]
    return result


def encode(found: CorpusScan, vocab: Vocabulary, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """The second pass: the joined text's ids, encoded block by block into one array.

    Args:
        found: the first pass's result.
        vocab: the vocabulary to encode with (characters it lacks get the unknown id).
        block_bytes: bytes read at a time.

    Returns:
        1-D ids of dtype ``vocab.id_dtype``, ``found.chars`` long.

    Raises:
        InputError: a file changed since the first pass.
    """
    ids = np.empty(found.chars, dtype=vocab.id_dtype)
    table = vocab.lookup_table()
    separator = np.frombuffer(SEPARATOR.encode("utf-32-le"), dtype=np.uint32)
    pos = 0

    def put(points: np.ndarray) -> None:
        nonlocal pos
        if pos + len(points) > len(ids):
            raise InputError(f"{found.spec}: the corpus changed while it was read; try again")
        ids[pos : pos + len(points)] = table[points]
        pos += len(points)

    for i, (path, name) in enumerate(zip(found.files, found.names)):
        if i:
            put(separator)
        try:
            for text in _blocks(path, block_bytes):
                put(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
        except _NotUTF8:
            raise InputError(f"{name}: the file changed while it was read; try again") from None
    if pos != len(ids):
        raise InputError(f"{found.spec}: the corpus changed while it was read; try again")
    return ids


def load_corpus(
    spec: str | os.PathLike, vocab: Vocabulary | None = None, strict: bool = False, block_bytes: int = BLOCK_BYTES
) -> Corpus:
    """Reads and encodes a corpus in blocks (both passes).

    Args:
        spec: a file, a folder or a glob pattern.
        vocab: the vocabulary to encode with (default: the corpus's own characters).
        strict: refuse a file that is not valid UTF-8 instead of skipping it with a warning.
        block_bytes: bytes read at a time.

    Returns:
        The ids, the vocabulary and the record for ``config.json``.

    Raises:
        InputError: see ``scan`` and ``encode``.

    Example:

    >>> corpus = load_corpus("src/")  # doctest: +SKIP
    >>> corpus.vocab.decode(corpus.ids[:20])  # doctest: +SKIP
    """
    found = scan(spec, strict, block_bytes)
    vocab = vocab or Vocabulary(found.chars_seen)
    return Corpus(encode(found, vocab, block_bytes), vocab, found.record())


def read_text(spec: str | os.PathLike, strict: bool = False) -> str:
    """The joined text of a corpus, whole (for small corpora; training uses ``load_corpus``).

    Args:
        spec: a file, a folder or a glob pattern.
        strict: refuse a file that is not valid UTF-8 instead of skipping it.

    Returns:
        The files' texts joined with ``SEPARATOR``.
    """
    found = scan(spec, strict)
    parts = []
    for path in found.files:
        parts.append("".join(_blocks(path, BLOCK_BYTES)))
    return SEPARATOR.join(parts)
