"""The reference platform's HTTP API: the app factory and the documented provider endpoints.

Provider side (``Authorization: Bearer <API key>``): register, heartbeat, deregister, demand and
payment rails, validated with the same models the client sends (``platform.api``), plus periodic
health checks of every registered provider. The buyer-facing proxy (``POST /v1/chat/completions``)
lives in ``relay``; this module only registers its route.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ValidationError

from vramsupply.devplatform.shared import HTTP, STORE, error_response, json_object
from vramsupply.devplatform.relay import chat_completions
from vramsupply.devplatform.store import Account, Provider, RailError, Store, rails_of
from vramsupply.platform import api


@dataclass(frozen=True)
class PlatformOptions:
    health_interval: float = 60.0
    """Seconds between health checks of every registered provider's ``{endpoint_url}/health``."""
    health_timeout: float = 5.0
    heartbeat_timeout: float = 180.0
    """A provider silent for this long is marked offline at the next health check."""


OPTIONS = web.AppKey("options", PlatformOptions)
ACCOUNT = web.RequestKey("account", Account)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(store: Store, options: PlatformOptions | None = None) -> web.Application:
    app = web.Application(middlewares=[json_errors, provider_auth])
    app[STORE] = store
    app[OPTIONS] = options or PlatformOptions()
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_health_checks)
    app.router.add_post(api.REGISTER_PATH, register)
    app.router.add_post(api.HEARTBEAT_PATH, heartbeat)
    app.router.add_get(api.DEMAND_PATH, demand)
    app.router.add_delete(api.PROVIDER_PATH, deregister)
    app.router.add_get(api.RAILS_PATH, get_rails)
    app.router.add_patch(api.RAILS_PATH, patch_rails)
    app.router.add_post(api.CHAT_COMPLETIONS_PATH, chat_completions)
    return app


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and wrong methods answer in the same JSON error shape as everything else."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, f"{exc.reason}: {request.method} {request.path}", "invalid_request_error", exc.reason.lower().replace(" ", "_"))


@web.middleware
async def provider_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Provider endpoints need a known API key; the buyer proxy authenticates on its own."""
    if request.path.startswith(("/v1/providers", "/v1/settings")):
        account = _account_for(request.app[STORE], request.headers.get("Authorization", ""))
        if account is None:
            return error_response(401, "invalid or missing API key", "authentication_error", "invalid_api_key")
        request[ACCOUNT] = account
    return await handler(request)


def _account_for(store: Store, authorization: str) -> Account | None:
    scheme, _, key = authorization.partition(" ")
    return store.accounts.get(key.strip()) if scheme.lower() == "bearer" else None


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[HTTP] = session
        yield


async def _health_checks(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(_health_loop(app), name="devplatform-health-checks")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _health_loop(app: web.Application) -> None:
    while True:
        await asyncio.sleep(app[OPTIONS].health_interval)
        await check_providers(app)


async def check_providers(app: web.Application) -> None:
    """GET every provider's /health: failures (or long heartbeat silence) mark it offline."""
    store, options = app[STORE], app[OPTIONS]
    providers = [p for p in store.providers.values() if p.status != "draining"]
    healthy = await asyncio.gather(*(_probe(app[HTTP], p, options.health_timeout) for p in providers))
    now = time.time()
    for provider, ok in zip(providers, healthy, strict=True):
        silent = now - provider.last_seen_at > options.heartbeat_timeout
        provider.status = "online" if ok and not silent else "offline"


async def _probe(http: aiohttp.ClientSession, provider: Provider, timeout: float) -> bool:
    try:
        async with http.get(f"{provider.offer.endpoint_url}/health", timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def _validated(request: web.Request, model: type[BaseModel]) -> Any:
    """The body as ``model``, or a 422 naming every bad field and why."""
    body = await json_object(request)
    if isinstance(body, web.Response):
        return body
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        fields = [api.FieldError(field=".".join(str(p) for p in err["loc"]) or "body", message=err["msg"]) for err in exc.errors()]
        message = "; ".join(f"{f.field}: {f.message}" for f in fields)
        return error_response(422, message, "invalid_request_error", "validation_error", fields)


async def register(request: web.Request) -> web.Response:
    offer = await _validated(request, api.RegisterRequest)
    if isinstance(offer, web.Response):
        return offer
    if offer.provider_type != "agent":
        field = api.FieldError(field="provider_type", message="the reference platform serves agent providers only")
        return error_response(422, f"{field.field}: {field.message}", "invalid_request_error", "validation_error", [field])
    provider = request.app[STORE].register(request[ACCOUNT], offer, time.time())
    return web.json_response(api.RegisterResponse(provider_id=provider.id, status=provider.status).model_dump(), status=201)


async def heartbeat(request: web.Request) -> web.Response:
    beat = await _validated(request, api.HeartbeatRequest)
    if isinstance(beat, web.Response):
        return beat
    store = request.app[STORE]
    provider = store.owned(request[ACCOUNT], beat.provider_id)
    if provider is None:
        return error_response(404, f"unknown provider {beat.provider_id}", "invalid_request_error", "provider_not_found")
    key = request.headers.get(api.IDEMPOTENCY_KEY_HEADER)
    if key is not None and (taken := provider.answered.get(key)) is not None:  # sent again: its answer did not come
        if taken[0] != beat:
            return error_response(422, f"this {api.IDEMPOTENCY_KEY_HEADER} came with another heartbeat", "invalid_request_error", "idempotency_key_reused")
        return web.json_response(taken[1].model_dump())
    store.heartbeat(provider, beat, time.time())
    answer = api.HeartbeatResponse(provider_id=provider.id, status=provider.status)
    if key is not None:
        store.remember(provider, key, beat, answer)
    return web.json_response(answer.model_dump())


async def deregister(request: web.Request) -> web.Response:
    store = request.app[STORE]
    provider_id = request.match_info["provider_id"]
    if store.owned(request[ACCOUNT], provider_id) is None:
        return error_response(404, f"unknown provider {provider_id}", "invalid_request_error", "provider_not_found")
    del store.providers[provider_id]
    return web.json_response(api.DeregisterResponse(provider_id=provider_id).model_dump())


async def demand(request: web.Request) -> web.Response:
    return web.json_response(request.app[STORE].demand(time.time()).model_dump(mode="json"))


async def get_rails(request: web.Request) -> web.Response:
    return web.json_response(rails_of(request[ACCOUNT]).model_dump())


async def patch_rails(request: web.Request) -> web.Response:
    update = await _validated(request, api.RailsUpdate)
    if isinstance(update, web.Response):
        return update
    try:
        rails = request.app[STORE].set_rails(request[ACCOUNT], update)
    except RailError as exc:
        return error_response(400, str(exc), "invalid_request_error", "rails_rejected")
    return web.json_response(rails.model_dump())

