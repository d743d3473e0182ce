"""`vramsupply serve`: the lifecycle that ties the hub, the engine and the HTTP server together.

``run_serve`` goes through these phases, in order:

1. resolve the model: a local .gguf path, or an ``org/model`` id the hub downloads and verifies;
2. listen at once, so health checks get 503 "loading" instead of a refused connection;
3. load the engine in a worker thread (llama.cpp loading blocks and cannot be interrupted);
4. ready: attach the engine to the server and print one ready line with the URL;
5. serve until SIGINT/SIGTERM, showing a live status in a terminal or periodic log lines otherwise;
6. drain: stop accepting, let in-flight requests finish for up to ``drain_timeout`` seconds, close
   the engine. A second signal skips the wait.

Under systemd (``Type=notify``) each phase is also told to the service manager: ``STATUS=`` lines,
``READY=1`` at step 4, ``STOPPING=1`` at step 6, and ``WATCHDOG=1`` pings from the event loop throughout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from vramsupply.config import Settings
from vramsupply.engine import Engine, EngineError, EngineOptions, EngineStats
from vramsupply.hub import HubError, LocalModel, prepare_configured
from vramsupply.logging import configure_logging, interactive
from vramsupply.platform import MarketplaceSession, OfferError, PlatformError
from vramsupply.server import ApiServer, create_app
from vramsupply.service import SystemdNotifier

if TYPE_CHECKING:
    from vramsupply.devplatform import DevPlatform

log = logging.getLogger(__name__)

STATUS_REFRESH_SECONDS = 0.5
STATUS_LOG_SECONDS = 60.0
SYSTEMD_STATUS_SECONDS = 2.0
THROUGHPUT_WINDOW_SECONDS = 5.0


class ServeError(Exception):
    """Why serving could not start, in one line for the CLI."""


async def run_serve(settings: Settings, *, demo: bool = False) -> None:
    """Serve until a stop signal, then drain and return; raises ServeError when it cannot start.

    ``demo`` runs the reference platform in this process, registers with it and buys one answer
    through it before serving on.
    """
    configure_logging(settings.log_level, [settings.endpoint_token, settings.api_key])
    notifier = SystemdNotifier()
    watchdog = notifier.start_watchdog()
    try:
        if not demo:
            await serve_until_stopped(settings, notifier)
            return
        from vramsupply.devplatform.demo import demo_marketplace

        async with demo_marketplace(settings) as (demo_settings, platform):
            await serve_until_stopped(demo_settings, notifier, platform)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        notifier.close()


async def serve_until_stopped(settings: Settings, notifier: SystemdNotifier, demo_platform: DevPlatform | None = None) -> None:
    terminal = interactive()
    market = prepare_marketplace(settings, local_ok=demo_platform is not None)
    notifier.status(f"preparing {settings.model} (downloading it unless cached)")
    model = await resolve_model(settings)

    endpoint_token = settings.endpoint_token.get_secret_value() if settings.endpoint_token else None
    if market is not None:
        endpoint_token = market.endpoint_token
    app = create_app(model.model_id, aliases=model_aliases(model), endpoint_token=endpoint_token, max_body_bytes=settings.max_body_bytes)
    access_log = None if terminal else logging.getLogger("vramsupply.access")
    server = ApiServer(app, settings.host, settings.port, drain_timeout=settings.drain_timeout, access_log=access_log)
    await listen(server)

    with StopSignals() as stop:
        engine: Engine | None = None
        try:
            log.info("loading %s from %s", model.model_id, model.path)
            notifier.status(f"loading {model.model_id}")
            engine = await load_engine(engine_options(settings, model))
            if stop.requested:
                return
            server.state.attach(engine)
            print(ready_line(model.model_id, server.url, engine), flush=True)
            notifier.ready(f"serving {model.model_id} at {server.url}/v1 ({engine.parallel} slots)")
            if market is not None:
                start_marketplace(market, model, engine)
            if demo_platform is not None and market is not None:
                await buy_demo_answer(demo_platform, market, model.model_id)
            status = TerminalStatus(Console(), model.model_id, server.url) if terminal else LogStatus()
            reporters = [status.run(engine, stop)]
            if notifier.enabled:
                reporters.append(report_to_systemd(notifier, model.model_id, engine, market, stop))
            await asyncio.gather(*reporters)
        finally:
            notifier.stopping("stopping: draining in-flight requests")
            if market is not None:
                await market.drain()
            await drain(server, engine, settings.drain_timeout)
            if market is not None:
                await market.stop()


def prepare_marketplace(settings: Settings, *, local_ok: bool) -> MarketplaceSession | None:
    """Refuse, before any download or load, a configuration that could never register."""
    try:
        return MarketplaceSession.prepare(settings, local_ok=local_ok)
    except (PlatformError, OfferError) as exc:
        raise ServeError(str(exc)) from None


def start_marketplace(market: MarketplaceSession, model: LocalModel, engine: Engine) -> None:
    """Print the offer and what it earns, then register and heartbeat in the background."""
    try:
        lines = market.summary(model, engine.n_ctx)
    except OfferError as exc:
        raise ServeError(str(exc)) from None
    for line in lines:
        if line.startswith("warning: "):
            log.warning("%s", line.removeprefix("warning: "))
        else:
            print(line, flush=True)
    market.start(model, engine.n_ctx, engine.stats)


async def buy_demo_answer(platform: DevPlatform, market: MarketplaceSession, model_id: str) -> None:
    from vramsupply.devplatform.demo import DemoError, buy_one_answer

    try:
        await buy_one_answer(platform, market, model_id, lambda text: print(text, end="", flush=True))
    except DemoError as exc:
        raise ServeError(str(exc)) from None


async def resolve_model(settings: Settings) -> LocalModel:
    """The hub shows download progress as a bar on a terminal and as plain lines in logs (journald)."""
    if not settings.model:
        raise ServeError("no model to serve: pass --model ./file.gguf (or org/model) or set VRAM_SUPPLY_MODEL")
    try:
        return await asyncio.to_thread(prepare_configured, settings.model, settings, progress=True)
    except HubError as exc:
        raise ServeError(str(exc)) from None


def model_aliases(model: LocalModel) -> list[str]:
    """Other names a request's ``model`` may use: the GGUF repo and file (the GGUF's own name is added on load)."""
    names = [model.path.name, model.path.stem]
    if model.repo_id:
        names.append(model.repo_id)
    return names


def engine_options(settings: Settings, model: LocalModel) -> EngineOptions:
    try:
        return EngineOptions(
            model_path=model.path,
            n_ctx=settings.context_length,
            parallel=settings.parallel,
            n_gpu_layers=settings.n_gpu_layers,
            n_batch=settings.n_batch,
            n_ubatch=settings.n_ubatch,
            flash_attention=settings.flash_attention.value,
            threads=settings.threads,
            max_queue=settings.max_queue,
        )
    except ValueError as exc:
        raise ServeError(f"invalid engine settings: {exc}") from None


async def listen(server: ApiServer) -> None:
    try:
        await server.start()
    except OSError as exc:
        raise ServeError(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None


async def load_engine(options: EngineOptions) -> Engine:
    try:
        return await asyncio.to_thread(Engine.load, options)
    except EngineError as exc:
        raise ServeError(f"cannot load the model: {exc}") from None


def ready_line(model_id: str, url: str, engine: Engine) -> str:
    return f"vramsupply ready: serving {model_id} at {url}/v1 ({engine.parallel} slots, {engine.n_ctx}-token context)"


async def drain(server: ApiServer, engine: Engine | None, drain_timeout: float) -> None:
    """Stop accepting, give in-flight requests ``drain_timeout`` seconds, then free the engine."""
    stats = engine.stats() if engine is not None else None
    in_flight = stats.slots_busy + stats.queue_depth if stats is not None else 0
    if in_flight:
        log.info("stopping: waiting up to %gs for %d in-flight request(s)", drain_timeout, in_flight)
    else:
        log.info("stopping")
    try:
        await server.stop()
    finally:
        if engine is not None:
            engine.close()
    log.info("stopped")


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
    stats: EngineStats
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

    async def run(self, engine: Engine, stop: StopSignals) -> None:
        throughput = Throughput()
        with Live(console=self._console, auto_refresh=False, transient=True) as live:
            while not stop.requested:
                stats = engine.stats()
                live.update(self._render(Snapshot(stats, throughput.update(stats.completion_tokens_total))), refresh=True)
                await _wait(stop, STATUS_REFRESH_SECONDS)

    def _render(self, snapshot: Snapshot) -> Group:
        uptime = timedelta(seconds=int(time.monotonic() - self._started))
        header = Text.assemble(("vramsupply ", "bold"), (self._model_id, "cyan"), "  ", (f"{self._url}/v1", "underline"))
        return Group(header, Text(snapshot.line()), Text(f"up {uptime} · Ctrl-C to stop", style="dim"))


async def report_to_systemd(
    notifier: SystemdNotifier, model_id: str, engine: Engine, market: MarketplaceSession | None, stop: StopSignals
) -> None:
    """Keep `systemctl status` current: load, throughput and where registration stands."""
    throughput = Throughput(window=SYSTEMD_STATUS_SECONDS * 2)
    while True:
        stats = engine.stats()
        line = f"serving {model_id}: {Snapshot(stats, throughput.update(stats.completion_tokens_total)).line()}"
        if market is not None and market.phase is not None:
            line += f"; marketplace: {market.phase.value}"
        notifier.status(line)
        if await _wait(stop, SYSTEMD_STATUS_SECONDS):
            return


class LogStatus:
    """Plain log lines for journald or a pipe: a status line every minute while there is traffic."""

    async def run(self, engine: Engine, stop: StopSignals) -> None:
        throughput = Throughput(window=STATUS_LOG_SECONDS)
        stats = engine.stats()
        last_requests = stats.requests_total
        throughput.update(stats.completion_tokens_total)
        while not await _wait(stop, STATUS_LOG_SECONDS):
            stats = engine.stats()
            tokens_per_second = throughput.update(stats.completion_tokens_total)
            if stats.requests_total != last_requests or stats.slots_busy:
                log.info("%s", Snapshot(stats, tokens_per_second).line())
            last_requests = stats.requests_total


async def _wait(stop: StopSignals, seconds: float) -> bool:
    """Sleep up to ``seconds``; True as soon as a stop was requested."""
    try:
        await asyncio.wait_for(stop.event.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True
