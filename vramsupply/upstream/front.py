"""Our own front for an upstream engine: the same contract buyers and the platform get from the
llama.cpp engine, whatever serves the tokens behind it.

The app keeps the server's middlewares (request metrics, OpenAI error JSON, the endpoint token on
``/v1/*``) and its model-name check, and adds:

- ``POST /v1/chat/completions`` and ``/v1/completions``: forwarded to the upstream (``proxy``);
- ``GET /v1/models``: the model under the id we register, never the upstream's own name;
- ``GET /health``: 200 only while the upstream is ready, else 503 with the reason;
- ``GET /metrics``: our counters plus the upstream's load gauges.

``FrontState`` is the server's ``ServerState`` whose "engine" is the upstream: ``stats()`` is None
(so /health and the gauges say "not serving") while the upstream is down.

The drain ends what the upstream has not finished by its deadline (``stop_generating``) the way our
own engine ends its generations: no upstream can be told "stop now, the agent is stopping", so
each forwarded request is ``Forwarded``, and ending it cancels its handler where it waits. The
handler turns that into the answer our engine gives (a 503, or an error event once a stream has
begun, both with code ``shutting_down``), bills what was sent, and closes the upstream request.
Left alone, aiohttp's shutdown would wait twice its own timeout and then cut the buyer's stream
with nothing recorded: past a service manager's stop timeout, which kills before we deregister.

The watch ends them the same way when it gives the upstream up (``end_forwarded``): an upstream
whose ``/health`` has not answered for its stall window (hung: SIGSTOP, a deadlock), or a launched
engine about to be restarted. Each request then ends with its ``GivenUp`` reason (504
``upstream_timeout``, or an error event once its stream has begun) instead of waiting out its own
time bound (600 s for a whole answer) on an upstream that will not answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import Gauge

from vramsupply.engine import EngineStats
from vramsupply.server.app import Routes, model_card, model_list, openai_app
from vramsupply.server.errors import ApiError
from vramsupply.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vramsupply.server.state import SERVER_STATE, ServerState
from vramsupply.upstream.client import UpstreamClient
from vramsupply.upstream.limits import BadAnswer, RelayLimits
from vramsupply.upstream.metrics import UpstreamLoad
from vramsupply.upstream.usage import Tokenizer

UNAVAILABLE_RETRY_AFTER_SECONDS = "5"


@dataclass
class UpstreamHealth:
    """What the monitor last learned of the upstream."""

    ready: bool = False
    reason: str = "starting"
    load: UpstreamLoad | None = None
    checked_at: float = 0.0


@dataclass
class FrontCounters:
    """Requests and tokens served through this front, counted from the upstream's usage."""

    requests_total: int = 0
    in_flight: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_tokens_total: int = 0
    usage_sources: dict[str, int] = field(default_factory=dict)


class IdleReadGate:
    """The upstream's idle-time ``/v1/models`` read and the requests that wait for it to end.

    llama_cpp.server makes that read take its generation lock, and a request waiting for the lock
    stops the stream that holds it (see ``monitor``): a buyer's request must never meet the read
    there. ``claim`` takes the gate only while nothing is in flight, in one step with no await
    between the check and the claim; a request counts itself in flight, then waits in ``passed``
    until ``release``. Counted first, it also keeps the next read from starting before it is
    forwarded. Whoever claims releases in a ``finally``, within the read's own timeout.
    """

    def __init__(self, counters: FrontCounters) -> None:
        self._counters = counters
        self._open = asyncio.Event()
        self._open.set()
        self.held = 0
        """Requests waiting for the read to end."""

    def claim(self) -> bool:
        """Take the gate for a read, if nothing is in flight and no read is under way."""
        if self._counters.in_flight or not self._open.is_set():
            return False
        self._open.clear()
        return True

    def release(self) -> None:
        self._open.set()

    async def passed(self) -> None:
        """Once no read is under way: at once, unless one is."""
        if self._open.is_set():
            return
        self.held += 1
        try:
            await self._open.wait()
        finally:
            self.held -= 1


