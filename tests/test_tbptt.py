import numpy as np
import pytest

from keras_charrnn.tbptt import TBPTTBatches, min_length, split_train_val
from keras_charrnn.errors import ConfigError, InputError


def test_each_row_continues_in_the_next_batch():
    ids = np.arange(1000)
    batches = TBPTTBatches(ids, batch_size=4, seq_len=10)
    for k in range(len(batches) - 1):
        x_now, _ = batches[k]
        x_next, _ = batches[k + 1]
        assert np.array_equal(x_next[:, 0], x_now[:, -1] + 1)  # row i resumes right after where it stopped


def test_rows_are_contiguous_streams_and_targets_shift_by_one():
    ids = np.arange(1000)
    batches = TBPTTBatches(ids, batch_size=4, seq_len=10)
    rows = np.concatenate([batches[k][0] for k in range(len(batches))], axis=1)
    targets = np.concatenate([batches[k][1] for k in range(len(batches))], axis=1)
    stream = rows.shape[1]
    for i in range(4):
        assert np.array_equal(rows[i], np.arange(i * stream, (i + 1) * stream))
    assert np.array_equal(targets, rows + 1)


def test_resume_from_batch_serves_the_remaining_batches():
    batches = TBPTTBatches(np.arange(1000), batch_size=4, seq_len=10)
    tail = batches.from_batch(5)
    assert len(tail) == len(batches) - 5
    assert np.array_equal(tail[0][0], batches[5][0])


def test_validation_is_the_contiguous_tail():
    ids = np.arange(1000)
    train, val = split_train_val(ids, 0.1)
    assert np.array_equal(np.concatenate([train, val]), ids)
    assert len(val) == 100 and val[0] == 900


def test_too_short_corpus_says_how_long_it_must_be():
    with pytest.raises(InputError, match=f"at least {min_length(64, 100)}"):
        TBPTTBatches(np.arange(500), batch_size=64, seq_len=100)


def test_batches_are_int32_ids_not_one_hot():
    x, y = TBPTTBatches(np.arange(1000), batch_size=4, seq_len=10)[0]
    assert x.dtype == np.int32 and x.shape == (4, 10) and y.shape == (4, 10)


def test_validation_fraction_out_of_range_names_the_parameter():
    with pytest.raises(ConfigError, match=r"^val_frac must be in \[0, 1\), got 1.0"):
        split_train_val(np.arange(100), 1.0)


def test_small_integer_ids_are_not_copied_and_batches_come_out_int32():
    ids = (np.arange(1000) % 200).astype(np.uint8)
    batches = TBPTTBatches(ids, batch_size=4, seq_len=10)
    assert np.shares_memory(batches.x_streams, ids) and np.shares_memory(batches.y_streams, ids)
    x, y = batches[3]
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.flags.c_contiguous
    assert np.array_equal(x, TBPTTBatches(ids.astype(np.int64), batch_size=4, seq_len=10)[3][0])
