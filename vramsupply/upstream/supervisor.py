"""Supervising a launched engine (vLLM, SGLang): start, wait until ready, watch, restart.

- **Ready** means ``/health`` answers 200 *and* one real 1-token completion succeeds: vLLM's
  ``/health`` can stay 200 after some GPU faults, and SGLang answers before warm-up ends.
- **Watch:** every few seconds ``/health`` is checked, on the client's probe connections (never
  queued behind buyers': sharing their pool, 100 long streams made a healthy vLLM look stalled and
  get restarted). The process exiting, or ``/health`` failing for ``stall_after`` seconds in a
  row, marks the front not ready (``/health`` 503, so the platform's checks see it), ends the
  requests in flight to it (``monitor.give_up``: a stopped or deadlocked engine may take its
  whole stop timeout to die, and they with it), stops the process and starts it again after a
  capped, jittered backoff that doubles with each failure and starts over only once the engine
  stayed up ``stable_after`` seconds (an engine that crashes soon after each start is not
  restarted every 2 s).
- **Unforeseen errors:** a look at the engine that fails in a way nobody foresaw counts as a
  failing ``/health`` (``monitor.refresh``); anything else that ends this loop ends serving:
  ``UpstreamBackend`` logs it with its traceback and serve exits 1 naming it.
- **Output:** every line the engine prints goes into our log with its name in front, control
  characters escaped (binary output or a terminal's escape sequences never reach the log raw).
- **Stop:** SIGTERM to the engine's process group, then SIGKILL after ``stop_timeout`` seconds; if
  the agent itself is killed, the engine gets SIGTERM from the kernel (``die_with_parent``). Its
  output is read on for ``OUTPUT_GRACE_SECONDS`` after it exited, no longer: a process it started
  in a session of its own (outside the group the signals reach) can hold the pipe open for good,
  and waiting for that held the stop, and every restart, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from vramsupply.children import die_with_parent, output_lines
from vramsupply.platform.backoff import Backoff
from vramsupply.timeouts import within
from vramsupply.upstream.client import UpstreamUnavailable, escape_controls
from vramsupply.upstream.front import FrontState
from vramsupply.upstream.launch import redacted
from vramsupply.upstream.monitor import CHECK_INTERVAL_SECONDS, STALL_AFTER_SECONDS, check_upstream, give_up, refresh, set_ready, unavailable

log = logging.getLogger("vramsupply.upstream")

RESTART_BACKOFF = Backoff(initial=2.0, cap=60.0)
READY_POLL_SECONDS = 1.0
STABLE_AFTER_SECONDS = 300.0
OUTPUT_GRACE_SECONDS = 2.0
"""How long the engine's last output is read after it exited (``EngineProcess.stop``)."""
"""An engine that served this long before failing is restarted after the shortest delay again."""


