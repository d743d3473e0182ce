"""What the engine has served: the one source of every token count.

The usage in each answer, ``/metrics`` (read at scrape time), heartbeats and `vramsupply status`
all read these counters, so what the platform bills and what the provider sees are one number
(a request with ``n`` > 1 counts its prompt once). The scheduler thread writes them; any thread
reads a consistent ``snapshot``. The same lock guards the admission counts (requests outstanding,
slots busy) that decide when a new request gets 429.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class Counters:
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    outstanding: int = 0  # admitted and not yet finished, in a slot or waiting for one
    busy: int = 0  # in a slot
    requests_total: int = 0  # requests, not choices or prompts: one with n = 3, or a batch of 4 prompts, counts once
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_tokens_total: int = 0
    prefill_tokens_total: int = 0
    """Prompt tokens actually decoded: cached prefixes and prompts shared between choices are not."""
    draft_tokens_total: int = 0
    draft_accepted_total: int = 0
    preemptions_total: int = 0
    prompt_cache_saves_total: int = 0
    prompt_cache_skipped_saves_total: int = 0
    checkpoints_total: int = 0
    checkpoint_restores_total: int = 0
    cpu_threads: int = 0
    """The CPU threads the decode uses now (``thread_tuner.py``)."""
    thread_switches_total: int = 0
    """Times the tuner changed the decode's thread count (its probes' trial steps not counted)."""

    def add(self, **amounts: int) -> None:
        """Add to the named counters, under the lock."""
        with self.lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def totals(self) -> dict[str, int]:
        """The ``*_total`` counters; call with the lock held."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith("_total")}
