"""Counting a stream's usage through connections the upstream has closed: the buyer still gets it.

llama-server closes the connection after every streamed answer, though its headers offer to keep it
alive, and any server closes one idle past its keep-alive. aiohttp pooled such a connection, the
tokenize call counting the stream took it, and failed: against the real llama-server two streams
in three of ``n`` 2 (or of a batch of prompts) ended without the usage the buyer asked for.

The double here closes a connection as the next request arrives on it, rather than just after its
answer as llama-server does: the same failure, met every time instead of by a race.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from doubles.hostile_upstream import CHAT, MODEL, REPLAY_PROMPT_TOKENS, HostileUpstream, chunk, event, fronted

TEXTS = {0: "Once upon", 1: "The end"}
PROMPTS = ["Tell me", "A story about the sea"]


class ClosingUpstream(HostileUpstream):
    """Closes, unanswered, a request on a connection that already carried a POST: after a stream
    (``closing`` "stream": llama-server's habit), or any POST for a tokenize call coming on it
    ("any": a keep-alive that ran out just then; the front keeps connections less long than the
    upstreams, so a race it meets only in its counting, which asks again)."""

    def __init__(self, closing: str) -> None:
        super().__init__()
        self.closing = closing
        self.spent: set[object] = set()
        self.dropped = 0
        self.generation = self.llama_server_stream

    def app(self) -> web.Application:
        app = super().app()
        app.middlewares.append(self.closes_spent_connections)
        return app

    @web.middleware
    async def closes_spent_connections(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if transport in self.spent and (self.closing == "stream" or request.path == "/tokenize"):
            self.dropped += 1
            transport.close()  # the client reads the end of the connection, and no answer
            return web.Response(status=204)
        response = await handler(request)
        if request.method == "POST" and (self.closing == "any" or isinstance(response, web.StreamResponse) and response.content_type == "text/event-stream"):
            self.spent.add(transport)
        return response

    async def llama_server_stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """llama-server's stream of ``n`` 2 (each choice's usage) or of a batch of two prompts (each its own)."""
        chat = "messages" in body
        usage = [{"prompt_tokens": REPLAY_PROMPT_TOKENS if chat else len(PROMPTS[i]) + 1, "completion_tokens": len(TEXTS[i]) + chat} for i in TEXTS]
        parts = [event(choice(chat, i, TEXTS[i], None)) for i in TEXTS]
        for i in (1, 0):
            parts += [event(choice(chat, i, "", "stop" if chat else "length")), event({**choice(chat, 0, "", None), "choices": [], "usage": usage[i]})]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in [*parts, event("[DONE]")]:
            await response.write(part)
        await response.write_eof()
        return response


def choice(chat: bool, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return chunk(choices=[{"index": index, "delta": {"content": text} if text else {}, "finish_reason": finish}])
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [{"index": index, "text": text, "finish_reason": finish}]}


@pytest.mark.parametrize("closing", ["stream", "any"], ids=["closed-after-a-stream", "closed-when-reused"])
async def test_a_stream_counted_through_a_connection_the_upstream_closed_still_ends_with_its_usage(closing: str) -> None:
    upstream = ClosingUpstream(closing)
    usage_asked = {"stream_options": {"include_usage": True}}
    async with fronted(upstream) as front:
        chat = await front.stream({**CHAT, "n": 2, **usage_asked})
        batch = await front.stream({"model": MODEL, "prompt": PROMPTS, "max_tokens": 2, **usage_asked}, "/v1/completions")
        again = await front.stream({**CHAT, "n": 2, **usage_asked})
        rows = front.ledger.rows
    chat_tokens = (REPLAY_PROMPT_TOKENS, sum(len(t) + 1 for t in TEXTS.values()))  # each choice's text and its EOS
    batch_tokens = (sum(len(p) + 1 for p in PROMPTS), sum(len(t) for t in TEXTS.values()))  # each prompt's BOS
    for events, (prompt, completion) in ((chat, chat_tokens), (batch, batch_tokens), (again, chat_tokens)):
        assert events[-1] == "[DONE]"
        shown = events[-2].get("usage") or {}
        assert (shown.get("prompt_tokens"), shown.get("completion_tokens")) == (prompt, completion), "the usage the buyer asked for"
    assert [(r.prompt_tokens, r.completion_tokens, r.complete) for r in rows] == [(*chat_tokens, True), (*batch_tokens, True), (*chat_tokens, True)]
    if closing == "stream":
        assert upstream.dropped == 0, "a stream's connection is not used again: the front asks for one of its own"
    else:
        assert upstream.dropped > 0, "the front met closed connections, and asked again"
