"""What a provider selling through an upstream engine is paid for: every request billed from what the
model generated, as the upstream counts it, even when the upstream dies halfway through.

Most upstreams here are ``tests/doubles/hostile_upstream.py`` (whose tokenizer counts one token per
character, so a count is the length of the text counted); a few cases run a real
``python -m llama_cpp.server`` with the tiny model. The front in between is ours, served for real
on localhost, and its earnings ledger is the recorder the front was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from doubles.hostile_upstream import CHAT, MODEL, REPLAY_PROMPT_TOKENS, HostileUpstream, Ledger, VllmUpstream, answering, chunk, event, fronted, streaming, whole
from llama_cpp_upstream import LlamaCppServer

from vramsupply.upstream import UpstreamBackend, UpstreamOptions, exchange

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ARGUMENTS = ['{"ci', 'ty": "Pa', 'ris"}']


def call_chunk(arguments: str, name: str | None, call_index: int = 0) -> dict[str, Any]:
    function = {"arguments": arguments, **({"name": name} if name is not None else {})}
    delta = {"tool_calls": [{"index": call_index, "id": f"call_{call_index}", "type": "function", "function": function}]}
    return chunk(choices=[{"index": 0, "delta": delta, "finish_reason": None}])


def billed(rows: list[Any]) -> list[tuple[int, int, bool]]:
    return [(r.prompt_tokens, r.completion_tokens, r.complete) for r in rows]


@pytest.mark.parametrize("repeats_the_name", [True, False], ids=["name-in-every-chunk", "name-in-the-first-chunk"])
async def test_a_streamed_tool_call_is_billed_for_its_name_once_whatever_the_upstream_repeats(repeats_the_name: bool) -> None:
    """llama_cpp.server sends the call's name again in every chunk of it; OpenAI only in the first."""
    upstream = HostileUpstream()
    calls = [call_chunk(a, "get_weather" if repeats_the_name or i == 0 else None) for i, a in enumerate(ARGUMENTS)]
    second = call_chunk('{"city": "Rome"}', "get_weather", call_index=1)
    upstream.generation = streaming(*[event(c) for c in calls], event(second), event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream({**CHAT, "tools": [WEATHER], "stream_options": {"include_usage": True}})
        rows = front.ledger.rows
    generated = len("get_weather" + "".join(ARGUMENTS)) + len('get_weather{"city": "Rome"}')
    assert events[-2]["usage"]["completion_tokens"] == generated, "each call's name once, and all of its arguments"
    assert billed(rows) == [(REPLAY_PROMPT_TOKENS, generated, True)]


async def test_the_upstreams_usage_details_reach_the_buyer_as_checked_counts() -> None:
    upstream = HostileUpstream()
    usage = {
        "prompt_tokens": 5, "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0, "note": "x", "image_tokens": 6},
        "completion_tokens_details": {"reasoning_tokens": 3, "accepted_prediction_tokens": "1", "rejected_prediction_tokens": -1, "audio_tokens": 1.0},
    }
    upstream.generation = answering_then_streaming(usage)
    async with fronted(upstream) as front:
        status, answer = await front.post(CHAT)
        events = await front.stream({**CHAT, "stream_options": {"include_usage": True}})
    shown = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
             "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 3}}
    assert status == 200 and answer["usage"] == shown, "numbers within the total they detail are passed on; anything else is not"
    assert events[-2]["usage"] == shown


def answering_then_streaming(usage: dict[str, Any]):  # type: ignore[no-untyped-def]
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if not body.get("stream"):
            return web.json_response(whole(usage=usage))
        return await streaming(event(chunk("hi")), event(chunk(usage=usage)), event("[DONE]"))(request, body)

    return handler


@pytest.mark.parametrize(
    ("stop", "upstream_says", "counted", "end_token"),
    [
        (["."], {}, "The cat.", 0), ([" the", "."], {}, "The cat.", 0), ([" the", "."], {"stop_reason": " the"}, "The cat the", 0),
        (["."], {"stop_reason": None}, "The cat", 1), (["."], {"stop_reason": 2}, "The cat", 1),
    ],
    ids=["one-stop", "shortest-of-several", "named-by-vllm", "end-of-sequence-by-vllm", "stop-token-id-by-vllm"],
)
async def test_the_stop_sequence_that_ended_a_stream_is_billed_though_never_sent(stop: list[str], upstream_says: dict[str, Any], counted: str, end_token: int) -> None:
    """The upstream generated the stop sequence and counts it; a count of the text sent alone missed
    it. Where no stop sequence ended it, the model's end-of-sequence (or stop) token did, which
    vLLM and llama-server count too."""
    upstream = HostileUpstream()
    end = chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop", **upstream_says}])
    upstream.generation = streaming(event(chunk("The cat")), event(end), event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream({**CHAT, "stop": stop, "stream_options": {"include_usage": True}})
        rows = front.ledger.rows
    assert events[-2]["usage"]["completion_tokens"] == len(counted) + end_token
    assert billed(rows) == [(REPLAY_PROMPT_TOKENS, len(counted) + end_token, True)]


def text_chunk(text: str, index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [{"index": index, "text": text, "finish_reason": finish}], **fields}


async def metrics_tokens(front: Any) -> tuple[float, float]:
    """The prompt and completion tokens /metrics says were served."""
    async with front.buyer.get(front.url + "/metrics") as response:
        lines = (await response.text()).splitlines()
    value = {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith("vramsupply_") and " " in line}
    return value["vramsupply_prompt_tokens_total"], value["vramsupply_completion_tokens_total"]


async def test_a_cut_completions_stream_is_billed_for_its_prompts_bos_as_llama_server_counts_it() -> None:
    """llama-server's /tokenize adds BOS only when asked (``add_special``); its prompt count has it,
    so a stream counted with it was billed a prompt token short."""
    upstream = HostileUpstream()
    upstream.generation = streaming(event(text_chunk("Once")))  # cut: no usage, no [DONE]
    async with fronted(upstream) as front:
        events = await front.stream({"model": MODEL, "prompt": "Tell me a story"}, "/v1/completions")
        rows, tokens = front.ledger.rows, await metrics_tokens(front)
    assert events[0]["choices"][0]["text"] == "Once"
    assert billed(rows) == [(len("Tell me a story") + 1, len("Once"), False)], "its characters and BOS"
    assert tokens == (len("Tell me a story") + 1, len("Once"))


async def test_every_choice_a_models_end_of_sequence_ended_is_billed_for_that_token_too() -> None:
    """llama-server's stream of ``n`` 2, as it sends it: each choice's own usage, EOS included (it
    answers 1 completion token for an answer that is only its EOS). Counted from the text sent,
    each choice was billed a token short."""
    upstream = HostileUpstream()
    texts = {0: "Once upon", 1: "The end"}
    parts = [event(chunk(choices=[{"index": i, "delta": {"content": t}, "finish_reason": None}])) for i, t in texts.items()]
    for i in (1, 0):
        parts.append(event(chunk(choices=[{"index": i, "delta": {}, "finish_reason": "stop"}])))
        parts.append(event(chunk(usage={"prompt_tokens": REPLAY_PROMPT_TOKENS, "completion_tokens": len(texts[i]) + 1})))
    upstream.generation = streaming(*parts, event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream({**CHAT, "n": 2, "stream_options": {"include_usage": True}})
        rows, tokens = front.ledger.rows, await metrics_tokens(front)
    generated = len(texts[0]) + 1 + len(texts[1]) + 1
    assert events[-2]["usage"]["completion_tokens"] == generated
    assert billed(rows) == [(REPLAY_PROMPT_TOKENS, generated, True)]
    assert tokens == (REPLAY_PROMPT_TOKENS, generated)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_batch_of_prompts_through_llama_server_is_billed_for_every_prompt(stream: bool) -> None:
    """llama-server's usage of a batch counts one prompt's tokens: the first's in a whole answer,
    each its own in a stream; the provider was paid for one prompt of two."""
    upstream = HostileUpstream()
    prompts, texts = ["Tell me", "A story about the sea"], ["Once", "The sea"]
    usage = [{"prompt_tokens": len(p) + 1, "completion_tokens": len(t)} for p, t in zip(prompts, texts)]
    if stream:
        parts = [event(text_chunk(t, i)) for i, t in enumerate(texts)]
        upstream.generation = streaming(*parts, *[event(text_chunk("", i, "length", usage=usage[i])) for i in (1, 0)], event("[DONE]"))
    else:
        choices = [{"index": i, "text": t, "finish_reason": "length"} for i, t in enumerate(texts)]
        upstream.generation = answering({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": choices, "usage": usage[0]})
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 2}
    async with fronted(upstream) as front:
        if stream:
            shown = (await front.stream({**body, "stream_options": {"include_usage": True}}, "/v1/completions"))[-2]["usage"]
        else:
            shown = (await front.post(body, "/v1/completions"))[1]["usage"]
        rows, tokens = front.ledger.rows, await metrics_tokens(front)
    prompt, completion = sum(len(p) + 1 for p in prompts), sum(map(len, texts))
    assert (shown["prompt_tokens"], shown["completion_tokens"]) == (prompt, completion)
    assert billed(rows) == [(prompt, completion, True)]
    assert tokens == (prompt, completion)


@pytest.mark.parametrize("batch", [False, True], ids=["n-2", "batch-of-2"])
async def test_a_cut_vllm_stream_with_continuous_usage_is_billed_for_every_choice(batch: bool) -> None:
    """vLLM's ``continuous_usage_stats`` puts a usage in every chunk, of that chunk's choice (and its
    prompt) alone; a stream cut before its final usage was billed the last chunk's: one choice of two."""
    upstream = VllmUpstream()
    prompts, texts = ["Tell me", "A story about the sea"], ["Once upon", "The end"]
    said = [{"prompt_tokens": len(prompts[i]) + 1 if batch else 5, "completion_tokens": len(texts[i])} for i in (0, 1)]
    chunks = [text_chunk(texts[i], i, usage=said[i]) if batch else chunk(choices=[{"index": i, "delta": {"content": texts[i]}}], usage=said[i]) for i in (0, 1)]
    upstream.generation = streaming(*map(event, chunks))  # cut: no final usage, no [DONE]
    body, path = ({"model": MODEL, "prompt": prompts}, "/v1/completions") if batch else ({**CHAT, "n": 2}, "/v1/chat/completions")
    options = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    prompt = sum(len(p) + 1 for p in prompts) if batch else 5  # a batch's prompts counted with BOS, else as vLLM said
    completion = sum(map(len, texts))
    async with fronted(upstream) as front:
        events = await front.stream({**body, **options}, path)
        rows, tokens = list(front.ledger.rows), await metrics_tokens(front)
        final = {**chunks[0], "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion + 2}}
        upstream.generation = streaming(*map(event, chunks), event(final), event("[DONE]"))
        whole_stream = await front.stream({**body, **options}, path)
        after = front.ledger.rows[1:]
    assert billed(rows) == [(prompt, completion, False)], "every choice sent, not the last chunk's one"
    assert tokens == (prompt, completion)
    assert (events[-2]["usage"]["completion_tokens"], events[-2]["choices"]) == (completion, []), "the usage billed, at the end"
    assert [e["usage"] for e in events[:2]] == [None, None], "one choice's count: not what is billed"
    assert whole_stream[-2]["usage"]["completion_tokens"] == completion + 2 and billed(after) == [(prompt, completion + 2, True)], "its final usage, of all"


class DownForAWhile(HostileUpstream):
    """Its tokenizer and prompt-counting replay answer 503 while ``down``: a server restarting."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def tokenize(self, request: web.Request) -> web.Response:
        return web.Response(status=503) if self.down else await super().tokenize(request)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.down and body.get("max_tokens") == 1 and not body.get("stream"):
            return web.Response(status=503)
        return await super().generate(request)


async def test_a_stream_cut_as_the_upstream_dies_is_billed_once_it_answers_again(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(exchange, "RECOUNT_FIRST_DELAY", 0.01)
    caplog.set_level(logging.INFO, logger="vramsupply.upstream")
    upstream = DownForAWhile()
    upstream.generation = streaming(event(chunk("Once")))  # cut: no [DONE]
    async with fronted(upstream) as front:
        events = await front.stream(CHAT)
        assert events[0]["choices"][0]["delta"]["content"] == "Once"
        assert front.ledger.rows == [], "its tokenizer is down: not counted yet"
        assert "counting it again once the upstream answers" in caplog.text
        upstream.down = False
        state = front.backend.state
        assert state is not None
        await state.accounts.flush()
        stats = front.backend.stats()
        rows = front.ledger.rows
    assert billed(rows) == [(REPLAY_PROMPT_TOKENS, len("Once"), False)], "counted by the upstream's tokenizer once back, as incomplete"
    assert (stats.requests_total, stats.completion_tokens_total) == (1, len("Once")), "heartbeats report it too"
    assert "now that the upstream answers again" in caplog.text


async def test_a_stream_the_upstream_never_comes_back_to_count_is_billed_with_an_estimate(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(exchange, "RECOUNT_FIRST_DELAY", 0.01)
    monkeypatch.setattr(exchange, "RECOUNT_FOR_SECONDS", 0.2)
    upstream = DownForAWhile()
    upstream.generation = streaming(event(chunk("Once upon a time")))
    async with fronted(upstream) as front:
        await front.stream(CHAT)
        state = front.backend.state
        assert state is not None
        await state.accounts.flush()
        rows = front.ledger.rows
    assert billed(rows) == [(4, 4, False)], "bytes / 4 of its prompt (15) and of what was sent (16), rather than nothing"
    assert "recorded with an estimate of 4 prompt and 4 completion tokens" in caplog.text


async def test_a_stream_still_uncounted_when_the_agent_stops_is_billed_with_an_estimate_within_the_flush(caplog: pytest.LogCaptureFixture) -> None:
    """The agent's shutdown: the drain, the upstream client closed, then the ledger's flush."""
    upstream = DownForAWhile()
    upstream.generation = streaming(event(chunk("Once upon a time")))
    async with fronted(upstream) as front:
        await front.stream(CHAT)
        state, ledger = front.backend.state, front.ledger
        assert state is not None and ledger.rows == []
    await asyncio.wait_for(state.accounts.flush(), 30)
    assert billed(ledger.rows) == [(4, 4, False)]
    assert "(the agent is stopping)" in caplog.text


async def test_an_upstream_that_cannot_count_at_all_has_its_answers_billed_with_an_estimate_at_once(caplog: pytest.LogCaptureFixture) -> None:
    upstream = HostileUpstream()
    upstream.tokenizes = False  # no tokenize endpoint: asking again will not help
    upstream.generation = streaming(event(chunk("Once upon a time")), event("[DONE]"))
    async with fronted(upstream) as front:
        events = await front.stream(CHAT)
        rows = front.ledger.rows
    assert events[-1] == "[DONE]"
    assert billed(rows) == [(4, 4, True)]
    assert "recorded with an estimate" in caplog.text


@contextlib.asynccontextmanager
async def front_of(upstream: LlamaCppServer) -> AsyncIterator[tuple[str, UpstreamBackend, Ledger]]:
    """Our front before a real llama_cpp.server; ready when entered."""
    backend = UpstreamBackend(UpstreamOptions("upstream", model="stories260k", upstream_model=None, url=upstream.base_url, context_length=2048, check_interval=0.1))
    await backend.prepare()
    try:
        app = backend.create_app(None, 1 << 16)
        assert backend.state is not None
        ledger = Ledger()
        backend.state.accounts.recorder = ledger
        async with TestServer(app, host="127.0.0.1") as front:
            assert await backend.start(asyncio.Event())
            yield str(front.make_url("")).rstrip("/"), backend, ledger
    finally:
        await backend.close()


async def stream_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any], on_event: Any = None) -> list[Any]:
    events: list[Any] = []
    async with session.post(url, json={**body, "stream": True}) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                data = line[len(b"data: "):].strip().decode()
                events.append(data if data == "[DONE]" else json.loads(data))
                if on_event is not None:
                    on_event(len(events))
    return events


async def post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, json=body) as response:
        assert response.status == 200
        return await response.json()


async def tokens(session: aiohttp.ClientSession, upstream: LlamaCppServer, text: str) -> int:
    """Tokens in ``text`` as llama_cpp.server tokenizes a prompt (BOS included)."""
    async with session.post(upstream.base_url.removesuffix("/v1") + "/extras/tokenize", json={"input": text}) as reply:
        return len((await reply.json())["tokens"])


@pytest.mark.slow
async def test_through_llama_cpp_server_tool_calls_and_stop_sequences_are_billed_as_it_counts_them() -> None:
    tool = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    chat = {"model": "stories260k", "messages": [{"role": "user", "content": "weather in Paris?"}], "max_tokens": 30, "temperature": 0, **tool}
    stop = {"model": "stories260k", "prompt": "The cat", "max_tokens": 100, "stop": ["."], "temperature": 0}
    with LlamaCppServer() as upstream:
        async with front_of(upstream) as (url, _, ledger), aiohttp.ClientSession() as buyer:
            whole_call = await post_json(buyer, url + "/v1/chat/completions", chat)
            streamed_call = await stream_events(buyer, url + "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
            whole_stop = await post_json(buyer, url + "/v1/completions", stop)
            streamed_stop = await stream_events(buyer, url + "/v1/completions", {**stop, "stream_options": {"include_usage": True}})
            name = await tokens(buyer, upstream, "\nget_weather") - await tokens(buyer, upstream, "\n")
    generated, streamed = whole_call["usage"]["completion_tokens"], streamed_call[-2]["usage"]["completion_tokens"]
    assert generated <= streamed <= generated + name, "what it generated, and the call's name once (llama_cpp.server sends it in each of 30 chunks)"
    assert streamed_stop[-2]["usage"] == whole_stop["usage"], "the stop sequence it generated is counted, as the server counts it"
    assert [r.completion_tokens for r in ledger.rows] == [generated, streamed, whole_stop["usage"]["completion_tokens"], streamed_stop[-2]["usage"]["completion_tokens"]]


@pytest.mark.slow
async def test_a_stream_cut_by_llama_cpp_server_dying_is_billed_once_it_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange, "RECOUNT_FIRST_DELAY", 0.2)
    monkeypatch.setattr(exchange, "RECOUNT_MAX_DELAY", 0.5)
    body = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0}
    upstream = LlamaCppServer(n_ctx=2048)  # seconds of tokens to come: it is killed long before their end
    with upstream:
        async with front_of(upstream) as (url, backend, ledger), aiohttp.ClientSession() as buyer:
            events = await stream_events(buyer, url + "/v1/completions", body, on_event=lambda n: n == 30 and upstream.kill())
            assert "error" in events[-1] and ledger.rows == [], "the buyer is told; its tokenizer died with the server"
            with LlamaCppServer(n_ctx=2048, port=upstream.port) as again:
                assert backend.state is not None
                await backend.state.accounts.flush()
                sent = "".join(e["choices"][0]["text"] for e in events if "choices" in e)
                prompt = await tokens(buyer, again, body["prompt"])
                completion = await tokens(buyer, again, "\n" + sent) - await tokens(buyer, again, "\n")
    assert billed(ledger.rows) == [(prompt, completion, False)], "billed for what was sent, counted by its tokenizer once back, as incomplete"
