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
``READY=1`` at step 4, ``STOPPING=1`` at step 6, and ``WATCHDOG=1`` pings from the event loop while
the engine is healthy. Signals are handled from the very start (``signals.StopSignals``): a stop
during the download or the load ends as cleanly as one while serving. An engine that fails while
serving (its thread died, a step stalled) stops the agent: it deregisters, drains and exits 1 with
the cause, so the service manager restarts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from vramsupply.config import EngineKind, Settings
from vramsupply.display import make_console
from vramsupply.engine import EngineFailed
from vramsupply.errors import Interrupted, ListenError
from vramsupply.gpu.report import PlacementMonitor, announce, watch_placement
from vramsupply.hub.local import is_local_path
from vramsupply.host.limits import raise_open_files_limit
from vramsupply.instance_lock import hold_data_dir
from vramsupply.logging import configure_logging, interactive
from vramsupply.output import say
from vramsupply.platform import MarketplaceSession, price_summary
from vramsupply.platform.offer import ModelIdentity, local_base_url
from vramsupply.platform.state import record_listening
from vramsupply.serve.backend import Backend, LlamaCppBackend, require_model
from vramsupply.serve.hooks import ServeHook
from vramsupply.serve.options import endpoint_token_of, listening_everywhere, market_options, start_warnings, upstream_options
from vramsupply.serve.provider import ProviderSide
from vramsupply.serve.status import LogStatus, ServingStats, TerminalStatus, report_to_systemd
from vramsupply.server import ApiServer
from vramsupply.server.app import STOPPED_AT_ONCE
from vramsupply.service import SystemdNotifier
from vramsupply.signals import StopSignals, wait_for_stop

log = logging.getLogger("vramsupply.serve")
ENGINE_CHECK_SECONDS = 0.25
NOT_READY = "stopping (the engine is not ready, so no request can be in flight)"
"""A first stop signal before the engine is ready: nothing to finish, so the agent stops at once."""


async def run_serve(settings: Settings, *, hook: ServeHook | None = None, warnings: Sequence[str] = ()) -> None:
    """Serve until a stop signal, then drain and return; raises a VramsupplyError when it cannot start.

    ``hook`` (``--demo``) runs around serving and acts once the agent is ready. ``warnings``: what
    the CLI has to say about the settings (the ones ``--demo`` ignores), logged once logging is set.
    """
    configure_logging(settings.log_level, [settings.endpoint_token, settings.api_key, settings.upstream_api_key])
    for warning in warnings:
        log.warning("%s", warning)
    if hook is None and settings.engine is EngineKind.llama_cpp:
        require_model(settings)  # the first thing a new provider leaves out: before the endpoint URL, the data dir
    hold_data_dir()  # one agent per data dir, refused before any download or load (instance_lock.py)
    raise_open_files_limit()  # a connection a buyer: 1,024 is the usual default (host/limits.py)
    notifier = SystemdNotifier()
    watchdog = notifier.start_watchdog()
    stop = StopSignals()
    try:
        with stop:
            if hook is None:
                await serve_until_stopped(settings, notifier, stop)
                return
            async with hook.around(settings) as hooked_settings:
                await serve_until_stopped(hooked_settings, notifier, stop, hook)
    except asyncio.CancelledError:
        raise Interrupted(stopped_at_once(stop)) from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        notifier.close()


def stopped_at_once(stop: StopSignals) -> str:
    """The error line of a second signal ("stop now"): what it did not wait for."""
    if stop.first_stop != StopSignals.SERVING:
        return "stopped before the engine was ready"
    if stop.cut:
        return f"stopped without waiting for {stop.cut} in-flight request{'' if stop.cut == 1 else 's'}"
    return "stopped at once, with no request in flight"  # what it cut short: telling the platform of the drain


async def serve_until_stopped(settings: Settings, notifier: SystemdNotifier, stop: StopSignals, hook: ServeHook | None = None) -> None:
    terminal = interactive()
    local_platform = hook is not None and hook.local_endpoint_ok
    market = prepare_marketplace(settings, local_ok=local_platform)
    provider = ProviderSide(settings, market, local_platform=local_platform)
    backend = choose_backend(settings)
    stop.in_flight = backend.in_flight
    for warning in start_warnings(settings) if hook is None else ():  # works, but may not do what was meant
        log.warning("%s", warning)
    stop.first_stop = NOT_READY
    model = await prepare(settings, backend, notifier, stop)
    if model is None:
        log.info("stopped before the model was ready (an interrupted download resumes on the next start)")
        return
    provider.model_known(model)

    server, url = await open_api(settings, backend, model, market, provider, terminal)
    watch = EngineWatch()
    try:
        notifier.status(f"loading {model.model_id}")
        stop.first_stop = getattr(backend, "first_stop_while_starting", NOT_READY)
        if not await backend.start(stop.event):
            return
        stop.first_stop = StopSignals.SERVING
        notifier.healthy = watch.healthy
        await go_live(backend, model, url, notifier, market, hook, stop.event)
        await report_while_serving(backend, model, url, notifier, market, stop, watch, terminal)
    finally:
        serving = stop.first_stop == StopSignals.SERVING
        await stop_serving(settings, notifier, server, backend, market, provider, engine_failed=watch.failure is not None, serving=serving)
    if watch.failure is not None:
        raise EngineFailed(watch.failure)


