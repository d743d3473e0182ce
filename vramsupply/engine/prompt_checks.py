"""What a prompt must be before any work is done on it: token ids in the vocabulary, and a length
the context holds, found out as cheaply as the prompt allows.

A buyer's oversized prompt must cost little to refuse: 20 bodies of 2M token ids each (under the
4 MiB body limit) had kept the event loop for seconds while every id was checked, and 4 MiB text
prompts were tokenized whole on the threads every long prompt shares, only to be refused for their
length (``bench/oversized_requests.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .types import ContextOverflow

PROBE_CHARS_PER_TOKEN = 16
"""A text longer than this many characters per token of the context has its start tokenized first
(``refuse_far_past_context``): text runs 3-5 characters a token, so its start shows an overflow."""


def refuse_far_past_context(tokenize: Callable[[str], Sequence[int]], text: str, n_ctx: int) -> None:
    """ContextOverflow for a text whose start alone is past the context, before tokenizing it all.
    The start's last token may join the next text in the whole, so the start must hold two tokens
    more than the context."""
    probe = n_ctx * PROBE_CHARS_PER_TOKEN
    if len(text) <= probe:
        return
    count = len(tokenize(text[:probe]))
    if count > n_ctx + 1:
        raise ContextOverflow(count - 1, None, n_ctx, at_least=True)


def validated_prompt(prompt: Any, n_vocab: int) -> np.ndarray:
    """``prompt`` as token ids in the vocabulary (a ValueError saying what is wrong otherwise)."""
    try:
        tokens = np.asarray(prompt)
    except (TypeError, ValueError):
        raise ValueError("the prompt must be a list of token ids") from None
    if tokens.ndim == 1 and tokens.dtype == object and all(type(t) is int for t in prompt):  # past 64 bits
        raise ValueError(f"prompt token {next(t for t in prompt if not 0 <= t < n_vocab)} is not in the vocabulary (size {n_vocab})")
    if tokens.ndim != 1 or len(tokens) == 0 or tokens.dtype.kind not in "iu":
        raise ValueError("the prompt must be a non-empty list of integer token ids")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= n_vocab:
        bad = low if low < 0 else high
        raise ValueError(f"prompt token {bad} is not in the vocabulary (size {n_vocab})")
    return tokens.astype(np.int32)
