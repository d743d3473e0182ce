"""Forwarding a buyer's generation request to the upstream and its answer back.

The body is checked the way our own server checks it (a JSON object within the size limit, a model
this endpoint serves) and forwarded with the upstream's model name. Answers come back under our
model id. Streams are relayed event by event as they arrive (``stream``), never buffered. Every
answer is counted from its usage (``usage``) and recorded in the earnings ledger before its last
byte goes out; an abandoned stream has no usage and is not recorded (its row in flight goes too:
``exchange``). A buyer who hangs up cancels this handler (aiohttp's handler cancellation), which
closes the upstream connection: vLLM, SGLang and llama-server abort a generation whose client went away.

Whatever the upstream does, the buyer gets OpenAI error JSON for it: a status that is not the
buyer's fault becomes 502 (``refusal``), an unusable or oversized answer 502 and a slow one 504
(``limits``). Redirects are not followed: an upstream that redirects a generation is misconfigured.
A request that comes while the watch reads the upstream's ``/v1/models`` waits for that read to end
before it is forwarded (``front.IdleReadGate``): on llama_cpp.server the two would meet at its lock.
At the drain's deadline a request still waiting ends as our own engine's does (``front.Forwarded``):
503 ``shutting_down``, its upstream request closed; when the watch gives the upstream up (it stopped
answering), a 504 that says so (``front.GivenUp``), its upstream request closed too.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from vramsupply.server.errors import ApiError
from vramsupply.server.state import read_body as read_whole_body
from vramsupply.upstream.client import GENERATION_TIMEOUT, ONE_CONNECTION, describe
from vramsupply.upstream.exchange import Exchange
from vramsupply.upstream.front import Forwarded, FrontState, front_state, shutting_down_error
from vramsupply.upstream.limits import BadAnswer, Deadline, read_capped
from vramsupply.upstream.refusal import refusal
from vramsupply.upstream.stream import relay_stream
from vramsupply.upstream.usage import usage_of

log = logging.getLogger("vramsupply.upstream")


async def forward_chat(request: web.Request) -> web.StreamResponse:
    return await forward(request, "/chat/completions")


async def forward_completion(request: web.Request) -> web.StreamResponse:
    return await forward(request, "/completions")


async def forward(request: web.Request, path: str) -> web.StreamResponse:
    state = front_state(request)
    upstream_model = state.ready_upstream()
    body = await read_body(request, state)
    streaming = body.get("stream") is True
    options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
    upstream_body = {**body, "model": upstream_model}
    if streaming:
        upstream_body["stream_options"] = {**options, "include_usage": True}
    exchange = Exchange(state, path, body, buyer_wants_usage=streaming and options.get("include_usage") is True)
    with state.forwarding() as forwarded:
        return await forward_exchange(request, exchange, upstream_body, streaming, forwarded)


async def forward_exchange(
    request: web.Request, exchange: Exchange, upstream_body: dict[str, Any], streaming: bool, forwarded: Forwarded
) -> web.StreamResponse:
    """The answer, or OpenAI error JSON for whatever ended it before the answer began."""
    state, path = exchange.state, exchange.path
    state.counters.in_flight += 1  # before the gate: no idle /v1/models read starts once it is counted
    try:
        await state.idle_read.passed()
        return await ask_upstream(request, exchange, upstream_body, streaming, forwarded)
    except asyncio.CancelledError:
        if not forwarded.stopped():  # the buyer hung up: nobody to answer
            raise
        if forwarded.failure is not None:  # the watch gave the upstream up
            raise failed(path, forwarded.failure) from None
        log.info("the drain's deadline ended a %s request still waiting for the upstream", path)
        raise shutting_down_error() from None
    except BadAnswer as exc:
        raise failed(path, exc) from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("the upstream at %s failed before answering %s: %s", state.client.base_url, path, describe(exc))
        raise ApiError(502, f"The model server behind this endpoint failed: {describe(exc)}", type="server_error", code="upstream_error") from None
    finally:
        state.counters.in_flight -= 1
        exchange.unbilled()


def failed(path: str, exc: BadAnswer) -> ApiError:
    log.warning("the upstream's answer to %s could not be relayed: %s", path, exc)
    return ApiError(exc.status, f"The model server behind this endpoint failed: {exc}.", type="server_error", code=exc.code)


async def ask_upstream(
    request: web.Request, exchange: Exchange, upstream_body: dict[str, Any], streaming: bool, forwarded: Forwarded
) -> web.StreamResponse:
    """Post the request and relay what comes back, each step within ``RelayLimits``."""
    state, limits = exchange.state, exchange.state.limits
    if streaming:
        deadline = Deadline(limits.stream_seconds, limits.first_event_seconds, "headers")
    else:
        deadline = Deadline(limits.answer_seconds, limits.answer_seconds, "answer")
    url = state.client.base_url + exchange.path
    headers = ONE_CONNECTION if streaming else None  # llama-server closes it after a stream (``client``)
    reply = await deadline.within(state.client.session.post(url, json=upstream_body, headers=headers, timeout=GENERATION_TIMEOUT, allow_redirects=False))
    async with reply:
        if reply.status != 200:
            deadline.expect(limits.idle_seconds, "error body")
            raise await refusal(reply, exchange.path, limits.max_error_bytes, deadline)
        if streaming:
            return await relay_stream(request, reply, exchange, deadline, forwarded)
        return await relay_body(reply, exchange, deadline, forwarded)


async def read_body(request: web.Request, state: FrontState) -> dict[str, Any]:
    """A JSON object (413 past the size limit, 408 when it stops arriving, 400 when it is not in its
    stated Content-Encoding, as our own engine's front answers) naming a model we serve, or none."""
    raw = await read_whole_body(request)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "Invalid value for 'model': expected a string.", param="model", code="invalid_value")
    state.check_model(model)
    _check_streaming(body)
    return body


def _check_streaming(body: dict[str, Any]) -> None:
    """``stream`` decides how the answer is read: a "true" or 1 that vLLM and SGLang take for true
    (pydantic's lax parsing) had their stream read as a whole answer: a 502 for a bad field, and
    the work unbilled. Strict JSON types, as our own engine's front checks them."""
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise ApiError(400, "Invalid value for 'stream': Input should be a valid boolean", param="stream", code="invalid_value")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "Invalid value for 'stream_options': Input should be an object", param="stream_options", code="invalid_value")
    usage = (options or {}).get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise ApiError(400, "Invalid value for 'stream_options.include_usage': Input should be a valid boolean", param="stream_options.include_usage", code="invalid_value")


async def relay_body(reply: aiohttp.ClientResponse, exchange: Exchange, deadline: Deadline, forwarded: Forwarded) -> web.Response:
    """A whole answer, read within its size and time bounds, counted, under our model id."""
    raw = await read_capped(reply.content, exchange.state.limits.max_answer_bytes, deadline)
    try:
        payload = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8 text
        payload = None
    if not isinstance(payload, dict):
        raise BadAnswer("it answered with something other than a JSON object")
    exchange.take_usage(usage_of(payload, exchange.bounds))
    exchange.collect(payload, whole=True)
    with forwarded.settling():  # the answer is here: the drain lets it be counted and delivered
        usage = await exchange.settle()
    payload.pop("usage", None)  # billed as counted: an implausible usage never reaches the buyer
    if usage is not None:
        payload["usage"] = usage.as_json()
    if "model" in payload:
        payload["model"] = exchange.state.model_id
    return web.json_response(payload)
