"""A ``llama_batch`` whose arrays are numpy buffers.

``llama_batch_init`` allocates one ``seq_id`` array per row, which forces a Python loop per token
to fill a prompt chunk. Here every field points into a contiguous numpy array (``seq_id[i]``
points at ``seq[i]``), so a chunk of thousands of prompt tokens is a few vectorized slice
assignments. numpy owns the memory, so there is nothing to free. llama.cpp only reads the arrays
during ``llama_decode``.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np


class Batch:
    """Rows of (token, position, sequence, wants-logits) for one ``llama_decode`` call."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.outputs = 0
        """Rows that want logits: llama.cpp's output rows of the step."""
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        seq_pointer = ctypes.POINTER(llama_cpp.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_rows = (seq_pointer * capacity)(
            *(ctypes.cast(base + i * self.seq.itemsize, seq_pointer) for i in range(capacity))
        )
        self.struct = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_rows, ctypes.POINTER(seq_pointer)),
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    @property
    def free(self) -> int:
        return self.capacity - self.size

    def clear(self) -> None:
        self.size = 0
        self.outputs = 0

    def add(self, token: int, pos: int, seq: int) -> int:
        """Add one token that needs logits (a generating slot's next token); returns its row."""
        row = self.size
        if row >= self.capacity:
            raise OverflowError(f"batch is full ({self.capacity} rows)")
        self.token[row] = token
        self.pos[row] = pos
        self.seq[row] = seq
        self.logits[row] = 1
        self.size = row + 1
        self.outputs += 1
        return row

    def add_chunk(self, tokens: np.ndarray, first_pos: int, seq: int, logits_for_last: bool, logits_for_all: bool = False) -> int:
        """Add consecutive prompt tokens of one sequence; returns the row of the last one.
        ``logits_for_all``: every row but the last gets logits (a scored prompt: ``logprobs.py``)."""
        count = len(tokens)
        start, end = self.size, self.size + count
        if count == 0 or end > self.capacity:
            raise OverflowError(f"a chunk of {count} tokens does not fit in the batch ({self.free} rows free)")
        self.token[start:end] = tokens
        self.pos[start:end] = np.arange(first_pos, first_pos + count, dtype=np.int32)
        self.seq[start:end] = seq
        self.logits[start:end] = 1 if logits_for_all else 0
        self.logits[end - 1] = 1 if logits_for_last else 0
        self.size = end
        self.outputs += int(logits_for_last) + (count - 1 if logits_for_all else 0)
        return end - 1

    def for_decode(self) -> llama_cpp.llama_batch:
        self.struct.n_tokens = self.size
        return self.struct
