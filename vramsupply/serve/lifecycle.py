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

from rich.console import Console

from vramsupply.config import Settings
from vramsupply.engine import Engine, EngineError, EngineOptions
from vramsupply.hub import HubError, LocalModel, prepare_configured
from vramsupply.logging import configure_logging, interactive
from vramsupply.platform import MarketplaceSession, OfferError, PlatformError
from vramsupply.serve.hooks import ServeHook
from vramsupply.serve.options import ServeError, endpoint_token_of, engine_options, market_options
from vramsupply.serve.signals import StopSignals
from vramsupply.serve.status import LogStatus, TerminalStatus, report_to_systemd
from vramsupply.server import ApiServer, create_app
from vramsupply.service import SystemdNotifier

log = logging.getLogger("vramsupply.serve")


async def run_serve(settings: Settings, *, hook: ServeHook | None = None) -> None:
    """Serve until a stop signal, then drain and return; raises ServeError when it cannot start.

    ``hook`` (``--demo``) runs around serving and acts once the agent is ready.
    """
    configure_logging(settings.log_level, [settings.endpoint_token, settings.api_key])
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
    market = prepare_marketplace(settings, local_ok=hook is not None and hook.local_endpoint_ok)
    notifier.status(f"preparing {settings.model} (downloading it unless cached)")
    explicit = set(settings.model_fields_set)
    settings = await fit_to_memory(settings, explicit)
    model = await resolve_model(settings)
    settings = await fit_to_memory(settings, explicit, model)

    endpoint_token = market.endpoint_token if market is not None else endpoint_token_of(settings)
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
                if hook is not None:
                    await hook.on_ready(market, model.model_id)
            status = TerminalStatus(Console(), model.model_id, server.url) if terminal else LogStatus()
            reporters = [status.run(engine.stats, stop)]
            if notifier.enabled:
                reporters.append(report_to_systemd(notifier, model.model_id, engine.stats, lambda: market_phase(market), stop))
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
    if settings.no_register:
        return None
    try:
        return MarketplaceSession.prepare(market_options(settings, local_ok=local_ok))
    except (PlatformError, OfferError) as exc:
        raise ServeError(str(exc)) from None


def start_marketplace(market: MarketplaceSession, model: LocalModel, engine: Engine) -> None:
    """Print the offer and what it earns, log its warnings, then register and heartbeat in the background."""
    try:
        offer = market.offer(model, engine.n_ctx)
    except OfferError as exc:
        raise ServeError(str(exc)) from None
    for line in offer.summary():
        print(line, flush=True)
    for warning in offer.warnings:
        log.warning("%s", warning)
    market.start(offer, engine.stats)


def market_phase(market: MarketplaceSession | None) -> str | None:
    phase = market.phase if market is not None else None
    return phase.value if phase is not None else None


async def resolve_model(settings: Settings) -> LocalModel:
    """The hub shows download progress as a bar on a terminal and as plain lines in logs (journald)."""
    if not settings.model:
        raise ServeError("no model to serve: pass --model ./file.gguf (or org/model) or set VRAM_SUPPLY_MODEL")
    try:
        return await asyncio.to_thread(prepare_configured, settings.model, settings, progress=True)
    except HubError as exc:
        raise ServeError(str(exc)) from None


async def fit_to_memory(settings: Settings, explicit: set[str], model: LocalModel | None = None) -> Settings:
    """The memory plan (vramsupply.gpu): before download it picks the quant; before load it shrinks
    a context or slot count that was not set, or refuses with the numbers instead of an OOM."""
    from vramsupply.gpu.planning import PlanRefused, fit_before_download, fit_before_load

    try:
        if model is None:
            return await asyncio.to_thread(fit_before_download, settings, explicit)
        return await asyncio.to_thread(fit_before_load, settings, explicit, model.path)
    except PlanRefused as exc:
        raise ServeError(str(exc)) from None


def model_aliases(model: LocalModel) -> list[str]:
    """Other names a request's ``model`` may use: the GGUF repo and file (the GGUF's own name is added on load)."""
    names = [model.path.name, model.path.stem]
    if model.repo_id:
        names.append(model.repo_id)
    return names


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
