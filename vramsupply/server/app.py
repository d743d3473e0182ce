"""The aiohttp application: routes, middlewares, and a runner that drains on stop.

Middlewares, outermost first: ``metrics_middleware`` counts every response by route and status;
``error_middleware`` turns every failure into OpenAI error JSON; ``auth_middleware`` enforces the
optional endpoint token on ``/v1/*`` (``/health`` and ``/metrics`` stay open for health checks
and scrapers).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from vramsupply.engine import Engine
from vramsupply.listen import start_sites
from vramsupply.server.access import ACCESS_LOG, AccessLine, write_access_line
from vramsupply.server.completions import chat_completions, completions
from vramsupply.server.errors import ApiError, add_request_id, error_middleware, request_id
from vramsupply.server.framing import OpenAIErrorRunner
from vramsupply.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vramsupply.server.responses import ModelCard, ModelList
from vramsupply.server.stalled import CLOSED, OPEN_REQUESTS, Closed, OpenRequests
from vramsupply.server.state import BUYER_LEFT, SERVER_STATE, ServerState, failed_error, loading_error

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
OWNER = "vramsupply"
STOP_GRACE_SECONDS = 5.0
IDLE_CONNECTION_SECONDS = 75.0
"""A connection that sends no request, or only part of one, for this long is closed (aiohttp's
default is an hour: a broken client or a slow-loris peer held a file descriptor each that long).
Keep-alive connections between requests get the same; 75 s is nginx's keep-alive default."""
"""After ``drain_timeout`` the serve lifecycle closes the engine, which ends every generation with an
error the handlers send to their clients; only handlers still running this much later are cancelled."""
STOPPED_AT_ONCE = Closed("the agent was stopped at once, before it finished", logging.INFO)
"""A request cut by "stop now" (a second SIGTERM or Ctrl-C): the provider's choice, not a warning."""
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before the answer


def create_app(
    model_id: str,
    *,
    aliases: Iterable[str] = (),
    endpoint_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    engine: Engine | None = None,
) -> web.Application:
    """An app serving ``model_id``; without ``engine`` it answers 503 until ``ServerState.attach``."""
    state = ServerState(model_id, aliases, endpoint_token)
    if engine is not None:
        state.attach(engine)
    return openai_app(state, max_body_bytes, Routes(chat_completions, completions, list_models, retrieve_model, health, metrics))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Routes:
    """Who answers each route of the OpenAI surface (our engine, or the upstream front)."""

    chat: Handler
    completions: Handler
    models: Handler
    model: Handler
    health: Handler
    metrics: Handler


def openai_app(state: ServerState, max_body_bytes: int, routes: Routes) -> web.Application:
    """The OpenAI surface behind our middlewares (metrics, OpenAI-shaped errors, the endpoint token)."""
    open_requests = OpenRequests()
    middlewares = [open_requests.middleware, metrics_middleware, error_middleware, auth_middleware]
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[SERVER_STATE] = state
    app[OPEN_REQUESTS] = open_requests
    app.on_response_prepare.append(add_request_id)
    app.router.add_post("/v1/chat/completions", routes.chat)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/v1/models/{model:.+}", routes.model)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/metrics", routes.metrics)
    return app


