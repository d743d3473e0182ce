"""Keeping the tunnel tool running as a child of the agent, and following its public URL.

The supervisor starts the tool, reads every line it prints, and calls ``on_url`` whenever the
public URL it announces is new (a quick tunnel gets a fresh random address each time the tool
starts). When the tool exits, it is started again after a capped backoff that resets once a run
lasted a while, so a tool that keeps crashing is not restarted in a tight loop; once ``stop`` has
been called it is never started again.

Its exit is watched directly (``wait``), not through the end of its output: a child the tool
left behind can hold the pipe open long after the tool is gone. What it printed is its own text:
every line is logged with control characters escaped, and the last meaningful one goes with the
warning when it exits (cloudflared says why it failed, "429 Too Many Requests", only there) or
when it has printed no URL for a while, so a provider is not left waiting with nothing said. The
same words go to ``on_trouble`` (the agent's /health warnings, which `vramsupply status` shows), and
``None`` once a run announces a URL again: a provider behind NAT is on the market only through the
tunnel, and `status` said "registers once the tunnel has a public URL" while cloudflared failed.
Starting and ending its processes (a session of their own, ended as a group): ``process``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import Callable

from vramsupply.children import output_lines
from vramsupply.display import plain
from vramsupply.tunnel.process import ToolProcess, end_group, signal_group, spawn
from vramsupply.tunnel.tools import TunnelTool

log = logging.getLogger("vramsupply.tunnel")

RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Seconds before restarting after the 1st, 2nd, … quick failure in a row (then 30 s each time)."""
STABLE_RUN_SECONDS = 60.0
"""A run this long counts as healthy: the next restart starts the backoff afresh."""
STOP_GRACE_SECONDS = 5.0
URL_WARNING_SECONDS = 60.0
"""A run that has printed no public URL this long gets one warning, with the last line it printed."""
OUTPUT_AFTER_EXIT_SECONDS = 2.0
"""After the tool and what it left behind are gone, how long its last output may take to be read."""
LINE_CHARS = 200
"""The most characters of one of the tool's lines quoted in a warning."""
DEBUG_LINE_CHARS = 2000
_TIMESTAMP = re.compile(r"^\S*\d:\d\d\S*\s+")  # cloudflared's "2026-12-01T10:00:00Z "
_LEVEL = re.compile(r"^[A-Z]{3,5}\s+")  # "INF ", "ERR "
_WORDS = re.compile(r"[^\W_]")


class TunnelSupervisor:
    def __init__(
        self,
        tool: TunnelTool,
        local_url: str,
        on_url: Callable[[str], None],
        *,
        on_trouble: Callable[[str | None], None] = lambda trouble: None,
        delays: tuple[float, ...] = RESTART_DELAYS,
        url_warning_after: float = URL_WARNING_SECONDS,
    ) -> None:
        self.tool = tool
        self.local_url = local_url
        self.command = tool.command(local_url)  # raises TunnelError, with install instructions, when missing
        self.url: str | None = None
        self.starts = 0
        self._on_url = on_url
        self._on_trouble = on_trouble
        self._delays = delays
        self._url_warning_after = url_warning_after
        self._process: ToolProcess | None = None
        self._reader: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_line: str | None = None
        self._url_this_run = False

    def start(self) -> None:
        log.info("starting %s: a public URL for %s", self.tool.name, self.local_url)
        self._task = asyncio.create_task(self._run(), name=f"tunnel-{self.tool.name}")

    async def stop(self) -> None:
        """Stop supervising and end the tool: SIGTERM, SIGKILL after a grace period or at once when cancelled."""
        self._stopping = True
        task, self._task = self._task, None
        grace = STOP_GRACE_SECONDS
        try:
            if task is not None:
                task.cancel()
                await asyncio.wait({task})  # our own cancellation ("stop now") still propagates
                if not task.cancelled() and task.exception() is not None:
                    log.error("supervising %s failed", self.tool.name, exc_info=task.exception())
        except asyncio.CancelledError:
            grace = 0.0  # "stop now": no grace period either
            raise
        finally:
            await self._terminate(grace)

    @property
    def pid(self) -> int | None:
        return None if self._process is None or self._process.returncode is not None else self._process.pid

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            ended = await self._run_once()
            if self._stopping:
                return
            failures = 0 if time.monotonic() - started >= STABLE_RUN_SECONDS else failures + 1
            delay = self._delays[min(failures, len(self._delays)) - 1] if failures else 0.0
            change = " (the public URL will change)" if self.url is not None else ""
            self._trouble(f"{self.tool.name} {ended}; restarting it in {delay:.0f}s{change}")
            await asyncio.sleep(delay)

    async def _run_once(self) -> str:
        """Run the tool once, following its output; how it ended, in words."""
        self._last_line, self._url_this_run = None, False
        try:
            process = await spawn(self.command)
        except OSError as exc:
            return f"could not be started ({self.command[0]}: {exc.strerror or exc})"
        self._process = process
        self.starts += 1
        self._reader = asyncio.create_task(self._follow(process))
        quiet = asyncio.get_running_loop().call_later(self._url_warning_after, self._warn_no_url)
        try:
            code = await process.wait()
        finally:
            quiet.cancel()
        # What it left behind goes too (it may hold the pipe open); then its last lines are read.
        signal_group(process, signal.SIGKILL)
        await self._end_reading(OUTPUT_AFTER_EXIT_SECONDS)
        self._process = None
        return f"exited ({exit_status(code)}){self._last_words()}"

    async def _follow(self, process: ToolProcess) -> None:
        async for raw in output_lines(process.output):
            line = raw.decode(errors="replace").strip()
            log.debug("%s: %s", self.tool.name, plain(line, DEBUG_LINE_CHARS))
            self._last_line = meaningful(line) or self._last_line
            url = self.tool.public_url(line)
            if url is not None:
                self._url_this_run = True
                self._tell(None)
                if url != self.url:
                    self.url = url
                    log.info("%s: public URL %s", self.tool.name, url)
                    self._use(url)

    async def _end_reading(self, timeout: float) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            return
        try:
            await asyncio.wait({reader}, timeout=timeout)
        finally:
            reader.cancel()

    def _use(self, url: str) -> None:
        """Hand the new URL on; a fault there must not end the supervision of the tool."""
        try:
            self._on_url(url)
        except Exception:
            log.exception("could not use %s's new public URL %s", self.tool.name, url)

    def _warn_no_url(self) -> None:
        if not self._url_this_run:
            self._trouble(f"{self.tool.name} has printed no public URL in {self._url_warning_after:.0f}s; registering waits for one{self._last_words()}")

    def _trouble(self, words: str) -> None:
        log.warning("%s", words)
        self._tell(words)

    def _tell(self, trouble: str | None) -> None:
        """Hand on what is wrong (None: nothing); a fault there must not end the supervision."""
        try:
            self._on_trouble(trouble)
        except Exception:
            log.exception("could not report %s's state", self.tool.name)

    def _last_words(self) -> str:
        if self._last_line is None:
            return "; it has printed nothing"
        return f'; its last line: "{plain(self._last_line, LINE_CHARS)}"'

    async def _terminate(self, grace: float) -> None:
        process, self._process = self._process, None
        try:
            if process is not None:
                await end_group(process, grace)
        finally:
            await self._end_reading(0)


def meaningful(line: str) -> str | None:
    """``line`` without its timestamp, unless it says nothing (blank, or a box's border)."""
    text = _TIMESTAMP.sub("", line, count=1)
    return text if _WORDS.search(_LEVEL.sub("", text, count=1)) else None


def exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"code {code}"
