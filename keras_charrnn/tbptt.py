"""Truncated-BPTT batching: the corpus cut into ``batch_size`` contiguous streams.

Stream i is the i-th contiguous slice of the corpus. Batch k holds window k
(``seq_len`` characters) of every stream, with targets shifted by one
character, so row i of batch k+1 continues row i of batch k and a stateful
model may carry its hidden state from one batch to the next::

    ids:      a b c d e f g h i j k l m n o p q
    streams:  [a b c d e f g h]      (batch_size=2, seq_len=4)
              [i j k l m n o p]
    batch 0:  x=[[a b c d], [i j k l]]  y=[[b c d e], [j k l m]]
    batch 1:  x=[[e f g h], [m n o p]]  y=[[f g h i], [n o p q]]

The streams are views on the ids as given (``uint8``/``uint16`` for a corpus read
by ``corpus.py``: 1-2 bytes per character, never copied); each batch is cast to
int32 when Keras asks for it.
"""

from __future__ import annotations

import numpy as np
import keras

from keras_charrnn.errors import ConfigError, InputError


def min_length(batch_size: int, seq_len: int) -> int:
    """The fewest characters that make one batch (targets need one more)."""
    return batch_size * seq_len + 1


def split_train_val(ids: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Splits ids into a training head and a contiguous validation tail.

    Args:
        ids: the encoded corpus.
        val_frac: fraction of the corpus held out at its end, in [0, 1).

    Returns:
        ``(train_ids, val_ids)``; ``val_ids`` is empty when ``val_frac`` is 0.
    """
    if not 0.0 <= val_frac < 1.0:
        raise ConfigError(f"val_frac must be in [0, 1), got {val_frac}")
    n_val = int(round(len(ids) * val_frac))
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


class TBPTTBatches(keras.utils.PyDataset):
    """Batches of a corpus laid out for truncated backpropagation through time.

    Train with ``model.fit(batches, shuffle=False)``: Keras would otherwise
    shuffle the order of a PyDataset's batches, and the hidden state carried
    from batch k to batch k+1 would then be wrong.

    Args:
        ids: the encoded corpus, 1-D integers of any integer type (kept as is, not copied).
        batch_size: number of streams (rows of every batch).
        seq_len: characters per row of a batch (the truncation length).
        name: what the corpus is called in error messages.

    Example:

    >>> import numpy as np
    >>> b = TBPTTBatches(np.arange(17), batch_size=2, seq_len=4)
    >>> x, y = b[1]
    >>> x.tolist(), y.tolist()
    ([[4, 5, 6, 7], [12, 13, 14, 15]], [[5, 6, 7, 8], [13, 14, 15, 16]])
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, name: str = "corpus"):
        super().__init__(workers=1, use_multiprocessing=False)
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        need = min_length(batch_size, seq_len)
        if len(ids) < need:
            raise InputError(
                f"{name} is too short: {len(ids)} characters, but batch_size {batch_size} x "
                f"seq_len {seq_len} needs at least {need}; use a longer text or smaller "
                f"batch_size/seq_len"
            )
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"ids must be integers, got {ids.dtype}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.num_batches_total = (len(ids) - 1) // (batch_size * seq_len)
        stream_len = self.num_batches_total * seq_len
        used = batch_size * stream_len
        self.x_streams = ids[:used].reshape(batch_size, stream_len)
        self.y_streams = ids[1 : used + 1].reshape(batch_size, stream_len)
        self.start = 0

    def __len__(self) -> int:
        return self.num_batches_total - self.start

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        k = self.start + index
        if not 0 <= k < self.num_batches_total:
            raise IndexError(index)
        window = slice(k * self.seq_len, (k + 1) * self.seq_len)
        return (
            np.ascontiguousarray(self.x_streams[:, window], dtype=np.int32),
            np.ascontiguousarray(self.y_streams[:, window], dtype=np.int32),
        )

    def from_batch(self, start: int) -> TBPTTBatches:
        """The same batches, starting at batch ``start`` (for resuming mid-epoch)."""
        clone = object.__new__(TBPTTBatches)
        clone.__dict__.update(self.__dict__)
        if not 0 <= start < self.num_batches_total:
            raise ConfigError(f"start batch {start} outside 0..{self.num_batches_total - 1}")
        clone.start = start
        return clone

    @property
    def chars_per_batch(self) -> int:
        return self.batch_size * self.seq_len
