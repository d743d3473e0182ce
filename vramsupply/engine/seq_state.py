"""Copies of one sequence's memory between llama.cpp and host RAM: what the host prompt cache
(``prompt_cache.py``) and the recurrent checkpoints (``checkpoints.py``) are made of.

A copy lives in its own anonymous mapping rather than on the malloc heap: copies of a few to tens
of MB come and go all the time, and once glibc has freed one such block it serves blocks up to
that size from the heap, where freed ones are rarely given back to the system. A mapping goes
back whole when its copy is dropped, so the process holds what it keeps, not its high-water mark.
"""

from __future__ import annotations

import ctypes
import mmap

import llama_cpp
import numpy as np


def save_state(ctx: llama_cpp.llama_context_p, seq_id: int, flags: int = 0) -> np.ndarray | None:
    """A host copy of sequence ``seq_id``'s memory (``flags``: llama.cpp's ``LLAMA_STATE_SEQ_FLAGS_*``,
    e.g. only the part that cannot be cut back), or None when llama.cpp wrote nothing or failed."""
    size = llama_cpp.llama_state_seq_get_size_ext(ctx, seq_id, flags)
    if size <= 0:
        return None
    state = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    written = llama_cpp.llama_state_seq_get_data_ext(ctx, _pointer(state), size, seq_id, flags)
    return state if written == size else None


def load_state(ctx: llama_cpp.llama_context_p, seq_id: int, state: np.ndarray, flags: int = 0) -> bool:
    """Copy ``state`` (saved with the same ``flags``) back into sequence ``seq_id``."""
    return llama_cpp.llama_state_seq_set_data_ext(ctx, _pointer(state), state.nbytes, seq_id, flags) == state.nbytes


def _pointer(array: np.ndarray) -> ctypes.POINTER(ctypes.c_uint8):
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