class FrontState(ServerState):
    def __init__(
        self,
        model_id: str,
        client: UpstreamClient,
        upstream_model: str,
        *,
        slots_total: int,
        aliases: Iterable[str] = (),
        endpoint_token: str | None = None,
    ) -> None:
        super().__init__(model_id, [*aliases, upstream_model], endpoint_token)
        self.client = client
        self.upstream_model = upstream_model
        self.tokenizer = Tokenizer(client, upstream_model)
        self.slots_total = slots_total
        self.health = UpstreamHealth()
        self.counters = FrontCounters()
        self.idle_read = IdleReadGate(self.counters)
        """Held while the watch reads the upstream's ``/v1/models``: forwarded requests wait (``monitor``)."""
        self.limits = RelayLimits()
        self.n_ctx = 0
        """The served context, once known: bounds the usage an answer may claim."""
        self.one_choice_usage = False
        """The upstream is llama-server (it answers ``/props``), whose ``usage`` of an answer with ``n``
        choices counts one choice's tokens: its completion tokens are counted with its tokenizer."""
        self.max_model_len: int | None = None
        """The context offered, once known (``/v1/models`` says it, as vLLM does): the upstream's,
        or the one declared with ``--context-length``."""
        self.failure: str | None = None
        """Why the upstream can no longer be served at all (its supervisor died): serve exits."""
        self.forwarded: set[Forwarded] = set()
        self.stopping = False
        """Past the drain's deadline: whatever still comes in is refused, as our engine refuses it."""
        self._upstream_gauges()

    def snapshot(self) -> EngineStats:
        """The load as heartbeats report it: the upstream's own gauges when it exposes them, else ours."""
        counters, load = self.counters, self.health.load
        busy = load.running if load is not None else min(counters.in_flight, self.slots_total)
        waiting = load.waiting if load is not None else max(0, counters.in_flight - self.slots_total)
        return EngineStats(
            slots_total=max(self.slots_total, busy),
            slots_busy=busy,
            queue_depth=waiting,
            prompt_tokens_total=counters.prompt_tokens_total,
            completion_tokens_total=counters.completion_tokens_total,
            cached_tokens_total=counters.cached_tokens_total,
            requests_total=counters.requests_total,
            failure=self.failure,
            unavailable=None if self.health.ready else f"the upstream is not ready: {self.health.reason}",
        )

    def stats(self) -> EngineStats | None:
        return self.snapshot() if self.health.ready else None

    def ready_upstream(self) -> str:
        """The upstream's model name, or a 503 that says why the upstream cannot take requests."""
        if not self.health.ready:
            raise unavailable_error(self.health.reason)
        return self.upstream_model

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[Forwarded]:
        """The current handler's request, for as long as it is forwarded: ``stop_generating`` may end it."""
        if self.stopping:
            raise shutting_down_error()
        task = asyncio.current_task()
        assert task is not None
        forwarded = Forwarded(task)
        self.forwarded.add(forwarded)
        try:
            yield forwarded
        finally:
            self.forwarded.discard(forwarded)

    def stop_generating(self) -> int:
        """End every forwarded request (the drain's deadline, or a second stop signal); how many."""
        self.stopping = True
        return self.end_forwarded()

    def end_forwarded(self, failure: GivenUp | None = None) -> int:
        """End every forwarded request not yet ended, for ``failure`` (None: the drain); how many."""
        running = [forwarded for forwarded in self.forwarded if not forwarded.ended]
        for forwarded in running:
            forwarded.end(failure)
        return len(running)

    def _upstream_gauges(self) -> None:
        registry = self.metrics.registry
        Gauge("vramsupply_upstream_up", "1 while the upstream engine is ready", registry=registry).set_function(
            lambda: 1.0 if self.health.ready else 0.0
        )
        Gauge("vramsupply_requests_in_flight", "Requests forwarded to the upstream and not yet answered", registry=registry).set_function(
            lambda: float(self.counters.in_flight)
        )
        Gauge("vramsupply_upstream_requests_running", "Requests the upstream reports running (its own metrics)", registry=registry).set_function(
            lambda: float(self.health.load.running) if self.health.load is not None else 0.0
        )
        Gauge("vramsupply_upstream_requests_waiting", "Requests the upstream reports waiting (its own metrics)", registry=registry).set_function(
            lambda: float(self.health.load.waiting) if self.health.load is not None else 0.0
        )
        Gauge("vramsupply_upstream_kv_cache_usage", "Fraction of the upstream's KV cache in use (its own metrics)", registry=registry).set_function(
            lambda: (self.health.load.cache_usage or 0.0) if self.health.load is not None else 0.0
        )


