"""The buyer side of the reference platform: ``POST /v1/chat/completions`` relayed to a provider.

A buyer pays by API key (stripe) or per request with MPP (tempo); the relay picks the cheapest online
provider of the model that accepts that rail, forwards the request with the provider's endpoint
token, tries the next provider when one fails before answering, and relays the answer (SSE
passthrough when streaming), counting tokens for demand and payouts. It is the platform's other
half, apart from the provider endpoints (``app``, which only registers this route): the two share
only the store, the outgoing HTTP session and the error shape, all in ``shared``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from vramsupply.devplatform import payment
from vramsupply.devplatform.shared import HTTP, STORE, error_response, json_object
from vramsupply.devplatform.store import BuyerRequest, Challenge, Provider, Rail, Store
from vramsupply.platform import api
from vramsupply.platform.client import describe_error

log = logging.getLogger("vramsupply.devplatform")

RETRY_NEXT_PROVIDER = frozenset({401, 403, 429, 500, 502, 503, 504})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Route a buyer's request: authenticate (API key or MPP), pick a provider, relay its answer."""
    body = await json_object(request)
    if isinstance(body, web.Response):
        return body
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error_response(400, "model is required", "invalid_request_error", "missing_model")
    store = request.app[STORE]
    paid = _buyer_rail(request, model)
    if isinstance(paid, web.Response):
        return paid
    candidates = store.candidates(model, "tempo" if isinstance(paid, (PaymentNeeded, Challenge)) else paid)
    if isinstance(paid, Challenge):
        paid, candidates = _within_quote(model, paid, candidates)
    if isinstance(paid, PaymentNeeded):
        payable = store.candidates(model, "tempo")
        return _payment_required(store, model, payable[0], paid.reason) if payable else _no_provider(store, model, "tempo")
    rail: Rail = "tempo" if isinstance(paid, Challenge) else paid
    entry = store.record_request(model, rail, time.time())
    if not candidates:
        return _no_provider(store, model, rail)
    return await _route(request, body, candidates, entry)


async def _route(request: web.Request, body: dict[str, Any], candidates: list[Provider], entry: BuyerRequest) -> web.StreamResponse:
    """The first provider's answer that takes the request, else the last one's refusal."""
    failures: list[web.Response] = []
    for provider in candidates:
        try:
            if body.get("stream") is True:
                return await _forward(request, body, provider, entry)
            return await _unless_the_buyer_leaves(request, _forward(request, body, provider, entry), provider, entry)
        except _ProviderFailed as failed:
            failures.append(failed.response)
    return failures[-1]


BUYER_CHECK_SECONDS = 0.5
"""How often the wait for a whole answer looks whether its buyer is still connected."""


async def _unless_the_buyer_leaves(request: web.Request, forwarding: Awaitable[web.StreamResponse], provider: Provider, entry: BuyerRequest) -> web.StreamResponse:
    """A whole answer, unless the buyer hangs up first (aiohttp does not cancel the handler then):
    the provider's request is closed, so it stops generating for nobody, and nothing is billed, as
    for a stream the buyer left (the platform bills the usage a buyer receives)."""
    task = asyncio.ensure_future(forwarding)
    while not (await asyncio.wait({task}, timeout=BUYER_CHECK_SECONDS))[0]:
        transport = request.transport
        if transport is None or transport.is_closing():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            request.app[STORE].record_usage(entry, provider, 499, 0, 0, time.time())
            log.info("the buyer left before provider %s answered: its request there is closed, and nothing is billed", provider.id)
            return web.Response(status=499)
    return task.result()


@dataclass(frozen=True)
class PaymentNeeded:
    """No usable credential: answer 402 with a fresh MPP challenge, saying why."""

    reason: str


def _buyer_rail(request: web.Request, model: str) -> Rail | Challenge | PaymentNeeded | web.Response:
    """stripe for ``Bearer <the account's API key>``, the challenge a valid ``Payment`` credential
    pays against (tempo: a challenge issued for ``model``), else a challenge or 401. The seeds' buyers send ``Bearer sk-…``, but the key is the account's whatever its
    prefix: ``devplatform --api-key`` takes any key `login` accepts (a ``vs_live_…`` one too), and a
    buyer using it must be served as the agent using it is."""
    authorization = request.headers.get("Authorization", "").strip()
    if not authorization:
        return PaymentNeeded("payment required: pay per token with MPP (Authorization: Payment) or use an API key")
    scheme, _, value = authorization.partition(" ")
    store = request.app[STORE]
    if scheme.lower() == "bearer":
        key = value.strip()
        if key in store.accounts:
            return "stripe"
        return error_response(401, "invalid API key", "authentication_error", "invalid_api_key")
    if scheme.lower() == "payment":
        try:
            credential = payment.parse_credential(value)
        except payment.CredentialError as exc:
            return PaymentNeeded(str(exc))
        challenge = store.live_challenge(credential.challenge.id, time.time())
        if challenge is None:
            return PaymentNeeded(f"challenge {credential.challenge.id} is unknown or expired")
        if challenge.model != model.lower():  # issued for the marketplace id, matched as routing matches it
            return PaymentNeeded(f"challenge {challenge.id} was issued for {challenge.model}, not {model}")
        return challenge
    return error_response(401, f"unsupported Authorization scheme {scheme!r}: use Bearer <API key> or Payment", "authentication_error", "invalid_auth")


def _within_quote(model: str, challenge: Challenge, candidates: list[Provider]) -> tuple[Challenge | PaymentNeeded, list[Provider]]:
    """The providers a buyer who paid against ``challenge`` may be routed to: none dearer than its
    quote (the seeds: the per-token price is visible before paying); all dearer now (a price
    raised since, or the cheap one gone): a fresh challenge, saying why."""
    within = [provider for provider in candidates if _quote(provider) <= challenge.amount]
    if candidates and not within:
        return PaymentNeeded(f"the providers of {model} now cost more than the {challenge.amount} units a token challenge {challenge.id} quoted"), []
    return challenge, within


def _quote(provider: Provider) -> int:
    """Base units a token that a challenge quotes for ``provider``: its dearer price's."""
    return payment.per_token_amount(max(provider.offer.input_price_per_million, provider.offer.output_price_per_million))


def _payment_required(store: Store, model: str, cheapest: Provider, reason: str) -> web.Response:
    challenge = store.issue_challenge(model.lower(), _quote(cheapest), payment.CHALLENGE_TTL_SECONDS, time.time())
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
