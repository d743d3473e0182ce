"""The reference platform's HTTP API: the documented provider endpoints and the buyer-facing proxy.

Provider side (``Authorization: Bearer <API key>``): register, heartbeat, deregister, demand and
payment rails, validated with the same models the client sends (``platform.api``). Buyer side:
``POST /v1/chat/completions`` picks the cheapest online provider of the model that accepts the
buyer's payment rail, forwards the request with that provider's endpoint token and relays the
answer (SSE passthrough when streaming), counting tokens for demand and payouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ValidationError

from vramsupply.devplatform import payment
from vramsupply.devplatform.store import Account, BuyerRequest, Provider, Rail, RailError, Store, rails_of
from vramsupply.platform import api
from vramsupply.platform.client import describe_error

log = logging.getLogger("vramsupply.devplatform")


@dataclass(frozen=True)
class PlatformOptions:
    health_interval: float = 60.0
    """Seconds between health checks of every registered provider's ``{endpoint_url}/health``."""
    health_timeout: float = 5.0
    heartbeat_timeout: float = 180.0
    """A provider silent for this long is marked offline at the next health check."""


STORE = web.AppKey("store", Store)
OPTIONS = web.AppKey("options", PlatformOptions)
HTTP = web.AppKey("http", aiohttp.ClientSession)
ACCOUNT = web.RequestKey("account", Account)
RETRY_NEXT_PROVIDER = frozenset({401, 403, 429, 500, 502, 503, 504})
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


def error_response(status: int, message: str, type_: str, code: str | None = None, fields: list[api.FieldError] | None = None) -> web.Response:
    return web.json_response(api.error_body(message, type_=type_, code=code, fields=fields), status=status)


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


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "request body must be JSON", "invalid_request_error", "invalid_json")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object", "invalid_request_error", "invalid_json")
    return body


async def _validated(request: web.Request, model: type[BaseModel]) -> Any:
    """The body as ``model``, or a 422 naming every bad field and why."""
    body = await _json_object(request)
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
    store.heartbeat(provider, beat, time.time())
    return web.json_response(api.HeartbeatResponse(provider_id=provider.id, status=provider.status).model_dump())


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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Route a buyer's request: authenticate (API key or MPP), pick a provider, relay its answer."""
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error_response(400, "model is required", "invalid_request_error", "missing_model")
    store = request.app[STORE]
    rail = _buyer_rail(request)
    if isinstance(rail, web.Response):
        return rail
    if isinstance(rail, PaymentNeeded):
        payable = store.candidates(model, "tempo")
        return _payment_required(store, model, payable[0], rail.reason) if payable else _no_provider(store, model, "tempo")
    entry = store.record_request(model, rail, time.time())
    candidates = store.candidates(model, rail)
    if not candidates:
        return _no_provider(store, model, rail)
    failures: list[web.Response] = []
    for provider in candidates:
        try:
            return await _forward(request, body, provider, entry)
        except _ProviderFailed as failed:
            failures.append(failed.response)
    return failures[-1]


@dataclass(frozen=True)
class PaymentNeeded:
    """No usable credential: answer 402 with a fresh MPP challenge, saying why."""

    reason: str


def _buyer_rail(request: web.Request) -> Rail | PaymentNeeded | web.Response:
    """stripe for ``Bearer sk-…``, tempo for a valid ``Payment`` credential, else a challenge or 401."""
    authorization = request.headers.get("Authorization", "").strip()
    if not authorization:
        return PaymentNeeded("payment required: pay per token with MPP (Authorization: Payment) or use an API key")
    scheme, _, value = authorization.partition(" ")
    store = request.app[STORE]
    if scheme.lower() == "bearer":
        key = value.strip()
        if key.startswith("sk-") and key in store.accounts:
            return "stripe"
        return error_response(401, "invalid API key", "authentication_error", "invalid_api_key")
    if scheme.lower() == "payment":
        try:
            credential = payment.parse_credential(value)
        except payment.CredentialError as exc:
            return PaymentNeeded(str(exc))
        if store.live_challenge(credential.challenge.id, time.time()) is None:
            return PaymentNeeded(f"challenge {credential.challenge.id} is unknown or expired")
        return "tempo"
    return error_response(401, f"unsupported Authorization scheme {scheme!r}: use Bearer sk-… or Payment", "authentication_error", "invalid_auth")


def _payment_required(store: Store, model: str, cheapest: Provider, reason: str) -> web.Response:
    amount = payment.per_token_amount(cheapest.offer.output_price_per_million)
    challenge = store.issue_challenge(model, amount, payment.CHALLENGE_TTL_SECONDS, time.time())
    response = error_response(402, reason, "payment_required", "payment_required")
    response.headers["WWW-Authenticate"] = payment.challenge_header(challenge)
    return response


def _no_provider(store: Store, model: str, rail: Rail) -> web.Response:
    if not store.knows_model(model):
        return error_response(404, f"no provider serves model {model!r}", "invalid_request_error", "model_not_found")
    return error_response(503, f"no online provider of {model!r} accepts {rail} payments right now", "service_unavailable", "no_provider")


