"""The measured capacity a running agent offers, kept up to date with ``bench.json``.

The README says capacity goes "in every heartbeat"; a `vramsupply bench` run while the agent serves
(or one the provider runs again after a driver update) saves a new result, which the agent read
only at start. So each heartbeat looks at bench.json's modification stamp (a ``stat``, nothing
more), reads the file again only when it changed, and offers the served model's result from then
on, saying so in one line when it differs from what was offered (another model's result changing
the file changes nothing). The reading is serve's (``throughput.store``, one model and quant); this
module only knows when to ask and how to offer the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from vramsupply.config.paths import file_stamp
from vramsupply.platform import api

log = logging.getLogger("vramsupply.platform")


class MeasuredCapacity(Protocol):
    """A stored `vramsupply bench` result (``throughput.Capacity`` satisfies this)."""

    @property
    def single_stream_tokens_per_second(self) -> float: ...
    @property
    def all_slots_tokens_per_second(self) -> float: ...
    @property
    def parallel(self) -> int: ...
    @property
    def measured_at(self) -> float: ...


def offered_capacity(measured: MeasuredCapacity | None) -> api.Capacity | None:
    """What the platform is told of ``measured``; None for none, or for a result that is no measurement."""
    if measured is None:
        return None
    try:  # a hand-edited bench.json may hold what JSON cannot carry (Infinity) or no time at all
        return api.Capacity(
            single_stream_tokens_per_second=measured.single_stream_tokens_per_second,
            all_slots_tokens_per_second=measured.all_slots_tokens_per_second,
            slots=measured.parallel,
            measured_at=datetime.fromtimestamp(measured.measured_at, timezone.utc).isoformat(timespec="seconds"),
        )
    except (ValueError, OverflowError, OSError):
        log.warning("the stored `vramsupply bench` result for this model is no measurement; offering without capacity: run `vramsupply bench` again")
        return None


def describe(capacity: api.Capacity | None) -> str:
    if capacity is None:
        return "none"
    return (
        f"{capacity.single_stream_tokens_per_second:,.1f} tok/s for one request, {capacity.all_slots_tokens_per_second:,.1f} tok/s "
        f"with {capacity.slots} slots busy (measured {capacity.measured_at})"
    )


class CapacityWatch:
    """``read()``: the served model's stored result (or None), read from ``path``."""

    def __init__(self, path: Path, read: Callable[[], MeasuredCapacity | None]) -> None:
        self._path = path
        self._read = read
        self._stamp = file_stamp(path)
        self.capacity = offered_capacity(read())

    def refresh(self) -> bool:
        """Whether ``capacity`` changed since it was last offered (said in one line); reads the file only when it was written."""
        stamp = file_stamp(self._path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        capacity = offered_capacity(self._read())
        if capacity == self.capacity:
            return False
        log.info("the measured capacity in %s changed: %s (was %s); heartbeats carry it from now on", self._path, describe(capacity), describe(self.capacity))
        self.capacity = capacity
        return True

