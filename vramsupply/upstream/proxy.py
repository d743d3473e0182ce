"""Forwarding a buyer's generation request to the upstream and its answer back.

The body is checked the way our own server checks it (a JSON object within the size limit, a model
this endpoint serves) and forwarded with the upstream's model name. Answers come back under our
model id. Streams are relayed event by event as they arrive, never buffered. Every answer is
counted from its usage (``usage``) and recorded in the earnings ledger before its last byte goes
out; an abandoned stream has no usage and is not recorded. A buyer who hangs up cancels this
handler (aiohttp's handler cancellation), which closes the upstream connection: vLLM, SGLang and
llama-server abort a generation whose client went away.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from vramsupply.server.accounting import FinishedRequest
from vramsupply.server.errors import ApiError
from vramsupply.server.responses import new_id
from vramsupply.upstream.client import GENERATION_TIMEOUT, UpstreamUnavailable, describe
from vramsupply.upstream.front import FrontState, front_state
from vramsupply.upstream.sse import DONE, encode_event, event_data, parse_chunk, sse_events
from vramsupply.upstream.usage import CountedUsage, UsageCounter, usage_of

log = logging.getLogger("vramsupply.upstream")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
    state.counters.in_flight += 1
    try:
        async with state.client.session.post(state.client.base_url + path, json=upstream_body, timeout=GENERATION_TIMEOUT) as reply:
            if reply.status != 200:
                return await relay_error(reply)
            if streaming:
                return await relay_stream(request, reply, exchange)
            return await relay_body(reply, exchange)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        log.warning("the upstream failed before answering %s: %s", path, describe(exc))
        raise ApiError(502, f"The model server behind this endpoint failed: {describe(exc)}", type="server_error", code="upstream_error") from None
    finally:
        state.counters.in_flight -= 1


async def read_body(request: web.Request, state: FrontState) -> dict[str, Any]:
    """A JSON object (aiohttp answers 413 past the size limit) naming a model we serve, or none."""
    raw = await request.read()
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
    return body


async def relay_error(reply: aiohttp.ClientResponse) -> web.Response:
    """The upstream's own error, kept when it is OpenAI-shaped, else wrapped in that shape."""
    raw = await reply.read()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        headers = {"Retry-After": reply.headers["Retry-After"]} if "Retry-After" in reply.headers else None
        return web.json_response(payload, status=reply.status, headers=headers)
    message = raw.decode("utf-8", "replace").strip()[:500] or reply.reason or "error"
    if isinstance(payload, dict) and isinstance(payload.get("detail"), (str, list)):
        message = json.dumps(payload["detail"]) if isinstance(payload["detail"], list) else payload["detail"]
    error_type = "invalid_request_error" if reply.status < 500 else "server_error"
    raise ApiError(reply.status, f"The model server refused the request: {message}", type=error_type, code="upstream_error")


@dataclass
class Exchange:
    """One forwarded request: what it asked, the text that came back (for counting), its usage."""

    state: FrontState
    path: str
    body: dict[str, Any]
    buyer_wants_usage: bool
    texts: dict[int, str] = field(default_factory=dict)
    usage: CountedUsage | None = None
    request_id: str = ""

    def collect(self, chunk: dict[str, Any]) -> None:
        """Keep the answer's id and each choice's generated text, in case the upstream reports no usage."""
        if not self.request_id and isinstance(chunk.get("id"), str):
            self.request_id = chunk["id"]
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict):
                index = choice["index"] if isinstance(choice.get("index"), int) else 0
                self.texts[index] = self.texts.get(index, "") + text_of(choice)

    async def settle(self) -> CountedUsage | None:
        """The usage to bill: the upstream's, else counted with the tokenizer; recorded once."""
        if self.usage is None:
            counter = UsageCounter(self.state.client, self.state.tokenizer)
            try:
                self.usage = await counter.count(self.path, self.body, [self.texts[i] for i in sorted(self.texts)])
            except UpstreamUnavailable as exc:  # the answer was delivered; an uncounted request is logged, not failed
                log.warning("could not count the usage of a %s answer: %s", self.path, describe(exc))
                return None
        record(self.state, self.usage)
        await self.state.accounts.record(self.finished(self.usage))
        return self.usage

    def finished(self, usage: CountedUsage) -> FinishedRequest:
        """The earnings ledger's record, written before the buyer receives the last byte."""
        return FinishedRequest(
            request_id=self.request_id or new_id("req"),
            model=self.state.model_id,
            choices=max(1, len(self.texts)),
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            complete=True,
            token_presented=self.state.endpoint_token is not None,
        )


