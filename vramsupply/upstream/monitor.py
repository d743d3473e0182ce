"""Watching the upstream: is it ready, and how loaded is it.

``check_upstream`` is one look at the engine's HTTP server: ``/health`` must answer 200 (vLLM,
SGLang, llama-server); for a server without one (Ollama, llama_cpp.server), its prompt 404 is the
proof that the server is alive. For a server the provider runs, ``ModelListing`` checks that
``/v1/models`` still lists the model we forward to, and ``refresh`` adds the load from
``/metrics``. ``UpstreamMonitor`` repeats it, and logs each change between ready and not ready
once. Every look goes through the client's probe connections, never queued behind buyers'.

``/v1/models`` is read at start and then only while no request is in flight through the front.
llama_cpp.server makes ``/v1/models`` wait for the same lock as generation, and by default a
request waiting for that lock stops the stream holding it: read every few seconds, it cut every
long answer at the next look; with that interruption turned off, it waited out the generation and
a healthy server looked down. So while buyers are served the last verdict stands.

Nor does a buyer's request meet the read: the read claims the front's ``IdleReadGate`` in the same
step as it finds nothing in flight (no await between), and a request that comes meanwhile is
counted in flight and waits at the gate until the read ends, then is forwarded. The wait is
bounded by the read's own timeout (``MODELS_READ_SECONDS``, the probes' timeout): however the read
ends (an answer, an error, the timeout, the watch cancelled), the gate is released. A read that
fails while a buyer waits changes nothing, so that one failed look does not refuse a buyer already
admitted: the buyer is forwarded, and the next idle look tells.

Reasons are what buyers read (``/health``, 503 bodies): they never name the server's address. The
provider's log does: a ``Reason`` carries the words for the log too (``logged``).

An upstream that does not answer at all (``NoAnswer``: no HTTP answer to ``/health`` within the
probe's timeout, or no connection) for ``stall_after`` seconds in a row (30 by default, as long as a
launched engine's before its restart) is given up: the requests in flight to it end at once with a
504 that says it stopped answering (``front.GivenUp``), instead of at their own bounds (600 s for a
whole answer). New requests already get 503 from its first unanswered look. Only silence counts: a
slow generation on an upstream that still answers ``/health`` goes on, and so does one on an
upstream whose ``/health`` answers an error (it is alive and ends its own requests).

A look that fails in a way we did not foresee (our bug, or an answer nothing anticipated) is
logged once with its traceback and marks the upstream not ready while we cannot tell; the watch
goes on, so the next good look makes it ready again. The watch never dies silently behind a
``/health`` that still says ok.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vramsupply.upstream.client import PROBE_TIMEOUT, UpstreamClient, UpstreamUnavailable, listed_as
from vramsupply.upstream.front import FrontState, GivenUp
from vramsupply.upstream.metrics import ANY_ENGINE, GAUGES, read_load

log = logging.getLogger("vramsupply.upstream")

CHECK_INTERVAL_SECONDS = 5.0
MODELS_READ_SECONDS = PROBE_TIMEOUT.total
"""The most an idle-time ``/v1/models`` read may hold buyers at the gate (see the module docstring):
the client's timeout for every probe."""
STALL_AFTER_SECONDS = 30.0
"""How long an upstream may leave ``/health`` unanswered before the requests in flight to it end."""


class Reason(str):
    """Why the upstream is not ready, as buyers read it; ``logged`` says it for the provider's log,
    naming the server's address."""

    logged: str

    def __new__(cls, public: str, logged: str) -> Reason:
        reason = super().__new__(cls, public)
        reason.logged = logged
        return reason


class NoAnswer(Reason):
    """The server did not answer at all: hung (SIGSTOP, a deadlock), gone, or unreachable."""


def unavailable(exc: UpstreamUnavailable, prefix: str = "") -> Reason:
    """An ``UpstreamUnavailable`` as a reason: its cause for buyers, its whole message for the log."""
    return Reason(f"{prefix}{exc.cause}", f"{prefix}{exc}")


async def check_upstream(client: UpstreamClient, engine: str) -> str | None:
    """None when the engine's HTTP server answers and says it is healthy, else why not (one phrase)."""
    status = await client.status_of("/health")
    if status is None:
        return NoAnswer(f"the {engine} server does not answer", f"the {engine} server at {client.root_url} does not answer")
    if status == 200 or (status == 404 and engine == "upstream"):
        return None
    return Reason(f"the {engine} server's /health answers {status}", f"{client.root_url}/health answers {status}")