class _ProviderFailed(Exception):
    """This provider could not take the request; try the next one, or answer with ``response``."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


async def _forward(request: web.Request, body: dict[str, Any], provider: Provider, entry: BuyerRequest) -> web.StreamResponse:
    streaming = body.get("stream") is True
    raw_options = body.get("stream_options")
    buyer_options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    buyer_wants_usage = buyer_options.get("include_usage") is True
    upstream_body = {**body, "stream_options": {**buyer_options, "include_usage": True}} if streaming else body
    headers = {"Authorization": f"Bearer {provider.offer.endpoint_token}"} if provider.offer.endpoint_token else {}
    url = f"{provider.offer.endpoint_url}{api.CHAT_COMPLETIONS_PATH}"
    try:
        async with request.app[HTTP].post(url, json=upstream_body, headers=headers) as upstream:
            if upstream.status in RETRY_NEXT_PROVIDER:
                raise _ProviderFailed(await _upstream_error(upstream, provider))
            if streaming and upstream.status == 200:
                return await _relay_stream(request, upstream, provider, entry, buyer_wants_usage)
            return await _relay_body(request, upstream, provider, entry)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        if isinstance(exc, aiohttp.ClientConnectorError):
            provider.status = "offline"
        log.warning("provider %s failed before answering: %s", provider.id, describe_error(exc))
        raise _ProviderFailed(error_response(502, f"provider {provider.id} is unreachable", "upstream_error", "provider_unreachable")) from None


async def _upstream_error(upstream: aiohttp.ClientResponse, provider: Provider) -> web.Response:
    if upstream.status in (401, 403):
        return error_response(502, f"provider {provider.id} refused the platform's endpoint token", "upstream_error", "provider_auth")
    headers = {"Retry-After": upstream.headers["Retry-After"]} if "Retry-After" in upstream.headers else None
    return web.Response(status=upstream.status, body=await upstream.read(), content_type="application/json", headers=headers)


async def _relay_body(request: web.Request, upstream: aiohttp.ClientResponse, provider: Provider, entry: BuyerRequest) -> web.Response:
    data = await upstream.read()
    usage = _usage(data) if upstream.status == 200 else {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    request.app[STORE].record_usage(entry, provider, upstream.status, prompt, completion, time.time())
    response = web.Response(status=upstream.status, body=data, content_type=upstream.content_type)
    if entry.rail == "tempo" and upstream.status == 200:
        response.headers["Payment-Receipt"] = payment.b64url(_receipt(provider, prompt, completion))
    return response


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse, provider: Provider, entry: BuyerRequest, buyer_wants_usage: bool
) -> web.StreamResponse:
    """Pass SSE events through as they arrive; read usage from the final chunk we asked the provider for.

    Once the buyer has the 200 headers, a failure on either side can only end the stream early.
    """
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    usage: dict[str, int] = {}
    recorded = False

    def record() -> None:
        nonlocal recorded
        if not recorded:
            recorded = True
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            request.app[STORE].record_usage(entry, provider, 200, prompt, completion, time.time())

    try:
        async for event in _sse_events(upstream.content):
            data = _event_data(event)
            if data == "[DONE]":
                record()  # before the buyer can see the end of the stream
            if data == "[DONE]" and entry.rail == "tempo":
                receipt = _receipt(provider, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
                await response.write(f"event: payment-receipt\ndata: {json.dumps(receipt)}\n\n".encode())
            elif data and data != "[DONE]":
                chunk_usage = _usage(data.encode())
                if chunk_usage:
                    usage = chunk_usage
                    if not buyer_wants_usage and _is_usage_only(data):
                        continue
            await response.write(event)
        await response.write_eof()
    except (aiohttp.ClientError, ConnectionResetError, asyncio.TimeoutError) as exc:
        log.warning("stream from provider %s to the buyer ended early: %s", provider.id, describe_error(exc))
    finally:
        record()
    return response


async def _sse_events(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Whole SSE events (lines up to a blank line), bytes unchanged."""
    lines: list[bytes] = []
    async for line in stream:
        lines.append(line)
        if not line.strip():
            yield b"".join(lines)
            lines = []
    if any(line.strip() for line in lines):
        yield b"".join(lines) + b"\n"


def _event_data(event: bytes) -> str:
    parts = [line[5:].strip() for line in event.decode("utf-8", "replace").splitlines() if line.startswith("data:")]
    return "\n".join(parts)


def _usage(data: bytes) -> dict[str, int]:
    try:
        usage = json.loads(data).get("usage")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(usage, dict):
        return {}
    return {k: v for k, v in usage.items() if k in ("prompt_tokens", "completion_tokens") and isinstance(v, int)}


def _is_usage_only(data: str) -> bool:
    try:
        return bool(json.loads(data).get("choices") == [])
    except (ValueError, AttributeError):
        return False


def _receipt(provider: Provider, prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    amount = payment.charge(prompt_tokens, completion_tokens, provider.offer.input_price_per_million, provider.offer.output_price_per_million)
    return {"status": "success", "provider_id": provider.id, "tokens": prompt_tokens + completion_tokens, "amount": str(amount), "currency": payment.PATH_USD}
