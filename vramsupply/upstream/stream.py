"""Relaying an upstream's stream to the buyer, event by event, as each arrives.

Only what an OpenAI client can read goes out: ``data:`` events holding a JSON object (under our
model id, its usage as billed) and keep-alive comments; other lines (``event:``, ``id:``, text
that is not JSON) are dropped. Usage is taken from the final chunk we asked for, and shown to the
buyer only if they asked for it too. A usage that counts one choice of several (llama-server's,
vLLM's ``continuous_usage_stats`` in each chunk) is not billed, and shows as null (``Exchange.take_usage``).

Once the stream has begun there is no status left to change, so every failure (the upstream cut,
too slow, a malformed chunk, an oversized event, an error chunk of its own) ends it with one
OpenAI-shaped error event. What was sent until then is still billed, marked incomplete, as is a
stream that ends without ``[DONE]``; one that ends before any answer (llama_cpp.server's error
after its 200 headers, for a prompt past its context) is such a failure, and is not billed. So does a stream the drain's deadline ends (``Stopped``), with
the error event our own engine sends then (code ``shutting_down``), once its upstream request is
closed: the upstream stops generating for nobody. A stream whose upstream the watch gave up
(``front.GivenUp``: it stopped answering) ends the same way, with an error event that says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from vramsupply.server.state import BUYER_LEFT
from vramsupply.upstream.client import describe
from vramsupply.upstream.exchange import Exchange
from vramsupply.upstream.front import Forwarded, GivenUp, shutting_down_error
from vramsupply.upstream.limits import BadAnswer, Deadline
from vramsupply.upstream.refusal import printable
from vramsupply.upstream.sse import DONE, encode_event, event_data, is_comment, parse_chunk, sse_events
from vramsupply.upstream.usage import usage_of

log = logging.getLogger("vramsupply.upstream")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class UpstreamErrorEvent(BadAnswer):
    """The upstream's own error chunk in the middle of a stream."""


class Stopped(BadAnswer):
    """The drain's deadline ended the stream (``front.Forwarded``), not the upstream."""

    status = 503
    code = "shutting_down"


async def relay_stream(
    request: web.Request, reply: aiohttp.ClientResponse, exchange: Exchange, deadline: Deadline, forwarded: Forwarded
) -> web.StreamResponse:
    if reply.content_type == "application/json":  # before any byte goes out, so still a 502
        raise BadAnswer("it answered a stream request with a whole JSON answer")
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        failure = await relay_until_stopped(reply, response, exchange, deadline, forwarded)
        with forwarded.settling():  # what was relayed is counted and the stream ended, drain or not
            if failure is None:
                await finish_stream(response, exchange)
            else:
                await fail_stream(response, exchange, failure)
    except ConnectionResetError:
        # The buyer left while a write that does not wait was under way (a hang-up at any other
        # moment cancels this handler): nobody is left to answer, and it is no server error.
        log.debug("the buyer hung up before the stream ended")
        request[BUYER_LEFT] = True
    return response


async def relay_until_stopped(
    reply: aiohttp.ClientResponse, response: web.StreamResponse, exchange: Exchange, deadline: Deadline, forwarded: Forwarded
) -> BadAnswer | None:
    """``relay_events``, unless the drain's deadline ends it first: then the upstream request is closed."""
    try:
        failure = await relay_events(reply, response, exchange, deadline, forwarded)
    except asyncio.CancelledError:
        if not forwarded.stopped():  # the buyer hung up: aiohttp's cancellation goes on
            raise
        failure = ended_by(forwarded)
    if isinstance(failure, (Stopped, GivenUp)):
        reply.close()
    return failure


def ended_by(forwarded: Forwarded) -> BadAnswer:
    """Why our own cancellation ended a stream: the watch gave the upstream up, or the drain."""
    return forwarded.failure or Stopped("the endpoint is shutting down")