async def open_api(
    settings: Settings, backend: Backend, model: ModelIdentity, market: MarketplaceSession | None, provider: ProviderSide, terminal: bool,
) -> tuple[ApiServer, str]:
    """The OpenAI API listening (before the engine loads, so /health answers meanwhile), and the
    URL this machine reaches it at."""
    endpoint_token = market.endpoint_token if market is not None else endpoint_token_of(settings)
    app = backend.create_app(endpoint_token, settings.max_body_bytes)
    access_log = None if terminal else logging.getLogger("vramsupply.access")
    server = ApiServer(app, settings.host, settings.port, drain_timeout=settings.drain_timeout, access_log=access_log)
    await listen(server)
    provider.listening(server)
    record_listening(settings, model.model_id, server.port, registering=market is not None)
    url = local_base_url(settings.host, server.port)  # 0.0.0.0 or :: is no address to connect to
    everywhere = listening_everywhere(settings.host, url)
    if everywhere is not None:
        log.info("%s", everywhere)
    return server, url


async def prepare(settings: Settings, backend: Backend, notifier: SystemdNotifier, stop: StopSignals) -> ModelIdentity | None:
    """The model, found or downloaded (None: stopped first), while systemd is told it is under way
    and, as long as data moves, given more time than ``TimeoutStartSec`` for a long download."""
    if backend.kind == EngineKind.llama_cpp.value:
        how = "checking the local file" if is_local_path(settings.model) else "downloading it unless cached"
        notifier.status(f"preparing {settings.model} ({how})")
    else:
        notifier.status(f"preparing the {backend.kind} engine")
    extending = asyncio.ensure_future(notifier.extend_start_while_moving())
    try:
        return await stop.until(asyncio.ensure_future(backend.prepare()))
    finally:
        extending.cancel()


async def report_while_serving(
    backend: Backend, model: ModelIdentity, url: str, notifier: SystemdNotifier, market: MarketplaceSession | None,
    stop: StopSignals, watch: EngineWatch, terminal: bool,
) -> None:
    """Until a stop signal: the live status (a terminal panel, or periodic log lines), the engine
    watch, where the model's layers sit on the GPUs, and systemd's STATUS= lines."""
    status = TerminalStatus(make_console(), model.model_id, url) if terminal else LogStatus()
    reporters = [status.run(backend.stats, stop), watch.run(backend.stats, stop)]
    placement = placement_of(backend)
    if placement is not None:
        reporters.append(watch_placement(placement, lambda seconds: wait_for_stop(stop, seconds)))
    if notifier.enabled:
        reporters.append(report_to_systemd(notifier, model.model_id, backend.stats, lambda: market_phase(market), stop))
    await asyncio.gather(*reporters)


class EngineWatch:
    """Notices a failed engine (``EngineStats.failure``, see ``engine/liveness.py``) and stops
    serving, so that the process exits non-zero and systemd restarts it. ``/health`` and heartbeats
    read the failure directly."""

    def __init__(self) -> None:
        self.failure: str | None = None

    def healthy(self) -> bool:
        return self.failure is None

    async def run(self, stats: Callable[[], ServingStats], stop: StopSignals) -> None:
        while not await wait_for_stop(stop, ENGINE_CHECK_SECONDS):
            failure = getattr(stats(), "failure", None)
            if failure is not None:
                self.failure = failure
                log.error("%s; stopping so that the service manager restarts the agent", failure)
                stop.event.set()
                return


async def go_live(
    backend: Backend, model: ModelIdentity, url: str, notifier: SystemdNotifier, market: MarketplaceSession | None, hook: ServeHook | None,
    stopping: asyncio.Event,
) -> None:
    """The engine is ready: say so, then offer it to the market (and let ``--demo`` buy from it,
    unless a stop was requested)."""
    say(backend.ready_line(url))
    placement = placement_of(backend)
    if placement is not None:
        announce(placement.placement)
    notifier.ready(f"serving {model.model_id} at {url}/v1 ({backend.slots} slots)")
    if market is not None:
        start_marketplace(market, model, backend, placement.placement.as_json() if placement is not None else None)
        if hook is not None:
            await hook.on_ready(market, model.model_id, stopping)


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
    return MarketplaceSession.prepare(market_options(settings, local_ok=local_ok))


