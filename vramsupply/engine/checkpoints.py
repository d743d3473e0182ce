"""Checkpoints of a recurrent state near the end of each prompt, so the next turn of a chat need
not prefill its whole history again.

A recurrent state (Mamba, RWKV, and the linear-attention layers of hybrid models such as Qwen3.5)
is one state per sequence, folded over every token so far: unlike attention's KV cells it cannot
be cut back to an earlier position. A slot that answered a question therefore holds a state
after the prompt *and* the answer, and is reusable only by a prompt that starts with all of it.
The next turn of a chat rarely does: a thinking model's chat template drops the reasoning from
earlier turns (Qwen3's does), and many templates render the generation prompt differently from
the same turn in the history. Every turn then prefilled the whole conversation again, at a cost
that grows with the history.

So, as llama-server does (its context checkpoints), a prompt of at least
``MIN_CHECKPOINT_TOKENS`` is prefilled up to ``CHECKPOINT_TAIL`` tokens before its end, the state
that cannot be cut back is copied to host memory there (``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``:
the recurrent part only; a hybrid model's attention KV stays in the cache), and then the rest is
prefilled. A later prompt that shares at least those tokens gets the copy put back, its
attention KV cut back to the same position, and prefills only what follows.

The same goes for the start a new conversation shares with others: a system prompt. A prompt
that shares a prefix with another slot's sequence or a host cache entry also gets a checkpoint
where that prefix ends, so the next conversation behind the same system prompt that lands in
this slot, or restores it from the host cache, prefills only its own part. A checkpoint is as big
as one sequence's recurrent state (the memory plan's state per slot); a slot keeps at most two:
its latest prompt's, and the shortest older one it still holds (``admission.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .seq_state import load_state, save_state

log = logging.getLogger(__name__)

CHECKPOINT_TAIL = 4
"""How many tokens before a prompt's end its checkpoint is made: the next turn's prompt may
differ from this one in its last few tokens (the generation prompt, rendered differently in the
history), as llama-server assumes too."""
MIN_CHECKPOINT_TOKENS = 64
"""Shorter prompts get no checkpoint: prefilling them again costs about what a step spent on the
checkpoint would."""
_PARTIAL = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


@dataclass(frozen=True)
class Checkpoint:
    """The state that cannot be cut back, after ``tokens`` (a copy of them)."""

    tokens: np.ndarray
    state: np.ndarray

    @property
    def nbytes(self) -> int:
        """Host memory it holds."""
        return self.state.nbytes + self.tokens.nbytes

    def serves(self, prompt: np.ndarray) -> bool:
        """Whether ``prompt`` starts with these tokens and has at least one more to decode."""
        n = len(self.tokens)
        return len(prompt) > n and bool(np.array_equal(prompt[:n], self.tokens))


def checkpoint_positions(prompt_tokens: int, kept: int, shared: int) -> list[int]:
    """Where a prompt of ``prompt_tokens``, of which ``kept`` are reused, gets checkpoints, ascending:
    near its end, once it is ``MIN_CHECKPOINT_TOKENS`` long; and where the prefix it shares with
    another sequence ends (``shared``: a system prompt), when that is as far past what is reused
    (a chat's next turn shares its whole history, which its own checkpoint already covers)."""
    end = prompt_tokens - CHECKPOINT_TAIL
    wanted = {end} if prompt_tokens >= MIN_CHECKPOINT_TOKENS and kept < end else set()
    if shared - kept >= MIN_CHECKPOINT_TOKENS and shared < end:
        wanted.add(shared)
    return sorted(wanted)


def save_checkpoint(ctx: llama_cpp.llama_context_p, seq_id: int, tokens: np.ndarray) -> Checkpoint | None:
    """Copy ``seq_id``'s state that cannot be cut back; it holds ``tokens``. None when llama.cpp
    wrote nothing (a model without such state) or could not write it."""
    started = time.perf_counter()
    state = save_state(ctx, seq_id, _PARTIAL)
    if state is None:
        return None
    log.debug("slot %d: checkpoint after %d tokens (%d bytes, %.1f ms)", seq_id, len(tokens), state.nbytes,
              (time.perf_counter() - started) * 1000)
    return Checkpoint(np.array(tokens, dtype=np.int32), state)


def restore_checkpoint(
    ctx: llama_cpp.llama_context_p, memory: llama_cpp.llama_memory_t, seq_id: int, checkpoint: Checkpoint
) -> bool:
    """Put ``checkpoint`` back into ``seq_id``, which holds at least its tokens, and cut the rest of
    the sequence (a hybrid model's attention KV after them). False, with the sequence emptied,
    when llama.cpp refuses either step."""
    n = len(checkpoint.tokens)
    if load_state(ctx, seq_id, checkpoint.state, _PARTIAL) and llama_cpp.llama_memory_seq_rm(memory, seq_id, n, -1):
        return True
    llama_cpp.llama_memory_seq_rm(memory, seq_id, -1, -1)
    return False

