"""Prompt KV shared between sequences: the choices of one request, and prefixes held by other slots.

**Other slots' prefixes.** Marketplace traffic is mostly chats behind one system prompt, so a new
conversation's prompt often starts with hundreds of tokens that a running request already holds in
the shared KV cache. Neither the request's idle slot nor the host prompt cache may have them (a
conversation that keeps its slot never saves its prefix anywhere), and llama-server prefills them
again in that case. So at admission, when another slot holds a longer prefix of the prompt than
what the request would otherwise start from (``lender``), the new slot takes those cells as its
own prefix (``borrow_prefix``): ``llama_memory_seq_cp`` tags them with one more sequence id, no KV
is duplicated, and only the rest of the prompt is decoded. A cell's KV depends only on the tokens
before it, so the result is the same as prefilling them again. The lender may go on, end or be
paused: removing its own tags leaves the borrower's. Only in the shared cache: with a cache per
slot llama.cpp copies only whole sequences across streams.

When the host prompt cache gives the request more than the lender holds (its own earlier turns),
the restored sequence's first cells copy what the lender holds (the system prompt), so those are
swapped for the lender's too (``share_head``). Admission counts the lender's prefix as free
(``preempt.py``), so a private copy made the cache hold more than admission had planned: in a
run of the marketplace bench at 0.8 conv/s, a restored conversation took about 300 cells more
than counted, and a request was paused, to be prefilled again once another had ended.

**``n`` > 1: the choices of one request decode their shared prompt once.**

The first choice prefills the prompt as any request does. Each other choice takes a slot of its
own but waits until that prompt's KV exists, then copies it into its sequence with
``llama_memory_seq_cp`` and decodes only the last prompt token itself (sampling needs that token's
logits in its own batch row). So ``n`` choices of a P-token prompt cost P + n - 1 decoded prompt
tokens instead of n x P, and the prompt is billed once. A prompt the request asked to score (an
echo with logprobs) is scored by the first choice, and the others take its scores with its KV.

With one KV stream per slot (``kv_per_slot``, ``kv_unified=False``) llama.cpp copies across
streams only whole sequences (it asserts, aborting the process, on a partial range), so the whole
source sequence is copied and the destination trimmed back to the prompt. In the default shared
cache a partial range would do, but the same three calls are as cheap there: a copy only tags the
source's cells with one more sequence id (the choices share the prompt's cells, no KV is
duplicated) and the trim untags the tail, so one code path serves both layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp
import numpy as np

from .slots import Slot

MIN_BORROW = 1
"""Borrow a prefix whenever it spares a prompt token. Borrowing only tags cells with one more
sequence (tens of microseconds), while each token spared is a row less to prefill. It was 16, so
that a burst of short questions starting alike, the streaming bench's "Once upon a time N",
prefilled each whole once the idle slots holding those words had been parked (``preempt.py``): at
16 streams over HTTP their first tokens came at a median of 105-133 ms, llama-server's (16 slots)
at 67-78 ms; with every shared token borrowed, 49-61 ms (``bench/http_burst.py``, 3 runs of 12
waves each, wave 2's 31st session)."""


def lender(slot: Slot, prompt: np.ndarray, slots: Sequence[Slot]) -> tuple[Slot, int] | None:
    """The other slot holding the longest prefix of ``prompt`` in the KV cache, with its length."""
    offers = [(other, other.common_prefix(prompt)) for other in slots if other is not slot and other.n_cached]
    return max(offers, key=lambda offer: offer[1], default=None)


def borrow_prefix(slot: Slot, lending: Slot, shared: int, memory: object) -> None:
    """``slot`` drops what it holds and takes ``lending``'s first ``shared`` cells (the shared
    cache only; see the module docstring)."""
    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
    llama_cpp.llama_memory_seq_cp(memory, lending.seq_id, slot.seq_id, 0, shared)
    slot.adopt(lending, shared)


def share_head(slot: Slot, lending: Slot, shared: int, memory: object) -> None:
    """``slot`` holds the first ``shared`` tokens that ``lending`` holds too, in cells of its own
    (restored from the host prompt cache, or prefilled apart): it takes ``lending``'s cells for
    them instead, and its own are freed (see the module docstring)."""
    if shared < MIN_BORROW or np.array_equal(slot.cells[:shared], lending.cells[:shared]):
        return
    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, 0, shared)
    llama_cpp.llama_memory_seq_cp(memory, lending.seq_id, slot.seq_id, 0, shared)
    slot.cells[:shared] = lending.cells[:shared]


def share_prompt(slot: Slot, slots: Sequence[Slot], memory: object) -> bool:
    """Whether ``slot`` may put prompt tokens in this step's batch, copying a sibling's KV first.

    False while the sibling is still prefilling. When the sibling is gone (cancelled, or finished
    and its slot reused) the choice simply prefills on its own.
    """
    task = slot.task
    assert task is not None
    source_task = task.shares_prompt_with
    if source_task is None:
        return True
    shared = len(task.prompt) - 1
    source = next((s for s in slots if s.task is source_task), None)
    if source is None:
        task.share_scores()
        task.shares_prompt_with = None
        return True
    if source.n_cached < shared:
        return False
    task.share_scores()
    task.shares_prompt_with = None
    if task.scoring:  # (never once the source's KV is in: it was scored as it was decoded)
        return True  # this choice scores its prompt itself, from its start (``Task.scoring``)
    if shared == 0 or slot.n_cached >= shared:
        return True
    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
    llama_cpp.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, -1, -1)
    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, shared, -1)
    slot.adopt(source, shared)
    return True


def rewind_for_tile(slot: Slot, pad: int, slots: Sequence[Slot], memory: object) -> bool:
    """Drop the last ``pad`` cached tokens of ``slot`` from its sequence, to decode them again with
    the rest of its prompt in one whole flash-attention tile (``step_cost.StepCost.pays_to_pad``).
    Only cells no other sequence holds: cutting a shared cell out of this sequence would give it a
    private copy, more KV than admission counted. False, and nothing done, otherwise."""
    start = slot.n_cached - pad
    if start < 1:
        return False
    others = [s.cells[: s.n_cached] for s in slots if s is not slot and s.n_cached]
    if others and np.isin(slot.cells[start : slot.n_cached], np.concatenate(others)).any():
        return False
    if not llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, start, -1):
        return False
    slot.n_cached = start
    return True