class EngineProcess:
    """One run of the engine's command, in its own process group, its output copied to our log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self._process: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        log.info("starting %s: %s", self.name, redacted(self.argv))
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot start {self.name} ({self.argv[0]}): {exc.strerror or exc}") from None
        self._exited = asyncio.create_task(self._process.wait(), name=f"{self.name}-process")
        self._pump = asyncio.create_task(self._copy_output(), name=f"{self.name}-output")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    @property
    def exited(self) -> asyncio.Task[int]:
        """Done once the process has exited (its workers may still be stopping)."""
        assert self._exited is not None
        return self._exited

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    async def _copy_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        engine_log = logging.getLogger(f"vramsupply.upstream.{self.name}")
        async for raw in output_lines(self._process.stdout):
            line = escape_controls(raw.decode("utf-8", "replace").rstrip())
            if line:
                engine_log.info("[%s] %s", self.name, line)

    async def stop(self, timeout: float) -> None:
        """SIGTERM the process group (the engine's workers too), SIGKILL what is left after ``timeout``,
        at once when ``timeout`` is 0, and as soon as this wait is cancelled (a second stop signal:
        ``UpstreamBackend.close``), so an engine deaf to SIGTERM never outlives the agent."""
        if self._process is None:
            return
        try:
            if not self.exited.done() and timeout > 0:
                self._signal(signal.SIGTERM)
                try:
                    await within(self.wait(), timeout)
                except asyncio.TimeoutError:
                    log.warning("%s did not stop within %gs; killing it", self.name, timeout)
        finally:
            self._signal(signal.SIGKILL)  # the main process is gone, or must go now; its workers must not outlive it
        await self.wait()
        await self._end_output()

    async def _end_output(self) -> None:
        """Copy what the engine wrote last, for up to ``OUTPUT_GRACE_SECONDS``, then stop reading."""
        if self._pump is None:
            return
        done, _ = await asyncio.wait({self._pump}, timeout=OUTPUT_GRACE_SECONDS)
        if not done:
            log.warning("%s exited, but a process it started still holds its output open: not reading it any more", self.name)
            self._pump.cancel()
            await asyncio.wait({self._pump})

    def _signal(self, sig: signal.Signals) -> None:
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)


class Supervisor:
    """Keeps one engine process ready behind ``state`` until ``close``."""

    def __init__(
        self,
        state: FrontState,
        engine: str,
        argv: list[str],
        *,
        ready_timeout: float,
        check_interval: float = CHECK_INTERVAL_SECONDS,
        stall_after: float = STALL_AFTER_SECONDS,
        stop_timeout: float = 30.0,
        stable_after: float = STABLE_AFTER_SECONDS,
        backoff: Backoff = RESTART_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.engine = engine
        self.argv = argv
        self.ready_timeout = ready_timeout
        self.check_interval = check_interval
        self.stall_after = stall_after
        self.stop_timeout = stop_timeout
        self.stable_after = stable_after
        self.backoff = backoff
        self.clock = clock
        self.ready = asyncio.Event()
        self.process: EngineProcess | None = None
        self.ever_ready = False
        self.last_failure = ""

    async def run(self) -> None:
        """Start, wait until ready, watch; on any failure stop the process and start it again.

        A first start that never gets ready raises instead: a missing program or a model that
        cannot load is the provider's to fix, not something a restart loop would.
        """
        failures = 0
        while True:
            self.process = EngineProcess(self.engine, self.argv)
            ready_at: float | None = None
            try:
                await self.process.start()
                await self._until_ready(self.process)
                ready_at = self.clock()
                await self._watch(self.process)
            except UpstreamUnavailable as exc:
                self.last_failure = str(exc)
                set_ready(self.state, unavailable(exc))
                if not self.ever_ready:
                    raise
            finally:
                self.ready.clear()
                await self.process.stop(self.stop_timeout)
            if ready_at is not None and self.clock() - ready_at >= self.stable_after:
                failures = 0
            delay = self.backoff.delay(failures)
            failures += 1
            log.warning("%s failed (%s); starting it again in %.0fs", self.engine, self.last_failure, delay)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Stop supervising and stop the engine (after the front has drained)."""
        if self.process is not None:
            await self.process.stop(self.stop_timeout)

    async def _until_ready(self, process: EngineProcess) -> None:
        """Poll until /health is 200 and a 1-token completion succeeds, within ``ready_timeout``."""
        deadline = self.clock() + self.ready_timeout
        set_ready(self.state, f"{self.engine} is starting")
        waiting_for = "its /health"
        while True:
            if process.exited.done():
                raise UpstreamUnavailable(f"{self.engine} exited with status {process.returncode} before it was ready")
            if await check_upstream(self.state.client, self.engine) is None:  # not listening yet is expected: no log
                try:
                    await self.state.client.complete_one_token(self.state.upstream_model)
                    break
                except UpstreamUnavailable as exc:
                    waiting_for = str(exc)
            if self.clock() > deadline:
                raise UpstreamUnavailable(f"{self.engine} was not ready within {self.ready_timeout:g}s (waiting for {waiting_for})")
            await asyncio.sleep(READY_POLL_SECONDS)
        set_ready(self.state, None)
        self.ever_ready = True
        self.ready.set()

    async def _watch(self, process: EngineProcess) -> None:
        """Return (raising) when the process exits or its health fails for ``stall_after`` seconds."""
        failing_since: float | None = None
        while True:
            done, _ = await asyncio.wait({process.exited}, timeout=self.check_interval)
            if done:
                raise UpstreamUnavailable(f"{self.engine} exited with status {process.returncode}")
            reason = await refresh(self.state, self.engine)
            if reason is None:
                failing_since = None
                continue
            failing_since = failing_since if failing_since is not None else self.clock()
            if self.clock() - failing_since >= self.stall_after:
                stalled = f"{self.engine}'s health stalled for {self.stall_after:g}s: "
                logged = stalled + getattr(reason, "logged", reason)
                give_up(self.state, f"it is being restarted ({stalled}{reason})", logged)  # not after its stop timeout
                raise UpstreamUnavailable(logged, stalled + reason)