class ModelListing:
    """Whether a server the provider runs still lists our model: ``/v1/models``, read only while no
    request is in flight through the front, and holding requests that come meanwhile at the gate
    (see the module docstring)."""

    def __init__(self, state: FrontState) -> None:
        self.state = state
        self.reason: str | None = None

    def busy(self) -> bool:
        return self.state.counters.in_flight > 0

    async def check(self) -> str | None:
        """A fresh verdict while idle; while requests are in flight, the last one."""
        gate = self.state.idle_read
        if not gate.claim():
            return self.reason
        try:
            listed = await self.read()
        except UpstreamUnavailable as exc:
            if not self.busy():  # else a buyer waits: forwarded on the last verdict, the next idle look tells
                self.reason = unavailable(exc, "the upstream does not list its models: ")
            return self.reason
        finally:
            gate.release()  # however the read ended, within MODELS_READ_SECONDS
        model = self.state.upstream_model
        if listed_as(model, listed) is None:
            lists = f"does not serve {model} (it lists: {', '.join(listed)[:300] or 'nothing'})"
            # buyers read /health: the model's file path and what else the upstream serves are the provider's
            self.reason = Reason("the upstream no longer serves the model this endpoint offers", f"the upstream at {self.state.client.base_url} {lists}")
        else:
            self.reason = None
        return self.reason

    async def read(self) -> list[str]:
        """The names the upstream lists, within the probes' timeout (``MODELS_READ_SECONDS``).

        Not ``asyncio.wait_for`` around it: on Python 3.11 that can swallow the watch's own
        cancellation when the read ends in the same moment, and the agent's shutdown then waited
        forever for the watch."""
        return [m.name for m in await self.state.client.models()]


async def refresh(state: FrontState, engine: str, listing: ModelListing | None = None) -> str | None:
    """One look at the upstream, recorded on ``state``: readiness, reason, load."""
    try:
        reason = await check_upstream(state.client, engine)
        if reason is None and listing is not None:
            reason = await listing.check()
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
    """Record readiness; log only when it changes (a ``Reason`` in its words for the log)."""
    health = state.health
    health.checked_at = time.time()
    was_ready = health.ready
    health.ready = reason is None
    if reason is not None:
        health.load = None
        if was_ready or health.reason != reason:
            log.warning("upstream not ready: %s", getattr(reason, "logged", reason))
        health.reason = str(reason)
    elif not was_ready:
        log.info("upstream ready: %s serves %s", state.client.base_url, state.upstream_model)


def give_up(state: FrontState, why: str, logged: str) -> None:
    """End the requests in flight to an upstream the watch gave up (``why``: for buyers)."""
    ended = state.end_forwarded(GivenUp(why))
    if ended:
        log.warning("ending %d request(s) in flight to the upstream: %s", ended, logged)


class UpstreamMonitor:
    """Checks a provider-run upstream every ``interval`` seconds until cancelled, and gives it up
    once it has not answered for ``stall_after`` seconds (see the module docstring)."""

    def __init__(
        self, state: FrontState, engine: str = "upstream", interval: float = CHECK_INTERVAL_SECONDS, stall_after: float = STALL_AFTER_SECONDS
    ) -> None:
        self.state = state
        self.engine = engine
        self.interval = interval
        self.stall_after = stall_after
        self.ready = asyncio.Event()
        self.listing = ModelListing(state) if engine == "upstream" else None
        self.silence: tuple[float, float] | None = None
        """When the first of the looks in a row that got no answer began, and when it ended."""

    async def run(self) -> None:
        while True:
            began = time.monotonic()
            reason = await refresh(self.state, self.engine, self.listing)
            if reason is None:
                self.ready.set()
            else:
                self.ready.clear()
            self.judge(reason, began)
            await asyncio.sleep(self.interval)

    def judge(self, reason: str | None, began: float) -> None:
        """Give the upstream up once it has answered nothing for ``stall_after`` seconds in a row."""
        now = time.monotonic()
        if not isinstance(reason, NoAnswer):
            self.silence = None
            return
        if self.silence is None:
            self.silence = (began, now)
        # From the first unanswered look's end: one look that outlasted a pause of the agent itself
        # (SIGSTOP, a suspended VM) timed out on resuming, whatever the upstream did, and is no stall.
        if now - self.silence[1] >= self.stall_after:
            silent_for = now - self.silence[0]
            why = f"it stopped answering (its /health has not answered for {silent_for:.0f} s)"
            give_up(self.state, why, f"{reason.logged} for {silent_for:.0f} s")
