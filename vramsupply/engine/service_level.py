"""The service level a buyer judges a stream by, and how much of it a running stream can spare.

A buyer is served well when the first token comes within ``TTFT_TARGET_SECONDS`` of the request and
the rest at most ``TPOT_TARGET_SECONDS`` a token on average (what the marketplace bench counts as
goodput). The pacer (``pacing.py``) spends each step on the streams' next tokens plus a prompt
chunk of up to 0.16 s, which bounds the gap any stream sees. But under overload a prompt is being
prefilled in every step, so every stream gets a token every 0.16 s: in a marketplace run at 0.8
conversations a second (16 slots, 2 CPU cores) the streams that had started well slowed to 107-128
ms a token while prompts that had already missed their first-token target were prefilled beside
them, and so neither kind counted as served well; llama-server, running 4 at a time, kept its
streams at 40-90 ms.

So a stream that is still on track (first token in time, mean seconds per token within the target
so far) keeps its mean within ``TPOT_GUARD_SECONDS`` while the prompt being prefilled can no longer
answer in time anyway, even at the speed it would have alone (``step_allowance``; judged at its
speed beside the streams, a prompt just over the target yielded and so missed it for certain).
Such a prompt then goes in the steps that the on-track streams can absorb: a step of generating
rows alone is short, so each one lets the next chunk be bigger, and a prompt deferred for
``pacing.MAX_DEFER_SECONDS`` goes at full speed again. A prompt
that can still answer in time is prefilled at full speed, at the streams' expense: one buyer served
well for another.

The mean is the buyer's own measure: seconds from the first token to the latest, over the tokens
after the first. After ``n`` tokens, ``elapsed`` seconds after the first, a step of ``s`` seconds
keeps it within the guard when ``(elapsed + s) / n <= TPOT_GUARD_SECONDS``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .slots import Slot

TTFT_TARGET_SECONDS = 1.0
TPOT_TARGET_SECONDS = 0.1
TPOT_GUARD_SECONDS = 0.09
"""The mean a protected stream is held to: below the target by what a token's write and a step
that comes out slower than predicted add."""


def on_track(slot: Slot, now: float) -> bool:
    """Whether ``slot``'s stream is serving its buyer well so far: its first token came within the
    target and its mean seconds per token since are within the target."""
    task = slot.task
    if task is None or task.first_token_at is None or task.first_token_at - task.arrived > TTFT_TARGET_SECONDS:
        return False
    tokens = slot.completion_tokens
    return tokens < 2 or (now - task.first_token_at) / (tokens - 1) <= TPOT_TARGET_SECONDS


def step_allowance(slots: Iterable[Slot], now: float) -> float | None:
    """The longest next step after which every generating stream that is on track still has a mean
    within ``TPOT_GUARD_SECONDS`` (may be negative: it has none to spare); None when none is on track."""
    allowances = [
        TPOT_GUARD_SECONDS * slot.completion_tokens - (now - slot.task.first_token_at)  # type: ignore[union-attr,operator]
        for slot in slots
        if slot.generating and on_track(slot, now)
    ]
    return min(allowances, default=None)
