"""Prompt-lookup speculative decoding: guess the next tokens from the text already in the sequence.

Summaries, edits, code changes and quotes copy long runs of their input. When the last few tokens
of a sequence also occur earlier in it (prompt or output), the tokens that followed that earlier
occurrence are a cheap guess (a *draft*) for what comes next. The scheduler decodes the pending
token and the draft in one batch, then samples row after row with the request's own sampler
chain, keeping drafted tokens for as long as the sampled token equals the drafted one. The first
mismatch is itself the correctly sampled next token, so every step yields at least one token and
the output is exactly what plain decoding gives (same chain, same RNG draws, same order); only the
number of decode calls changes. Rejected draft tokens are removed from the KV.

A draft costs a wider decode step. When one sequence decodes alone the step is bound by reading
the weights, so verifying a few extra tokens is almost free and every accepted one saves a step.
With several busy slots the step is already wide, so drafting is only done for a slot decoding
alone with nobody waiting (it "switches off by itself" under load), and a slot whose drafts keep
failing drafts less, then pauses (``DraftState``).
"""

from __future__ import annotations

import logging

import llama_cpp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .model import resolve_gpu_layers
from .types import EngineOptions

log = logging.getLogger(__name__)

NGRAM_SIZES = (3, 2)  # longest first: a longer match is a better predictor
MAX_DRAFT = 8
START_DRAFT = 2
PAUSE_STEPS = 16


def default_draft_max(options: EngineOptions, copies_prefixes: bool = True) -> int:
    """``draft_max`` as configured, or by default ``MAX_DRAFT`` on a GPU and off on a CPU; always
    off for a model whose state cannot be cut back (``Model.copies_prefixes``: recurrent and
    hybrid models), since rejected draft tokens could not be removed from it.

    On a GPU a decode step reads the weights once and leaves the compute units idle, so verify
    rows are nearly free. On a CPU each verify row costs about as much as a prompt token, and
    drafts would have to be accepted most of the time to pay (see the README's measurements).
    """
    if not copies_prefixes:
        if options.draft_max:
            log.warning("speculative decoding is off: this model keeps a recurrent state, which cannot take back rejected drafts")
        return 0
    if options.draft_max is not None:
        return options.draft_max
    on_gpu = llama_cpp.llama_supports_gpu_offload() and resolve_gpu_layers(options.n_gpu_layers) != 0
    return MAX_DRAFT if on_gpu else 0


def lookup(history: np.ndarray, max_draft: int) -> np.ndarray:
    """Up to ``max_draft`` tokens that followed the latest earlier occurrence of ``history``'s tail."""
    if max_draft <= 0:
        return history[:0]
    for size in NGRAM_SIZES:
        if len(history) <= size:
            continue
        tail = history[-size:]
        # Windows that start early enough to be followed by at least one token.
        windows = sliding_window_view(history[:-1], size)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + size
            return history[start : start + max_draft]
    return history[:0]


class DraftState:
    """One slot's adaptive draft length: it grows while drafts are accepted and pauses when they fail.

    A verify row costs real compute on a CPU (about as much as a prompt token), so a slot starts
    with short drafts, doubles the length after a fully accepted one, halves it after one that
    was rejected outright, and below one token stops drafting for ``PAUSE_STEPS`` steps.
    """

    def __init__(self, max_draft: int = MAX_DRAFT) -> None:
        self.max_draft = max_draft
        self.length = min(START_DRAFT, max_draft)
        self.paused = 0

    def reset(self) -> None:
        self.length = min(START_DRAFT, self.max_draft)
        self.paused = 0

    def wanted(self) -> int:
        """How many tokens to draft this step (0 while paused)."""
        if self.paused:
            self.paused -= 1
            return 0
        return self.length

    def update(self, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.length = min(self.max_draft, self.length * 2)
        elif accepted == 0:
            self.length //= 2
            if self.length == 0:
                self.length, self.paused = 1, PAUSE_STEPS
