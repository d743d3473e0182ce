"""Keeping the tunnel tool running as a child of the agent, and following its public URL.

The supervisor starts the tool, reads every line it prints, and calls ``on_url`` whenever the
public URL it announces is new (a quick tunnel gets a fresh random address each time the tool
starts). When the tool exits, it is started again after a capped backoff that resets once a run
lasted a while, so a tool that keeps crashing is not restarted in a tight loop. Stopping sends
SIGTERM and, after a grace period, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from vramsupply.children import die_with_parent, output_lines
from vramsupply.tunnel.tools import TunnelTool

log = logging.getLogger("vramsupply.tunnel")

RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Seconds before restarting after the 1st, 2nd, … quick failure in a row (then 30 s each time)."""
STABLE_RUN_SECONDS = 60.0
"""A run this long counts as healthy: the next restart starts the backoff afresh."""
STOP_GRACE_SECONDS = 5.0


class TunnelSupervisor:
    def __init__(
        self,
        tool: TunnelTool,
        local_url: str,
        on_url: Callable[[str], None],
        *,
        delays: tuple[float, ...] = RESTART_DELAYS,
    ) -> None:
        self.tool = tool
        self.local_url = local_url
        self.command = tool.command(local_url)  # raises TunnelError, with install instructions, when missing
        self.url: str | None = None
        self.starts = 0
        self._on_url = on_url
        self._delays = delays
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        log.info("starting %s: a public URL for %s", self.tool.name, self.local_url)
        self._task = asyncio.create_task(self._run(), name=f"tunnel-{self.tool.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._terminate()

    @property
    def pid(self) -> int | None:
        return None if self._process is None or self._process.returncode is not None else self._process.pid

    async def _run(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            code = await self._run_once()
            failures = 0 if time.monotonic() - started >= STABLE_RUN_SECONDS else failures + 1
            delay = self._delays[min(failures, len(self._delays)) - 1] if failures else 0.0
            log.warning("%s exited (code %s); restarting it in %.0fs (the public URL will change)", self.tool.name, code, delay)
            await asyncio.sleep(delay)

    async def _run_once(self) -> int | None:
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,  # a killed agent takes its tunnel down with it
            )
        except OSError as exc:
            log.warning("cannot start %s: %s", self.command[0], exc.strerror or exc)
            return None
        self.starts += 1
        assert self._process.stdout is not None
        async for raw in output_lines(self._process.stdout):
            line = raw.decode(errors="replace").rstrip()
            log.debug("%s: %s", self.tool.name, line)
            url = self.tool.public_url(line)
            if url is not None and url != self.url:
                self.url = url
                log.info("%s: public URL %s", self.tool.name, url)
                self._use(url)
        return await self._process.wait()

    def _use(self, url: str) -> None:
        """Hand the new URL on; a fault there must not end the supervision of the tool."""
        try:
            self._on_url(url)
        except Exception:
            log.exception("could not use %s's new public URL %s", self.tool.name, url)

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

