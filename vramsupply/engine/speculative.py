"""Prompt-lookup speculative decoding: guess the next tokens from the text already in the sequence.

Summaries, edits, code changes and quotes copy long runs of their input. When the last few tokens
of a sequence also occur earlier in it (prompt or output), the tokens that followed that earlier
occurrence are a cheap guess (a *draft*) for what comes next. The scheduler decodes the pending
token and the draft in one batch, then samples row after row with the request's own sampler
chain, keeping drafted tokens for as long as the sampled token equals the drafted one. The first
mismatch is itself the correctly sampled next token, so every step yields at least one token and
the output is exactly what plain decoding gives (same chain, same RNG draws, same order); only the
number of decode calls changes. Rejected draft tokens are removed from the KV.

A draft costs a wider decode step. When one sequence decodes alone the step should be bound by
reading the weights, so verifying a few extra tokens should be almost free and every accepted one
saves a step; measured, it did not pay on a CPU nor on an H200 (``default_draft_max``), so it is
opt-in (``--draft-max``). With several busy slots the step is already wide, so drafting is only
done for a slot decoding alone with nobody waiting (it "switches off by itself" under load), and a
slot whose drafts keep failing drafts less, then pauses (``DraftState``).
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .types import EngineOptions

log = logging.getLogger(__name__)

NGRAM_SIZES = (3, 2)  # longest first: a longer match is a better predictor
MAX_DRAFT = 8
START_DRAFT = 2
PAUSE_STEPS = 16


def default_draft_max(options: EngineOptions, copies_prefixes: bool = True) -> int:
    """``draft_max`` as configured, off (0) by default; always off for a model whose state cannot
    be cut back (``Model.copies_prefixes``: recurrent and hybrid models), since rejected draft
    tokens could not be removed from it.

    Off by default on a GPU too, as in llama-server: on an H200 it cost a lone request 23 % of its
    tok/s in the GPU bench (``bench/results/gpu-2026-12-04-first-run.json``; the README's
    "Speculative decoding"). The likely cause, from llama.cpp's code, not measured apart: a step with drafted
    rows differs in shape from the plain one-row step, so llama.cpp builds its graph again and
    CUDA replays no captured graph for it. On a CPU each verify row costs about as much as a
    prompt token. ``--draft-max`` turns it on for input-grounded workloads.
    """
    if not copies_prefixes:
        if options.draft_max:
            log.warning("speculative decoding is off: this model keeps a recurrent state, which cannot take back rejected drafts")
        return 0
    return options.draft_max or 0


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
