import numpy as np
import pytest

from keras_charrnn.errors import InputError
from keras_charrnn.corpus import read_text
from keras_charrnn.vocab import UNKNOWN_ID, Vocabulary


def test_round_trip_keeps_chinese_and_emoji(tmp_path):
    text = "春眠不觉晓 — naïve café 😀🎉 ok"
    vocab = Vocabulary.from_text(text)
    assert vocab.decode(vocab.encode(text)) == text
    vocab.save(tmp_path / "vocab.json")
    again = Vocabulary.load(tmp_path / "vocab.json")
    assert again == vocab
    assert np.array_equal(again.encode(text), vocab.encode(text))


def test_ids_follow_code_point_order_with_reserved_unknown():
    vocab = Vocabulary.from_text("cab")
    assert vocab.encode("abc").tolist() == [1, 2, 3]
    assert vocab.size == 4


def test_unseen_characters_map_to_the_reserved_id():
    vocab = Vocabulary.from_text("hello")
    ids = vocab.encode("hex😀")
    assert ids.tolist()[2:] == [UNKNOWN_ID, UNKNOWN_ID]
    assert vocab.decode(ids).endswith("\ufffd\ufffd")


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text\n\xff\xfe more")
    with pytest.raises(InputError, match=r"bad\.txt.*byte offset 10"):
        read_text(path)


def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_text(tmp_path / "empty.txt")


def test_malformed_vocabulary_file_is_named(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"chars": ["ab"]}')
    with pytest.raises(InputError, match=r"vocab\.json: vocabulary entries must be single characters"):
        Vocabulary.load(path)
    path.write_text("not json")
    with pytest.raises(InputError, match=r"vocab\.json: malformed vocabulary JSON"):
        Vocabulary.load(path)


def test_lookup_table_encodes_like_encode_in_the_smallest_id_type():
    text = "春眠不觉晓 — naïve café 😀"
    vocab = Vocabulary.from_text(text)
    points = np.array([ord(c) for c in text + "?"])
    assert vocab.id_dtype == np.uint8
    assert vocab.lookup_table()[points].tolist() == vocab.encode(text + "?").tolist()
    assert Vocabulary(chr(0x4E00 + i) for i in range(255)).id_dtype == np.uint8
    assert Vocabulary(chr(0x4E00 + i) for i in range(256)).id_dtype == np.uint16
