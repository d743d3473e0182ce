"""``n`` > 1: the choices of one request decode their shared prompt once.

The first choice prefills the prompt as any request does. Each other choice takes a slot of its
own but waits until that prompt's KV exists, then copies it into its sequence with
``llama_memory_seq_cp`` and decodes only the last prompt token itself (sampling needs that token's
logits in its own batch row). So ``n`` choices of a P-token prompt cost P + n - 1 decoded prompt
tokens instead of n x P, and the prompt is billed once.

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

from .slots import Slot


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
        task.shares_prompt_with = None
        return True
    if source.n_cached < shared:
        return False
    task.shares_prompt_with = None
    if shared == 0 or slot.n_cached >= shared:
        return True
    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
    llama_cpp.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, -1, -1)
    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, shared, -1)
    slot.n_cached = 0
    slot.record(task.prompt[:shared])
    return True
