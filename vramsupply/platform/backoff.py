"""How long to wait before asking the platform again, shared by the client's retries and the
lifecycle's loops: our own capped exponential backoff with jitter, and the wait the platform itself
asks for in a ``Retry-After`` header.

The platform's word is read as strictly as everything else it sends (docs/platform-api.md): a
``Retry-After`` that is malformed, negative, a date already past or absurdly far off is no
instruction, and the normal backoff applies instead.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime

RETRY_AFTER_MAX_SECONDS = 86_400.0
"""A ``Retry-After`` further off than a day is a fault, not a plan: it is ignored (the backoff applies)."""
_DELTA_SECONDS = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Delay before retry ``attempt`` (0-based): ``initial * factor**attempt``, capped, then jittered.
    Keyword-only: ``Backoff(0.05, 0.2)`` once read 0.2 as the factor, not the cap, in tests whose
    retries then came ever faster.

    Jitter draws from [delay/2, delay] so many agents restarted together do not hit the platform in
    lockstep, while the wait never collapses to zero.
    """

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 60.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return (rng or random).uniform(ceiling / 2, ceiling)


def parse_retry_after(value: str | None, now: float | None = None, *, sent_at: str | None = None) -> float | None:
    """The seconds a ``Retry-After`` header asks us to wait (RFC 9110 §10.2.3: delta-seconds or an
    HTTP date); None when absent or unusable: not one of those forms, negative, a date already
    past, or further off than ``RETRY_AFTER_MAX_SECONDS``.

    A date is read against the answer's own ``Date`` header (``sent_at``) where it has a usable
    one, so that a clock of ours that is off does not stretch or drop the wait; else against
    ``now``, the wall clock.
    """
    text = (value or "").strip()
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        when = _http_date(text)
        if when is None:
            return None
        reference = _http_date(sent_at or "")
        seconds = when - (reference if reference is not None else time.time() if now is None else now)
    return seconds if 0 <= seconds <= RETRY_AFTER_MAX_SECONDS else None


def _http_date(text: str) -> float | None:
    """An HTTP date as a POSIX timestamp; None for anything else."""
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:  # "-0000": an HTTP date is always GMT
            when = when.replace(tzinfo=timezone.utc)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