async def relay_events(
    reply: aiohttp.ClientResponse, response: web.StreamResponse, exchange: Exchange, deadline: Deadline, forwarded: Forwarded
) -> BadAnswer | None:
    """Relay until ``[DONE]`` or the end; why the stream failed, or None."""
    limits = exchange.state.limits
    events = sse_events(reply.content, limits.max_event_bytes)
    deadline.expect(limits.first_event_seconds, "first event")
    try:
        while (event := await next_event(events, deadline)) is not None:
            if forwarded.stopped():  # it came as we cancelled the wait for it: not relayed
                return ended_by(forwarded)
            data = event_data(event)
            if data == DONE:
                return None
            if data is not None:
                deadline.expect(limits.idle_seconds, "event")
            out = rewrite(event, data, exchange)
            if out is not None:
                await response.write(out)
        if exchange.usage is None and not any(exchange.texts.values()):  # llama_cpp.server's error after its headers
            return BadAnswer("its stream ended before any answer")
        exchange.complete = False
        log.warning("the upstream ended a %s stream without [DONE]; billed as incomplete", exchange.path)
        return None
    except ConnectionResetError:
        raise  # a write to the buyer (aiohttp's ClientConnectionResetError is also a ClientError)
    except BadAnswer as exc:
        return exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return BadAnswer(describe(exc))
    except Exception:  # our own bug: logged with its traceback, and the buyer's stream still ends
        log.exception("relaying a %s stream failed", exchange.path)
        return BadAnswer("an internal error of the endpoint")
    finally:
        await events.aclose()


async def next_event(events: AsyncIterator[bytes], deadline: Deadline) -> bytes | None:
    try:
        return await deadline.within(events.__anext__())
    except StopAsyncIteration:
        return None


def rewrite(event: bytes, data: str | None, exchange: Exchange) -> bytes | None:
    """One event as the buyer gets it (see the module docstring); None when it is dropped."""
    if data is None:
        return event + b"\n" if is_comment(event) else None
    chunk = parse_chunk(data)
    if chunk is None:
        log.debug("dropped an upstream event that is not a JSON object: %s", printable(data, 100))
        return None
    if "error" in chunk:
        raise UpstreamErrorEvent(f"it reported {printable(error_message(chunk['error']), 200)}")
    usage = exchange.take_usage(usage_of(chunk, exchange.bounds), of_a_choice=bool(chunk.get("choices")))
    had_usage_field, upstream_usage = "usage" in chunk, chunk.pop("usage", None)
    exchange.collect(chunk)
    if upstream_usage is not None and chunk.get("choices") == [] and (usage is None or not exchange.buyer_wants_usage):
        return None  # a usage chunk the buyer did not ask for, or an implausible one (ours comes at the end)
    if exchange.buyer_wants_usage and had_usage_field:
        chunk["usage"] = usage.as_json() if usage is not None else None
    if "model" in chunk:
        chunk["model"] = exchange.state.model_id
    return encode_event(chunk)


def error_message(error: object) -> str:
    message = error.get("message") if isinstance(error, dict) else error
    return message if isinstance(message, str) else "an error"


async def finish_stream(response: web.StreamResponse, exchange: Exchange) -> None:
    """Count the answer; a buyer who asked for usage gets our count if the upstream sent none."""
    had_usage = exchange.usage is not None
    usage = await exchange.settle()
    if exchange.buyer_wants_usage and usage is not None and not had_usage:
        kind = "chat.completion.chunk" if exchange.path == "/chat/completions" else "text_completion"
        chunk = {"id": exchange.request_id, "object": kind, "created": exchange.created, "model": exchange.state.model_id, "choices": [], "usage": usage.as_json()}
        await response.write(encode_event(chunk))
    await response.write(encode_event(DONE))
    await response.write_eof()


async def fail_stream(response: web.StreamResponse, exchange: Exchange, failure: BadAnswer) -> None:
    """One error event, then what was sent is billed (as incomplete), then the stream ends: counting
    may need the upstream's tokenizer, which a hung upstream answers only at ``settle_failed``'s
    bound, and the buyer's client, which stops at the error event, is not kept waiting for that."""
    if isinstance(failure, Stopped):
        log.info("the drain's deadline ended a %s stream; what was sent is billed as incomplete", exchange.path)
        error = shutting_down_error().body()["error"]
    else:
        log.warning("the upstream's %s stream failed: %s", exchange.path, failure)
        error = {"message": f"The model server failed mid-stream: {failure}.", "type": "server_error", "param": None, "code": failure.code}
    try:
        await response.write(encode_event({"error": error}))  # an OpenAI client stops at this event
    finally:
        await exchange.settle_failed()
    await response.write_eof()  # the record is written before the stream's last byte, as a whole answer's
