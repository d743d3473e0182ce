"""`vramsupply serve`: the lifecycle that ties the hub, the engine and the HTTP server together.

``run_serve`` goes through these phases, in order:

1. resolve the model: a local .gguf path, or an ``org/model`` id the hub downloads and verifies
   (for an upstream engine: the names it serves the model under);
2. listen at once, so health checks get 503 "loading" instead of a refused connection;
3. start the engine (``serve.backend``, the engine seam): load llama.cpp in a worker thread, or
   launch vLLM/SGLang, or connect to a running server, until it is ready;
4. ready: print one ready line with the URL, then register with the platform;
5. serve until SIGINT/SIGTERM, showing a live status in a terminal or periodic log lines otherwise;
6. drain: stop accepting, let in-flight requests finish for up to ``drain_timeout`` seconds, close
   the engine (a launched one is stopped). A second signal skips the wait.

Under systemd (``Type=notify``) each phase is also told to the service manager: ``STATUS=`` lines,
``READY=1`` at step 4, ``STOPPING=1`` at step 6, and ``WATCHDOG=1`` pings from the event loop throughout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from rich.console import Console

from vramsupply.config import EngineKind, Settings
from vramsupply.logging import configure_logging, interactive
from vramsupply.platform import MarketplaceSession, OfferError, PlatformError, price_summary
from vramsupply.platform.offer import ModelIdentity
from vramsupply.serve.backend import Backend, LlamaCppBackend
from vramsupply.serve.hooks import ServeHook
from vramsupply.serve.options import ServeError, endpoint_token_of, market_options, upstream_options
from vramsupply.serve.provider import ProviderSide
from vramsupply.serve.signals import StopSignals
from vramsupply.serve.status import LogStatus, TerminalStatus, report_to_systemd
from vramsupply.server import ApiServer
from vramsupply.service import SystemdNotifier

log = logging.getLogger("vramsupply.serve")
T = TypeVar("T")


async def run_serve(settings: Settings, *, hook: ServeHook | None = None) -> None:
    """Serve until a stop signal, then drain and return; raises ServeError when it cannot start.

    ``hook`` (``--demo``) runs around serving and acts once the agent is ready.
    """
    configure_logging(settings.log_level, [settings.endpoint_token, settings.api_key, settings.upstream_api_key])
    notifier = SystemdNotifier()
    watchdog = notifier.start_watchdog()
    try:
        if hook is None:
            await serve_until_stopped(settings, notifier)
            return
        async with hook.around(settings) as hooked_settings:
            await serve_until_stopped(hooked_settings, notifier, hook)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        notifier.close()


async def serve_until_stopped(settings: Settings, notifier: SystemdNotifier, hook: ServeHook | None = None) -> None:
    terminal = interactive()
    local_platform = hook is not None and hook.local_endpoint_ok
    market = prepare_marketplace(settings, local_ok=local_platform)
    provider = ProviderSide(settings, market, local_platform=local_platform)
    backend = choose_backend(settings)
    if backend.kind == EngineKind.llama_cpp.value:
        notifier.status(f"preparing {settings.model} (downloading it unless cached)")
    else:
        notifier.status(f"preparing the {backend.kind} engine")
    model = await engine_step(backend.prepare())
    provider.model_known(model)

    endpoint_token = market.endpoint_token if market is not None else endpoint_token_of(settings)
    app = backend.create_app(endpoint_token, settings.max_body_bytes)
    access_log = None if terminal else logging.getLogger("vramsupply.access")
    server = ApiServer(app, settings.host, settings.port, drain_timeout=settings.drain_timeout, access_log=access_log)
    await listen(server)
    provider.listening(server)

    with StopSignals() as stop:
        try:
            notifier.status(f"loading {model.model_id}")
            if not await engine_step(backend.start(stop.event)):
                return
            await go_live(backend, model, server.url, notifier, market, hook)
            status = TerminalStatus(Console(), model.model_id, server.url) if terminal else LogStatus()
            reporters = [status.run(backend.stats, stop)]
            if notifier.enabled:
                reporters.append(report_to_systemd(notifier, model.model_id, backend.stats, lambda: market_phase(market), stop))
            await asyncio.gather(*reporters)
        finally:
            notifier.stopping("stopping: draining in-flight requests")
            if market is not None:
                await market.drain()
            await drain(server, backend, settings.drain_timeout)
            await provider.drained(server)
            if market is not None:
                await market.stop()
            await provider.stop()


async def go_live(
    backend: Backend, model: ModelIdentity, url: str, notifier: SystemdNotifier, market: MarketplaceSession | None, hook: ServeHook | None
) -> None:
    """The engine is ready: say so, then offer it to the market (and let ``--demo`` buy from it)."""
    print(backend.ready_line(url), flush=True)
    notifier.ready(f"serving {model.model_id} at {url}/v1 ({backend.slots} slots)")
    if market is not None:
        start_marketplace(market, model, backend)
        if hook is not None:
            await hook.on_ready(market, model.model_id)


async def engine_step(step: Awaitable[T]) -> T:
    """An upstream engine's configuration errors reach the CLI as one line, like the engine's own."""
    from vramsupply.upstream import UpstreamError

    try:
        return await step
    except UpstreamError as exc:
        raise ServeError(str(exc)) from None


def choose_backend(settings: Settings) -> Backend:
    """The engine seam: our llama.cpp engine, or our front before an upstream server."""
    if settings.engine is EngineKind.llama_cpp:
        return LlamaCppBackend(settings)
    from vramsupply.upstream import UpstreamBackend

    return UpstreamBackend(upstream_options(settings))


def prepare_marketplace(settings: Settings, *, local_ok: bool) -> MarketplaceSession | None:
    """Refuse, before any download or load, a configuration that could never register."""
    if settings.no_register:
        return None
    try:
        return MarketplaceSession.prepare(market_options(settings, local_ok=local_ok))
    except (PlatformError, OfferError) as exc:
        raise ServeError(str(exc)) from None


def start_marketplace(market: MarketplaceSession, model: ModelIdentity, backend: Backend) -> None:
    """Print the offer and what it earns, log its warnings, then register and heartbeat in the background."""
    if market.waiting_for_url:
        options = market.options
        print(f"offering {model.model_id} through a {options.tunnel} tunnel on {options.platform_url}: registering once it has a public URL", flush=True)
        print(price_summary(options.input_price, options.output_price), flush=True)
        market.start_when_reachable(model, backend.n_ctx, backend.stats)
        return
    try:
        offer = market.offer(model, backend.n_ctx)
    except OfferError as exc:
        raise ServeError(str(exc)) from None
    for line in offer.summary():
        print(line, flush=True)
    for warning in offer.warnings:
        log.warning("%s", warning)
    market.start(offer, backend.stats)


def market_phase(market: MarketplaceSession | None) -> str | None:
    phase = market.phase if market is not None else None
    return phase.value if phase is not None else None


async def listen(server: ApiServer) -> None:
    try:
        await server.start()
    except OSError as exc:
        raise ServeError(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None


async def drain(server: ApiServer, backend: Backend, drain_timeout: float) -> None:
    """Stop accepting, give in-flight requests ``drain_timeout`` seconds, then free the engine."""
    in_flight = backend.in_flight()
    if in_flight:
        log.info("stopping: waiting up to %gs for %d in-flight request(s)", drain_timeout, in_flight)
    else:
        log.info("stopping")
    try:
        await server.stop()
    finally:
        await backend.close()
    log.info("stopped")
