"""A hostile OpenAI-compatible upstream, in process, for the upstream tests: llama-server's
documented surface (``LlamaServerSurface``) whose generations misbehave the way each test says.

A test sets ``generation`` to a handler (``async def (request, body) -> StreamResponse``); the
helpers below write the usual misbehaviours. ``/tokenize`` counts one token per character, plus
BOS when asked for it (``add_special``, as llama-server's), and a non-streamed 1-token replay reports ``REPLAY_PROMPT_TOKENS``, so an answer without a
usable usage is still counted (``vramsupply.upstream.usage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from llama_server_surface import LlamaServerSurface

from vramsupply.server.accounting import FinishedRequest
from vramsupply.upstream import UpstreamBackend, UpstreamOptions
from vramsupply.upstream.limits import RelayLimits

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]
MODEL = "qwen/qwen3-8b"
REPLAY_PROMPT_TOKENS = 7
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}]}


def chunk(text: str | None = None, **fields: Any) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": choices, **fields}


def event(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def whole(content: str = "hi there", **fields: Any) -> dict[str, Any]:
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
    return {**answer, **fields}


async def sse(request: web.Request, *parts: bytes, then: Callable[[], Awaitable[None]] | None = None) -> web.StreamResponse:
    """A stream of ``parts`` (written as they are), then ``then`` (e.g. hang), then its end."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for part in parts:
        await response.write(part)
    if then is not None:
        await then()
    await response.write_eof()
    return response


def answering(payload: Any, status: int = 200, **kwargs: Any) -> Handler:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response(payload, status=status, **kwargs)

    return handler


def streaming(*parts: bytes, then: Callable[[], Awaitable[None]] | None = None) -> Handler:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await sse(request, *parts, then=then)

    return handler


async def hang() -> None:
    await asyncio.sleep(3600)


class HostileUpstream(LlamaServerSurface):
    def __init__(self) -> None:
        self.generation: Handler = answering(whole(usage={"prompt_tokens": 5, "completion_tokens": 2}))
        self.metrics_text = self.METRICS
        self.models = ["qwen3-8b-q4_k_m.gguf"]
        self.models_status = 200
        self.healthy = True
        self.tokenizes = True
        self.counting_bomb: bytes | None = None
        """Gzip that ``bombed`` (the tokenizer, the prompt-counting replay) answer with, when set."""
        self.bombed: set[str] = {"tokenize", "replay"}
        self.stopped = False
        """SIGSTOP, played in process: every new request is taken and left unanswered until it is False."""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.frozen])
        for path in self.ANSWERS:
            app.router.add_get(path, self.answer)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/tokenize", self.tokenize)
        return app

    @web.middleware
    async def frozen(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        while self.stopped:
            await asyncio.sleep(0.05)
        return await handler(request)

    async def answer(self, request: web.Request) -> web.Response:  # /health, /v1/models, /props
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": name} for name in self.models]}, status=self.models_status)
        if request.path == "/health" and not self.healthy:
            return web.Response(status=500)
        return await super().answer(request)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body.get("max_tokens") == 1 and not body.get("stream"):  # the prompt-counting replay
            if self.counting_bomb is not None and "replay" in self.bombed:
                return self.bomb()
            return web.json_response(whole("x", usage={"prompt_tokens": REPLAY_PROMPT_TOKENS, "completion_tokens": 1}))
        return await self.generation(request, body)

    def bomb(self) -> web.Response:
        return web.Response(body=self.counting_bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async def tokenize(self, request: web.Request) -> web.Response:
        if not self.tokenizes:
            return web.Response(status=404)
        if self.counting_bomb is not None and "tokenize" in self.bombed:
            return self.bomb()
        body = await request.json()
        return web.json_response({"tokens": list(range(len(body["content"]) + (1 if body.get("add_special") else 0)))})


class VllmUpstream(HostileUpstream):
    """The same, with vLLM's surface where it differs from llama-server's: no ``/props``, and its
    model card says the context (``max_model_len``)."""

    async def answer(self, request: web.Request) -> web.Response:
        if request.path == "/props":
            return web.json_response({"error": {"message": "Not Found"}}, status=404)
        if request.path == "/v1/models":
            return web.json_response({"data": [{"id": name, "max_model_len": 8192} for name in self.models]}, status=self.models_status)
        return await super().answer(request)


@dataclass
class Ledger:
    """The earnings ledger as the front's recorder sees it: every row it was asked to write."""

    rows: list[FinishedRequest] = field(default_factory=list)
    failure: str | None = None

    async def record(self, finished: FinishedRequest) -> None:
        self.rows.append(finished)


@dataclass
class Front:
    url: str
    backend: UpstreamBackend
    buyer: aiohttp.ClientSession
    ledger: Ledger

    async def post(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[int, Any]:
        async with self.buyer.post(self.url + path, json=body) as response:
            return response.status, await response.json(content_type=None)

    async def stream(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> list[Any]:
        """The events a buyer reads, until the stream ends: JSON objects, and "[DONE]"."""
        async with self.buyer.post(self.url + path, json={**body, "stream": True}) as response:
            assert response.status == 200
            text = (await response.read()).decode()
        events = [block.removeprefix("data: ") for block in text.split("\n\n") if block.startswith("data: ")]
        return [e if e == "[DONE]" else json.loads(e) for e in events]

    async def health(self) -> tuple[int, Any]:
        async with self.buyer.get(self.url + "/health") as response:
            return response.status, await response.json()


@contextlib.asynccontextmanager
async def fronted(upstream: HostileUpstream, limits: RelayLimits | None = None, **options: Any) -> AsyncIterator[Front]:
    """Our front, served for real on localhost, before ``upstream``; ready when entered."""
    async with TestServer(upstream.app(), host="127.0.0.1") as http:
        settings = {"model": MODEL, "upstream_model": None, "url": str(http.make_url("/v1")), "check_interval": 0.05, **options}
        backend = UpstreamBackend(UpstreamOptions("upstream", **settings))
        await backend.prepare()
        try:
            app = backend.create_app(None, 1 << 16)
            assert backend.state is not None
            backend.state.limits = limits or RelayLimits()
            ledger = Ledger()
            backend.state.accounts.recorder = ledger
            async with TestServer(app, host="127.0.0.1") as front, aiohttp.ClientSession() as buyer:
                assert await backend.start(asyncio.Event())
                yield Front(str(front.make_url("")).rstrip("/"), backend, buyer, ledger)
        finally:
            await backend.close()
