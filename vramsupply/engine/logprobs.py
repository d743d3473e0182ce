"""Log-probabilities of generated tokens, and of prompt tokens, for requests that ask for them.

Computed on the scheduler thread from the logits row llama.cpp just produced for the slot: the
model's own distribution (a log-softmax of the raw logits, before any sampling parameter such as
temperature or top-k reshaped it), as OpenAI and vLLM report it. Only requests that ask pay for
this: it is one pass over ``n_vocab`` floats per token. With sampling on the device (logits never
copied to the host), such requests must still get a host logits row.

A prompt's tokens are scored the same way (``score_rows``), from the logits of every row of its
prefill chunks: row ``p`` gives the log-probability of prompt token ``p + 1``. The scheduler thread
only copies a chunk's rows out of llama.cpp's buffer (``copy_rows``: the next decode overwrites
them); a worker reduces the copy (``scoring.py``) to each token's log-probability and its ``top_n``
best, a block of rows at a time, so a long prompt never holds its prompt length times the
vocabulary in floats; and a step holds at most ``scored_rows`` such rows of logits (llama.cpp keeps
a step's logits in one buffer that only grows: 4,000 rows of a 32k vocabulary would be 512 MB of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np

MAX_TOP_LOGPROBS = 20
SCORED_LOGITS = 1 << 23
"""Logits (floats) one step may hold for scored prompt rows: 32 MiB, 256 rows of a 32k vocabulary."""
MIN_SCORED_ROWS = 16
BLOCK_LOGITS = 1 << 21
"""Logits reduced at once: a block's temporaries stay at 8 MiB each, whatever the vocabulary."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``top`` most likely tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprob(ctx: llama_cpp.llama_context_p, row: int, n_vocab: int, token: int, top_n: int) -> TokenLogprob:
    """Read logits row ``row`` of the last decode: ``token``'s log-probability and the ``top_n`` best."""
    pointer = llama_cpp.llama_get_logits_ith(ctx, row)
    logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64)
    return logprobs_from_logits(logits, token, top_n)


def logprobs_from_logits(logits: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    shifted = logits - logits.max()
    log_total = float(np.log(np.exp(shifted).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if top_n > 0:
        count = min(top_n, len(logits))
        best = np.argpartition(-shifted, count - 1)[:count]
        best = best[np.argsort(-shifted[best], kind="stable")]
        top = tuple((int(t), float(shifted[t]) - log_total) for t in best)
    return TokenLogprob(int(token), float(shifted[token]) - log_total, top)


def scored_rows(n_vocab: int) -> int:
    """How many prompt rows with logits one step may hold (``SCORED_LOGITS``)."""
    return max(MIN_SCORED_ROWS, SCORED_LOGITS // max(n_vocab, 1))


def copy_rows(ctx: llama_cpp.llama_context_p, first_row: int, count: int, n_vocab: int) -> np.ndarray:
    """A copy of logits rows ``first_row`` .. ``first_row + count - 1`` of the last decode (all with
    logits: llama.cpp keeps them contiguous, in batch order), which the next decode overwrites."""
    pointer = llama_cpp.llama_get_logits_ith(ctx, first_row)
    if not pointer:
        raise ValueError(f"llama.cpp has no logits for batch row {first_row}")
    return np.ctypeslib.as_array(pointer, shape=(count, n_vocab)).copy()


def score_rows(logits: np.ndarray, tokens: np.ndarray, top_n: int) -> list[TokenLogprob]:
    """``tokens[i]``'s log-probability and the ``top_n`` best from row ``i`` of ``logits``, as
    ``logprobs_from_logits`` computes them for one row, a block of rows at a time."""
    scores: list[TokenLogprob] = []
    block = max(1, BLOCK_LOGITS // max(logits.shape[1], 1))
    for start in range(0, len(tokens), block):
        scores += score_block(logits[start : start + block], tokens[start : start + block], top_n)
    return scores


def score_block(logits: np.ndarray, tokens: np.ndarray, top_n: int) -> list[TokenLogprob]:
    """``logprobs_from_logits`` for each row of ``logits`` (float32, left as it is) and its token,
    vectorized: the exponentials in float32 (4 times as fast as float64; their sum, and every
    difference, in float64), and the best found without partitioning whole rows (``_best``).
    A row of 32k logits takes about 0.15 ms so, where one at a time took over 1 ms."""
    peaks = logits.max(axis=1)
    exps = np.subtract(logits, peaks[:, None])
    np.exp(exps, out=exps)
    log_totals = np.log(exps.sum(axis=1, dtype=np.float64)) + peaks.astype(np.float64)
    picked = logits[np.arange(len(tokens)), tokens].astype(np.float64) - log_totals
    best = _best(logits, min(top_n, logits.shape[1])) if top_n > 0 else None
    scores = []
    for i, token in enumerate(tokens):
        top: tuple[tuple[int, float], ...] = ()
        if best is not None:
            row = best[i][np.argsort(-logits[i, best[i]], kind="stable")]
            top = tuple((int(t), float(logits[i, t]) - float(log_totals[i])) for t in row)
        scores.append(TokenLogprob(int(token), float(picked[i]), top))
    return scores


def _best(logits: np.ndarray, n: int, width: int = 64) -> np.ndarray:
    """The ``n`` highest logits' ids of each row, unordered. Rows are cut into runs of ``width``:
    the ``n`` best lie in the ``n`` runs with the highest maxima (a run holding one of them has a
    maximum at least the ``n``-th best; one holding none, at most that), so only those runs are
    partitioned, not the whole vocabulary."""
    rows, vocab = logits.shape
    if n == 1:
        return logits.argmax(axis=1)[:, None]
    if vocab <= 4 * n * width:
        return np.argpartition(-logits, n - 1, axis=1)[:, :n]
    runs = -(-vocab // width)
    padded = logits
    if runs * width > vocab:
        padded = np.concatenate([logits, np.full((rows, runs * width - vocab), -np.inf, dtype=logits.dtype)], axis=1)
    blocks = padded.reshape(rows, runs, width)
    top_runs = np.argpartition(-blocks.max(axis=2), n - 1, axis=1)[:, :n]
    candidates = blocks[np.arange(rows)[:, None], top_runs].reshape(rows, n * width)
    ids = (top_runs[:, :, None] * width + np.arange(width)).reshape(rows, n * width)
    return np.take_along_axis(ids, np.argpartition(-candidates, n - 1, axis=1)[:, :n], axis=1)