def route_label(request: web.Request) -> str:
    """The route template, so unknown URLs cannot blow up the metric's label set."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    counter = request.app[SERVER_STATE].metrics.requests
    started = time.monotonic()
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        counter.labels(route_label(request), str(CLIENT_CLOSED_REQUEST)).inc()
        _log_hang_up(request, time.monotonic() - started)
        raise
    status = CLIENT_CLOSED_REQUEST if request.get(BUYER_LEFT) else response.status
    counter.labels(route_label(request), str(status)).inc()
    return response


def _log_hang_up(request: web.Request, seconds: float) -> None:
    """aiohttp writes no access line for a handler cancelled by its buyer's hang-up: a stream cut
    mid-answer was in the ledger (cut) and /metrics (499) but nowhere in the access log. A
    connection the agent closed (``stalled.py``: its client read nothing, a stop) says why instead."""
    access = request.app.get(ACCESS_LOG)
    if access is None:
        return
    closed = request.get(CLOSED)
    note, level = (" (the buyer hung up)", logging.INFO) if closed is None else (f" (closed: {closed.why})", closed.level)
    write_access_line(access, request, CLIENT_CLOSED_REQUEST, "-", seconds, request_id(request), note, level)


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    token = request.app[SERVER_STATE].endpoint_token
    if token is not None and (request.path == "/v1" or request.path.startswith("/v1/")):
        check_bearer(request.headers.get("Authorization"), token)
    return await handler(request)


def check_bearer(header: str | None, token: str) -> None:
    """Accept ``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if not header or scheme.lower() != "bearer" or not given.strip():
        raise ApiError(
            401,
            "Missing endpoint token: send the header 'Authorization: Bearer <token>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # aiohttp hands over a header's bytes that are no UTF-8 as surrogate escapes: back to those bytes
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
        raise ApiError(401, "Incorrect endpoint token provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class ServedModelCard(ModelCard):
    """OpenAI's model object, plus vLLM's ``max_model_len``: the context served, in tokens (a
    request's prompt and completion together), which clients such as vLLM's benchmarks and
    LiteLLM read to size their requests."""

    max_model_len: int | None = None


class ServedModelList(ModelList):
    data: list[ServedModelCard]  # declared again: pydantic writes a subclass's fields only where they are declared


def model_card(state: ServerState, max_model_len: int | None) -> ServedModelCard:
    card = ServedModelCard(id=state.model_id, object="model", created=state.created, owned_by=OWNER)
    if max_model_len:
        card.max_model_len = max_model_len
    return card


def model_list(card: ServedModelCard) -> web.Response:
    return web.Response(text=ServedModelList(object="list", data=[card]).to_json(), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    state = request.app[SERVER_STATE]
    return model_list(model_card(state, state.ready_engine().n_ctx))


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: the served model under any of its names, else 404 model_not_found."""
    state = request.app[SERVER_STATE]
    engine = state.ready_engine()
    state.check_model(request.match_info["model"])
    return web.Response(text=model_card(state, engine.n_ctx).to_json(), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """200 with slot counts once the model is loaded; 503 "loading" before, and 503 "error" with
    the reason once the engine has failed, so the platform routes no buyer here. 200 "degraded"
    (with the reason in ``warnings``) while buyers are served but the earnings ledger records nothing;
    a failing tunnel (``--tunnel``) is a warning too, with "ok": this machine serves, and the
    platform's own checks come through the tunnel, so they see it fail anyway.

    The platform polls this with a 5 s timeout to decide whether the agent is online, so it answers
    on the event loop from state already at hand: no thread pool (the default executor is shared
    with tokenizing and big-body parsing), no lock that request work holds for long, no vendor tool."""
    state = request.app[SERVER_STATE]
    stats = state.stats()
    if stats is None:
        raise loading_error()
    if stats.failure is not None:
        raise failed_error(stats.failure)
    body: dict[str, object] = {
        "status": "ok",
        "model": state.model_id,
        "slots_idle": stats.slots_idle,
        "slots_busy": stats.slots_busy,
        "queue": stats.queue_depth,
    }
    if state.placement is not None:  # the last known placement: never waits for a vendor tool or a thread
        placement = state.placement.current()
        body["placement"] = placement.as_json()
        body["warnings"] = list(placement.warnings)
    if state.tunnel_trouble is not None:  # this machine serves, but buyers may not reach it: said, still "ok"
        body["warnings"] = [*_listed(body.get("warnings")), state.tunnel_trouble]
    if state.accounts.failure is not None:  # still serving buyers, but earnings go unrecorded: not "ok"
        body["status"] = "degraded"
        body["warnings"] = [*_listed(body.get("warnings")), state.accounts.failure]
    return web.json_response(body)


def _listed(warnings: object) -> list[object]:
    return warnings if isinstance(warnings, list) else []


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVER_STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


class ApiServer:
    """Runs an app on a TCP port. ``stop`` closes the listener, then lets in-flight requests finish
    for up to ``drain_timeout`` seconds (plus ``STOP_GRACE_SECONDS``) before cancelling them.

    Handler cancellation is on: a client that hangs up cancels its handler, whose ``finally``
    cancels the engine work, so a disconnect frees the slot streaming or not.
    """

    def __init__(
        self, app: web.Application, host: str, port: int, *, drain_timeout: float = 30.0, access_log: logging.Logger | None = None,
        idle_timeout: float = IDLE_CONNECTION_SECONDS,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._drain_timeout = drain_timeout
        self._watch: asyncio.Task[None] | None = None
        if access_log is not None:
            app[ACCESS_LOG] = access_log  # for the lines aiohttp does not write (``_log_hang_up``)
        self._runner = OpenAIErrorRunner(  # what aiohttp's parser refuses is answered as OpenAI errors too
            app,
            counted=lambda status: app[SERVER_STATE].metrics.requests.labels("unmatched", str(status)).inc() if SERVER_STATE in app else None,
            handler_cancellation=True,
            keepalive_timeout=idle_timeout,
            shutdown_timeout=drain_timeout + STOP_GRACE_SECONDS,
            access_log=access_log,
            access_log_class=AccessLine,  # with the completion id after a buyer's own request id
        )

    async def start(self) -> None:
        """Listen; an ``OSError`` (address in use, permission) propagates to the caller."""
        await self._runner.setup()
        try:
            await start_sites(self._runner, self.host, self.port)  # one port for all of the host's addresses
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        open_requests = self.app.get(OPEN_REQUESTS)
        if open_requests is not None:  # clients that stopped reading are closed (``stalled.py``)
            self._watch = asyncio.create_task(open_requests.watch(), name="stalled-connections")

    def abort_requests(self, closed: Closed) -> int:
        """Close every connection whose request is still being handled ("stop now", the end of a
        drain): a handler blocked writing to a client that reads nothing ends with it. Their access
        lines say ``closed``, not that their buyers hung up."""
        open_requests = self.app.get(OPEN_REQUESTS)
        return 0 if open_requests is None else open_requests.abort_all(closed)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> ServerState:
        return self.app[SERVER_STATE]

    async def stop(self) -> None:
        """Close the listener and drain (``__init__``); at the drain's end, connections still open
        are closed, or a client that reads nothing would hold the stop for another drain."""
        if self._watch is not None:
            self._watch.cancel()
        drained = Closed(f"the agent stopped and its {self._drain_timeout:g} s drain ran out", logging.WARNING)
        late = asyncio.get_running_loop().call_later(self._drain_timeout + STOP_GRACE_SECONDS, self.abort_requests, drained)
        try:
            await self._runner.cleanup()
        finally:
            late.cancel()
