"""Stop signals for the serve lifecycle: the first asks for a drain, a second cuts it short."""

from __future__ import annotations

import asyncio
import logging
import signal

log = logging.getLogger("vramsupply.serve")


class StopSignals:
    """SIGINT/SIGTERM: the first asks for a graceful stop; a second cancels the drain and stops now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig in self.SIGNALS:
            self._loop.remove_signal_handler(sig)

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def _received(self, sig: signal.Signals) -> None:
        if not self.event.is_set():
            log.info("%s received: finishing in-flight requests (again to stop at once)", sig.name)
            self.event.set()
        elif self._task is not None:
            log.warning("%s received again: stopping without waiting", sig.name)
            self._task.cancel()


async def wait_for_stop(stop: StopSignals, seconds: float) -> bool:
    """Sleep up to ``seconds``; True as soon as a stop was requested."""
    try:
        await asyncio.wait_for(stop.event.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True