class Forwarded:
    """One request on its way through the front, which the drain's deadline may end.

    Ending it cancels its handler wherever it waits (on the upstream, or on a slow buyer); the
    handler asks ``stopped`` whether a cancellation it catches is ours, not a buyer's hang-up. While
    it settles (counts and records an answer already relayed) it is not cancelled: it ends on its own.
    """

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.ended = False
        self.failure: GivenUp | None = None
        """Why the watch ended it; None when the drain did (or nothing did)."""
        self._settling = False
        self._cancelled = False

    def end(self, failure: GivenUp | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.failure = failure
        if not self._settling:
            self._cancelled = True
            self.task.cancel()

    def stopped(self) -> bool:
        """Whether our cancellation is due (or being handled): then it is taken back, and the handler answers.

        Also asked between two events: ``asyncio.wait_for`` drops a cancellation that comes just as
        what it waits for arrives."""
        if not self._cancelled:
            return False
        self._cancelled = False
        uncancel = getattr(self.task, "uncancel", None)  # Python 3.11+: 3.10 does not count cancellations
        if uncancel is not None:
            uncancel()
        return True

    @contextlib.contextmanager
    def settling(self) -> Iterator[None]:
        self._settling = True
        try:
            yield
        finally:
            self._settling = False


class GivenUp(BadAnswer):
    """The watch gave the upstream up while a request waited on it (see the module docstring)."""

    status = 504
    code = "upstream_timeout"


def shutting_down_error() -> ApiError:
    """What our own engine answers at the drain's deadline (``server.submission.engine_error``)."""
    return ApiError(503, "The server is shutting down.", type="server_error", code="shutting_down")


def unavailable_error(reason: str) -> ApiError:
    return ApiError(
        503,
        f"The model is not available right now: {reason}; retry shortly.",
        type="server_error",
        code="upstream_unavailable",
        headers={"Retry-After": UNAVAILABLE_RETRY_AFTER_SECONDS},
        extra={"status": "unavailable"},
    )


def create_front_app(state: FrontState, *, max_body_bytes: int) -> web.Application:
    from vramsupply.upstream.proxy import forward_chat, forward_completion

    return openai_app(state, max_body_bytes, Routes(forward_chat, forward_completion, list_models, retrieve_model, health, metrics))


def front_state(request: web.Request) -> FrontState:
    state = request.app[SERVER_STATE]
    assert isinstance(state, FrontState)
    return state


async def list_models(request: web.Request) -> web.Response:
    state = front_state(request)
    state.ready_upstream()
    return model_list(model_card(state, state.max_model_len))


async def retrieve_model(request: web.Request) -> web.Response:
    state = front_state(request)
    state.ready_upstream()
    state.check_model(request.match_info["model"])
    return web.Response(text=model_card(state, state.max_model_len).to_json(), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """200 with the load while the upstream is ready; 503 with the reason otherwise."""
    state = front_state(request)
    if not state.health.ready:
        raise unavailable_error(state.health.reason)
    stats = state.snapshot()
    return web.json_response(
        {
            "status": "ok",
            "model": state.model_id,
            "slots_idle": stats.slots_idle,
            "slots_busy": stats.slots_busy,
            "queue": stats.queue_depth,
            "upstream_checked_at": round(state.health.checked_at or time.time(), 3),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=front_state(request).metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})
