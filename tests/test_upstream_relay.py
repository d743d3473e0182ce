"""Answers relayed from an upstream engine: a buyer who leaves just as a stream ends, and an
answer that is not JSON.

The upstream is a test double: an in-process aiohttp app playing llama-server's documented
surface (``LlamaServerSurface``) plus a chat stream of a few events, usage and ``[DONE]``. The
front in between is ours, served for real on localhost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import buyer_leaves_just_before_the_end, lines_of_a_cut_stream
from llama_server_surface import LlamaServerSurface
from vramsupply.upstream import UpstreamBackend, UpstreamOptions

PIECES = ["Once", " upon", " a", " time"]


class StreamingSurface(LlamaServerSurface):
    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):  # a proxy's page in Latin-1, claiming UTF-8
            return web.Response(body=b"<html>Acc\xe8s refus\xe9</html>", content_type="text/html", charset="utf-8")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in PIECES:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": piece}}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": 3, "completion_tokens": len(PIECES), "total_tokens": 3 + len(PIECES)}
        await response.write(f"data: {json.dumps({'id': 'chatcmpl-1', 'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


async def test_a_buyer_leaving_as_a_relayed_stream_ends_is_no_server_error(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async with TestServer(StreamingSurface().app(), host="127.0.0.1") as upstream:
        backend = UpstreamBackend(UpstreamOptions("upstream", model="qwen/qwen3-8b", upstream_model=None, url=str(upstream.make_url("/v1"))))
        await backend.prepare()
        try:
            app = backend.create_app(None, 1 << 16)
            async with TestServer(app, host="127.0.0.1") as front, aiohttp.ClientSession() as buyer:
                assert await backend.start(asyncio.Event())
                buyer_leaves_just_before_the_end(monkeypatch, app)
                body = {"model": "qwen/qwen3-8b", "messages": [{"role": "user", "content": "Tell me a story"}], "stream": True}
                with caplog.at_level(logging.DEBUG, logger="vramsupply.upstream"):
                    async with buyer.post(front.make_url("/v1/chat/completions"), json=body) as response:
                        lines = await lines_of_a_cut_stream(response)

                assert b"data: [DONE]\n" in lines, "every event was relayed"
                assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "nothing for the provider to worry about"
                assert any("hung up before the stream ended" in r.getMessage() for r in caplog.records)
                assert backend.state is not None
                counters = backend.state.counters
                assert (counters.requests_total, counters.completion_tokens_total, counters.in_flight) == (1, len(PIECES), 0), "the answer was counted"
        finally:
            await backend.close()


async def test_an_upstream_answer_that_is_not_json_is_a_502_for_the_buyer(caplog: pytest.LogCaptureFixture) -> None:
    async with TestServer(StreamingSurface().app(), host="127.0.0.1") as upstream:
        backend = UpstreamBackend(UpstreamOptions("upstream", model="qwen/qwen3-8b", upstream_model=None, url=str(upstream.make_url("/v1"))))
        await backend.prepare()
        try:
            async with TestServer(backend.create_app(None, 1 << 16), host="127.0.0.1") as front, aiohttp.ClientSession() as buyer:
                assert await backend.start(asyncio.Event())
                body = {"model": "qwen/qwen3-8b", "messages": [{"role": "user", "content": "Tell me a story"}]}
                async with buyer.post(front.make_url("/v1/chat/completions"), json=body) as response:
                    assert response.status == 502
                    error = (await response.json())["error"]
            assert (error["code"], error["message"]) == ("upstream_error", "The model server behind this endpoint failed: it answered with something other than a JSON object.")
            assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
        finally:
            await backend.close()


WORDS = {0: ["Once", " upon", " a", " time"], 1: ["The", " end"]}  # two choices: 4 and 2 tokens


class CompletionsSurface(LlamaServerSurface):
    """llama-server's surface with /v1/completions and /tokenize, each answered as a subclass says."""

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/tokenize", self.tokenize)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def tokenize(self, request: web.Request) -> web.Response:
        text = (await request.json())["content"]
        return web.json_response({"tokens": [1] + list(range(len(text.split())))})  # BOS, then a token per word


