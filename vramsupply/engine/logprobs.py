"""Log-probabilities of generated tokens, for requests that ask for them.

Computed on the scheduler thread from the logits row llama.cpp just produced for the slot: the
model's own distribution (a log-softmax of the raw logits, before any sampling parameter such as
temperature or top-k reshaped it), as OpenAI and vLLM report it. Only requests that ask pay for
this: it is one pass over ``n_vocab`` floats per token. With sampling on the device (logits never
copied to the host), such requests must still get a host logits row.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np

MAX_TOP_LOGPROBS = 20


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
