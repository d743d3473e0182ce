"""Watching the upstream: is it ready, and how loaded is it.

``check_upstream`` is one look: the engine's health endpoint (``/health`` must answer 200 for vLLM,
SGLang and llama-server; a server without one, such as Ollama or llama_cpp.server, is judged by
``/v1/models``, which must list the model we forward to), then its load from ``/metrics``.
``UpstreamMonitor`` repeats it for a server the provider runs, and logs each change between ready
and not ready once.

A look that fails in a way we did not foresee (our bug, or an answer nothing anticipated) is
logged once with its traceback and marks the upstream not ready while we cannot tell; the watch
goes on, so the next good look makes it ready again. The watch never dies silently behind a
``/health`` that still says ok.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vramsupply.upstream.client import UpstreamClient, UpstreamUnavailable, listed_as
from vramsupply.upstream.front import FrontState
from vramsupply.upstream.metrics import ANY_ENGINE, GAUGES, read_load

log = logging.getLogger("vramsupply.upstream")

CHECK_INTERVAL_SECONDS = 5.0


async def check_upstream(client: UpstreamClient, engine: str, model: str | None = None) -> str | None:
    """None when the upstream is healthy (and lists ``model``, when given), else why not (one phrase)."""
    status = await client.status_of("/health")
    if status is None:
        return f"the {engine} server at {client.root_url} does not answer"
    if status != 200 and not (status == 404 and engine == "upstream"):
        return f"the {engine} server's /health answers {status}"
    if engine == "upstream":
        try:
            listed = [m.name for m in await client.models()]
        except UpstreamUnavailable as exc:
            return f"the upstream does not list its models ({exc})"
        if model is not None and listed_as(model, listed) is None:
            return f"the upstream does not serve {model} (it lists: {', '.join(listed)[:300] or 'nothing'})"
    return None


async def refresh(state: FrontState, engine: str) -> str | None:
    """One look at the upstream, recorded on ``state``: readiness, reason, load."""
    try:
        reason = await check_upstream(state.client, engine, state.upstream_model if engine == "upstream" else None)
        if reason is None:
            text = await state.client.metrics_text()
            state.health.load = read_load(text, GAUGES.get(engine, ANY_ENGINE)) if text else None
    except Exception as exc:
        reason = f"cannot tell whether the upstream is ready ({type(exc).__name__}: {exc})"
        if state.health.reason != reason:
            log.exception("checking the %s server failed unexpectedly", engine)
    set_ready(state, reason)
    return reason


def set_ready(state: FrontState, reason: str | None) -> None:
    """Record readiness; log only when it changes."""
    health = state.health
    health.checked_at = time.time()
    was_ready = health.ready
    health.ready = reason is None
    if reason is not None:
        health.load = None
        if was_ready or health.reason != reason:
            log.warning("upstream not ready: %s", reason)
        health.reason = reason
    elif not was_ready:
        log.info("upstream ready: %s serves %s", state.client.base_url, state.upstream_model)


class UpstreamMonitor:
    """Checks a provider-run upstream every ``interval`` seconds until cancelled."""

    def __init__(self, state: FrontState, engine: str = "upstream", interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self.state = state
        self.engine = engine
        self.interval = interval
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            reason = await refresh(self.state, self.engine)
            if reason is None:
                self.ready.set()
            else:
                self.ready.clear()
            await asyncio.sleep(self.interval)