@asynccontextmanager
async def fronting(surface: LlamaServerSurface) -> AsyncIterator[tuple[UpstreamBackend, TestServer, aiohttp.ClientSession]]:
    """Our front, served for real, before ``surface``; and a buyer's HTTP session."""
    async with TestServer(surface.app(), host="127.0.0.1") as upstream:
        backend = UpstreamBackend(UpstreamOptions("upstream", model="qwen/qwen3-8b", upstream_model=None, url=str(upstream.make_url("/v1"))))
        await backend.prepare()
        try:
            async with TestServer(backend.create_app(None, 1 << 16), host="127.0.0.1") as front, aiohttp.ClientSession() as buyer:
                assert await backend.start(asyncio.Event())
                yield backend, front, buyer
        finally:
            await backend.close()


class ManyChoicesSurface(CompletionsSurface):
    """llama-server's answer to ``n`` 2 as it gives it: both choices, and a usage that counts one
    choice's tokens (measured on a real llama-server of the vendored llama.cpp), its end-of-sequence
    token included: each choice ended with one ("stop" with no stop string)."""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        usage = {"prompt_tokens": 5, "completion_tokens": len(WORDS[0]) + 1, "total_tokens": 5 + len(WORDS[0]) + 1}
        if not (await request.json()).get("stream"):
            choices = [{"index": i, "text": "".join(words), "finish_reason": "stop"} for i, words in WORDS.items()]
            return web.json_response({"id": "cmpl-1", "object": "text_completion", "choices": choices, "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, words in WORDS.items():
            for word in words:
                chunk = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": i, "text": word, "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            own = {"prompt_tokens": 5, "completion_tokens": len(words) + 1, "total_tokens": 5 + len(words) + 1}  # each choice's final chunk
            end = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": i, "text": "", "finish_reason": "stop"}], "usage": own}
            await response.write(f"data: {json.dumps(end)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_llama_servers_usage_of_n_choices_is_counted_for_every_choice(stream: bool) -> None:
    """llama-server counts one choice's tokens in the usage of an answer with ``n`` choices: the
    provider was paid for 5 tokens of 8, and the buyer was shown 5; counted from their text, each
    choice's end-of-sequence token was then left out (6 of 8)."""
    async with fronting(ManyChoicesSurface()) as (backend, front, buyer):
        body = {"model": "qwen/qwen3-8b", "prompt": "Tell me", "n": 2, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
        async with buyer.post(front.make_url("/v1/completions"), json=body) as response:
            assert response.status == 200
            if stream:
                events = [json.loads(line[6:]) for line in (await response.text()).splitlines() if line.startswith("data: {")]
                [usage] = [event["usage"] for event in events if event.get("usage")]
            else:
                usage = (await response.json())["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (5, 8), "the prompt once, every choice's tokens and its EOS"
        assert backend.state is not None
        assert (backend.state.counters.prompt_tokens_total, backend.state.counters.completion_tokens_total) == (5, 8)


class HangingSurface(CompletionsSurface):
    """llama-server stopped (SIGSTOP) mid-stream: two words, then nothing, and its /tokenize (which
    counting what was sent needs) does not answer either."""

    async def tokenize(self, request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.json_response({})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("Once", " upon"):
            chunk = {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": word, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(60)
        return response


async def test_a_hung_upstreams_stream_ends_for_the_buyer_at_the_idle_bound_not_after_counting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error event waited for counting what was sent, which asks the hung upstream's tokenizer:
    the buyer got it 12 s after the idle bound."""
    monkeypatch.setattr("vramsupply.upstream.exchange.SETTLE_AFTER_FAILURE_SECONDS", 5.0)
    async with fronting(HangingSurface()) as (backend, front, buyer):
        assert backend.state is not None
        backend.state.limits = dataclasses.replace(backend.state.limits, idle_seconds=1.0)
        body = {"model": "qwen/qwen3-8b", "prompt": "Tell me", "stream": True}
        async with buyer.post(front.make_url("/v1/completions"), json=body) as response:
            async for line in response.content:
                if line.startswith(b"data: ") and b'"text": " upon"' in line.replace(b'":"', b'": "'):
                    last_word = asyncio.get_running_loop().time()
                if line.startswith(b'data: {"error"'):
                    error_after = asyncio.get_running_loop().time() - last_word
                    break
    assert 0.9 < error_after < 3.5, error_after  # the idle bound (1 s), not it plus counting's (5 s)
