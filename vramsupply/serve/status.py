"""How a serving agent shows its state: a live line in a terminal, log lines under a pipe or
journald, and ``STATUS=`` for `systemctl status`.

All three render the same ``Snapshot`` of the engine's counters, so they always agree.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from vramsupply import platform
from vramsupply.signals import StopSignals, wait_for_stop
from vramsupply.service import SystemdNotifier

log = logging.getLogger("vramsupply.serve")

STATUS_REFRESH_SECONDS = 0.5
STATUS_LOG_SECONDS = 60.0
SYSTEMD_STATUS_SECONDS = 2.0
THROUGHPUT_WINDOW_SECONDS = 5.0


class ServingStats(platform.ServingStats, Protocol):
    """What heartbeats report, plus the request count the status line shows (``engine.EngineStats``
    satisfies this)."""

    @property
    def requests_total(self) -> int: ...


StatsSource = Callable[[], ServingStats]


class Throughput:
    """Completion tokens per second over the last few seconds of samples."""

    def __init__(self, window: float = THROUGHPUT_WINDOW_SECONDS) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def update(self, completion_tokens_total: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._samples.append((now, completion_tokens_total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        return (last - first) / (end - start) if end > start else 0.0


@dataclass(frozen=True)
class Snapshot:
    stats: ServingStats
    tokens_per_second: float

    def line(self) -> str:
        """The status in one line, as the log and (for the service) systemd show it."""
        s = self.stats
        served = s.prompt_tokens_total + s.completion_tokens_total
        return (
            f"{s.slots_busy}/{s.slots_total} slots busy, {s.queue_depth} queued, "
            f"{self.tokens_per_second:.1f} tok/s, {served:,} tokens served ({s.requests_total:,} requests)"
        )


class TerminalStatus:
    """A compact live status for a person at a terminal."""

    def __init__(self, console: Console, model_id: str, url: str) -> None:
        self._console = console
        self._model_id = model_id
        self._url = url
        self._started = time.monotonic()

    async def run(self, stats: StatsSource, stop: StopSignals) -> None:
        throughput = Throughput()
        with Live(console=self._console, auto_refresh=False, transient=True) as live:
            while not stop.requested:
                current = stats()
                live.update(self._render(Snapshot(current, throughput.update(current.completion_tokens_total))), refresh=True)
                await wait_for_stop(stop, STATUS_REFRESH_SECONDS)

    def _render(self, snapshot: Snapshot) -> Group:
        uptime = timedelta(seconds=int(time.monotonic() - self._started))
        header = Text.assemble(("vramsupply ", "bold"), (self._model_id, "cyan"), "  ", (f"{self._url}/v1", "underline"))
        return Group(header, Text(snapshot.line()), Text(f"up {uptime} · Ctrl-C to stop", style="dim"))


class LogStatus:
    """Plain log lines for journald or a pipe: a status line every minute while there is traffic."""

    async def run(self, stats: StatsSource, stop: StopSignals) -> None:
        throughput = Throughput(window=STATUS_LOG_SECONDS)
        current = stats()
        last_requests = current.requests_total
        throughput.update(current.completion_tokens_total)
        while not await wait_for_stop(stop, STATUS_LOG_SECONDS):
            current = stats()
            tokens_per_second = throughput.update(current.completion_tokens_total)
            if current.requests_total != last_requests or current.slots_busy:
                log.info("%s", Snapshot(current, tokens_per_second).line())
            last_requests = current.requests_total


async def report_to_systemd(
    notifier: SystemdNotifier, model_id: str, stats: StatsSource, market_phase: Callable[[], str | None], stop: StopSignals
) -> None:
    """Keep `systemctl status` current: load, throughput and where registration stands."""
    throughput = Throughput(window=SYSTEMD_STATUS_SECONDS * 2)
    while True:
        current = stats()
        line = f"serving {model_id}: {Snapshot(current, throughput.update(current.completion_tokens_total)).line()}"
        phase = market_phase()
        if phase is not None:
            line += f"; marketplace: {phase}"
        notifier.status(line)
        if await wait_for_stop(stop, SYSTEMD_STATUS_SECONDS):
            return