def placement_of(backend: Backend) -> PlacementMonitor | None:
    """Where our llama.cpp engine runs (vramsupply.gpu.report); None for an upstream engine."""
    return getattr(backend, "placement", None)


def start_marketplace(market: MarketplaceSession, model: ModelIdentity, backend: Backend, hardware: dict[str, Any] | None = None) -> None:
    """Print the offer and what it earns, log its warnings, then register and heartbeat in the background.

    ``hardware`` (where the model runs, with any CPU-fallback warnings) goes with the registration,
    also the one made once a tunnel has its URL."""
    market.hardware = hardware
    if market.waiting_for_url:
        options = market.options
        say(f"offering {model.model_id} through a {options.tunnel} tunnel on {options.platform_url}: registering once it has a public URL")
        say(price_summary(options.input_price, options.output_price))
        market.start_when_reachable(model, backend.n_ctx, backend.stats)
        return
    offer = market.offer(model, backend.n_ctx)
    for line in offer.summary():
        say(line)
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
        raise ListenError(server.host, server.port, exc) from None


async def stop_serving(
    settings: Settings, notifier: SystemdNotifier, server: ApiServer, backend: Backend, market: MarketplaceSession | None, provider: ProviderSide,
    *, engine_failed: bool = False, serving: bool = True,
) -> None:
    """Drain, then settle: the ledger's rows of what was cut, deregistration, the tunnel. A second
    Ctrl-C or SIGTERM ("stop now") cuts the drain short, never the settling. A failed engine
    finishes nothing more, so its requests are ended at once, with its error, not drained, while
    the platform is told (before, they waited for that: up to 3 s with a platform not answering).
    ``serving``: requests were taken; before that (a stop while the model loads) nothing drains."""
    notifier.stopping("stopping: draining in-flight requests" if serving else "stopping before the model was ready")
    try:
        if engine_failed:
            await asyncio.gather(*([market.drain()] if market is not None else []), drain(server, backend, None))
        else:
            if market is not None:
                await market.drain()
            await drain(server, backend, settings.drain_timeout)
    finally:
        await provider.drained(server)
        if market is not None:
            await market.stop()
        await provider.stop()


STOP_NOW_WRITE_SECONDS = 1.0
"""On "stop now", how long handlers get to send their clients the error event that ends their
answers before every connection still open is closed."""


async def drain(server: ApiServer, backend: Backend, drain_timeout: float | None) -> None:
    """Stop accepting, give in-flight requests ``drain_timeout`` seconds, then free the engine.

    With our engine, requests still running at the deadline end through it (EngineClosed, or
    EngineFailed from a failed engine, whose ``drain_timeout`` is None: no wait), so a stream
    gets a clean error event, not a cut connection; an upstream engine ends what it forwards the
    same way (``UpstreamBackend.stop_generating``). The server cancels what is left only
    ``STOP_GRACE_SECONDS`` later.
    """
    in_flight = backend.in_flight()
    if in_flight and drain_timeout is None:
        log.info("stopping: ending %d in-flight request(s), which the failed engine cannot finish", in_flight)
    elif in_flight:
        log.info("stopping: waiting up to %gs for %d in-flight request(s)", drain_timeout, in_flight)
    else:
        log.info("stopping")
    stop_generating = getattr(backend, "stop_generating", None)
    deadline = asyncio.get_running_loop().call_later(drain_timeout or 0.0, stop_generating) if stop_generating is not None else None
    # aiohttp's cleanup runs in its own task: on Python 3.10 its RequestHandler.shutdown swallows a
    # cancellation (it re-raises only when task.cancelling(), a 3.11 API), so "stop now" must not
    # depend on the CancelledError coming back out of it.
    stopping = asyncio.ensure_future(server.stop())
    try:
        await asyncio.shield(stopping)
    except asyncio.CancelledError:  # "stop now": end the requests at once, through the engine
        stop_now = getattr(backend, "stop_now", None)
        if stop_now is not None:
            stop_now()  # a launched engine is killed, not given its stop timeout (``close`` below)
        if stop_generating is not None:
            stop_generating()  # the upstream's forwarded requests end (and are billed) through it
        else:
            await backend.close()  # our engine ends its requests with EngineClosed: clean error events
        await asyncio.wait({stopping}, timeout=STOP_NOW_WRITE_SECONDS)
        server.abort_requests(STOPPED_AT_ONCE)  # a client reading nothing would hold the stop (``server/stalled.py``)
        await stopping
        raise
    finally:
        if deadline is not None:
            deadline.cancel()
        await backend.close()
    log.info("stopped")
