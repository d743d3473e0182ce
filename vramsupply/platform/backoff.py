"""Capped exponential backoff with jitter, shared by the client's retries and the lifecycle's loops."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``attempt`` (0-based): ``initial * factor**attempt``, capped, then jittered.

    Jitter draws from [delay/2, delay] so many agents restarted together do not hit the platform in
    lockstep, while the wait never collapses to zero.
    """

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return (rng or random).uniform(ceiling / 2, ceiling)
