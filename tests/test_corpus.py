"""Reading corpora: a file, a folder or a glob -> one text, encoded in blocks."""

import hashlib
import logging

import numpy as np
import pytest

from keras_charrnn.corpus import SEPARATOR, find_files, load_corpus, read_text, scan
from keras_charrnn.errors import InputError
from keras_charrnn.vocab import Vocabulary


@pytest.fixture()
def tree(tmp_path):
    """A small source tree: two folders, a hidden folder, a binary file and an empty one."""
    root = tmp_path / "src"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.py").write_text("print('b')\n", encoding="utf-8")
    (root / "pkg" / "a.py").write_text("naïve = '春'\n", encoding="utf-8")
    (root / "pkg" / "sub" / "c.txt").write_text("see 😀", encoding="utf-8")
    (root / "pkg" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (root / "pkg" / "empty.py").write_text("")
    (root / ".git" / "HEAD").write_text("ref: main\n")
    return root


def test_folder_joins_every_utf8_file_in_sorted_order_with_the_separator(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="charrnn.corpus"):
        found = scan(tree)
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: {tree / 'pkg' / 'logo.png'}: not valid UTF-8 (bad byte 0x89 at byte offset 0); skipped"
    ]
    assert found.names == ["b.py", "pkg/a.py", "pkg/sub/c.txt"]  # hidden, binary and empty files left out
    text = SEPARATOR.join(["print('b')\n", "naïve = '春'\n", "see 😀"])
    assert read_text(tree) == text
    record = found.record()
    assert record["files"] == found.names and record["skipped"] == ["pkg/logo.png"]
    assert record["chars"] == len(text) and record["separator"] == "\n\n"
    assert record["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_glob_takes_the_matching_files_recursively_in_sorted_order(tree):
    paths, names = find_files(str(tree / "**" / "*.py"))
    assert names == [str(tree / "b.py"), str(tree / "pkg" / "a.py"), str(tree / "pkg" / "empty.py")]
    assert read_text(str(tree / "**" / "*.py")) == "print('b')\n" + SEPARATOR + "naïve = '春'\n"


def test_strict_refuses_a_file_that_is_not_utf8_naming_it(tree):
    with pytest.raises(InputError, match=r"logo\.png: not valid UTF-8 \(bad byte 0xff at byte offset 9\)"):
        (tree / "pkg" / "logo.png").write_bytes(b"ok so far\xff")
        scan(tree, strict=True)


def test_encoding_in_blocks_gives_the_ids_of_the_whole_text(tree):
    text = read_text(tree)
    # 3-byte blocks split the multi-byte characters (é, 春: 3 bytes, 😀: 4 bytes) across blocks.
    corpus = load_corpus(tree, block_bytes=3)
    assert corpus.vocab == Vocabulary.from_text(text)
    assert corpus.ids.dtype == np.uint8
    assert np.array_equal(corpus.ids, corpus.vocab.encode(text))
    assert corpus.vocab.decode(corpus.ids) == text


def test_bad_byte_offset_is_counted_from_the_file_start_across_blocks(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes("é".encode() * 10 + b"\xc3(")
    with pytest.raises(InputError, match="byte offset 20"):
        scan(path, block_bytes=3)


def test_ids_take_two_bytes_when_the_vocabulary_outgrows_one(tmp_path):
    (tmp_path / "cjk.txt").write_text("".join(chr(0x4E00 + i) for i in range(300)) * 2, encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab.size == 301 and corpus.ids.dtype == np.uint16
    assert corpus.vocab.decode(corpus.ids[:3]) == "一丁丂"


def test_a_given_vocabulary_maps_unseen_characters_to_unknown(tmp_path):
    (tmp_path / "t.txt").write_text("abcz", encoding="utf-8")
    corpus = load_corpus(tmp_path / "t.txt", vocab=Vocabulary.from_text("abc"))
    assert corpus.ids.tolist() == [1, 2, 3, 0]


def test_missing_corpus_empty_folder_and_unmatched_pattern_are_named(tmp_path):
    with pytest.raises(InputError, match="nope: no such file or folder"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: the folder holds no files"):
        scan(tmp_path / "empty")
    with pytest.raises(InputError, match=r"\*\.zzz: no file matches the pattern"):
        scan(str(tmp_path / "*.zzz"))
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(InputError, match="no text"):
        scan(tmp_path / "empty")