def text_of(choice: dict[str, Any]) -> str:
    """The generated text of a choice or delta: ``text``, or the message's content and reasoning."""
    if isinstance(choice.get("text"), str):
        return str(choice["text"])
    message = choice.get("delta") if isinstance(choice.get("delta"), dict) else choice.get("message")
    if not isinstance(message, dict):
        return ""
    parts = [message.get("reasoning_content"), message.get("content")]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts += [function.get("name"), function.get("arguments")]
    return "".join(part for part in parts if isinstance(part, str))


def record(state: FrontState, usage: CountedUsage) -> None:
    counters = state.counters
    counters.requests_total += 1
    counters.prompt_tokens_total += usage.prompt_tokens
    counters.completion_tokens_total += usage.completion_tokens
    counters.cached_tokens_total += usage.cached_tokens
    counters.usage_sources[usage.source] = counters.usage_sources.get(usage.source, 0) + 1
    # /metrics reads these counters at scrape time (FrontState.stats), as heartbeats do.


async def relay_body(reply: aiohttp.ClientResponse, exchange: Exchange) -> web.Response:
    try:
        payload = await reply.json(content_type=None)
    except ValueError:  # not JSON, or not UTF-8 text
        payload = None
    if not isinstance(payload, dict):
        raise ApiError(502, "The model server answered with something other than a JSON object.", type="server_error", code="upstream_error")
    exchange.usage = usage_of(payload)
    exchange.collect(payload)
    usage = await exchange.settle()
    if usage is not None and usage.source != "upstream":
        payload["usage"] = usage.as_json()
    if "model" in payload:
        payload["model"] = exchange.state.model_id
    return web.json_response(payload)


async def relay_stream(request: web.Request, reply: aiohttp.ClientResponse, exchange: Exchange) -> web.StreamResponse:
    """Each upstream event goes out as soon as it is complete; usage is taken from the final chunk
    we asked for and shown to the buyer only if they asked for it too."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        try:
            async for event in sse_events(reply.content):
                out = rewrite(event, exchange)
                if out is not None:
                    await response.write(out)
        except ConnectionResetError:
            raise  # a write to the buyer (aiohttp's ClientConnectionResetError is also a ClientError)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("the upstream stream ended early: %s", describe(exc))
            await response.write(encode_event({"error": {"message": f"The model server failed mid-stream: {describe(exc)}", "type": "server_error", "param": None, "code": "upstream_error"}}))
        else:
            await finish_stream(response, exchange)
    except ConnectionResetError:
        # The buyer left while a write that does not wait was under way (a hang-up at any other
        # moment cancels this handler): nobody is left to answer, and it is no server error.
        log.debug("the buyer hung up before the stream ended")
    return response


def rewrite(event: bytes, exchange: Exchange) -> bytes | None:
    """One event as the buyer gets it: our model id, usage only if asked; [DONE] is held back."""
    data = event_data(event)
    if data is None:
        return event + b"\n"
    if data == DONE:
        return None
    chunk = parse_chunk(data)
    if chunk is None:
        return encode_event(data)
    usage = usage_of(chunk)
    if usage is not None:
        exchange.usage = usage
    exchange.collect(chunk)
    if not exchange.buyer_wants_usage:
        chunk.pop("usage", None)
        if usage is not None and chunk.get("choices") == []:
            return None
    if "model" in chunk:
        chunk["model"] = exchange.state.model_id
    return encode_event(chunk)


async def finish_stream(response: web.StreamResponse, exchange: Exchange) -> None:
    """Count the answer; a buyer who asked for usage gets our count if the upstream sent none."""
    had_usage = exchange.usage is not None
    usage = await exchange.settle()
    if exchange.buyer_wants_usage and usage is not None and not had_usage:
        await response.write(encode_event({"object": "chat.completion.chunk" if exchange.path == "/chat/completions" else "text_completion", "model": exchange.state.model_id, "choices": [], "usage": usage.as_json()}))
    await response.write(encode_event(DONE))
    await response.write_eof()
