"""The ledger behind a real server: what buyers received is what the ledger holds, also after a SIGKILL."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import llama_cpp
import openai
import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from live_server import LiveServer
from test_ledger import HeldWriteLock, WriterBug

from vramsupply.ledger import LedgerStore, LedgerWriter, default_ledger_path, gross_nanocents
from vramsupply.ledger.recorder import LedgerRecorder

TOKEN = "endpoint-token-for-ledger-tests"
PRICES = (120, 250)
CUT_MAX_TOKENS = 1800  # long enough that a buyer who hangs up after two chunks really cuts it short


class Buyer:
    """One kind of request per call; remembers what it received: (id, usage or None when it hung up, chunks).

    Buyers who hang up do it over plain aiohttp, reading a chunk or two and closing the connection.
    Breaking out of the openai SDK's stream instead leaves the SDK's inner httpx stream generators
    suspended, for the garbage collector to finalize whenever it runs, in whichever thread; now and
    then that warned "async generator already executing" in a full run (3 times in one CI run).
    """

    def __init__(self, client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
        self.client = client
        self.http = http
        self.received: list[tuple[str, Any, int]] = []

    async def buy(self, i: int) -> None:
        kind = i % 8
        messages = [{"role": "user", "content": f"Tell story number {i % 13}."}]
        chat, text = self.client.chat.completions, self.client.completions
        if kind == 0:
            r = await chat.create(model="stories260k", messages=messages, max_tokens=8 + i % 5)
            self.received.append((r.id, r.usage, 1))
        elif kind == 1:
            await self._stream(await chat.create(model="stories260k", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
        elif kind == 2:
            r = await text.create(model="stories260k", prompt=f"Once upon a time {i}", max_tokens=6, n=2)
            self.received.append((r.id, r.usage, 2))
        elif kind == 3:
            await self._stream(await chat.create(model="stories260k", messages=messages, max_tokens=10, n=3, stream=True, stream_options={"include_usage": True}))
        elif kind == 5:
            await self._stream(await text.create(model="stories260k", prompt="The cat", max_tokens=9, stream=True, stream_options={"include_usage": True}))
        elif kind == 6:
            r = await chat.create(model="stories260k", messages=messages, max_tokens=7, n=2, seed=i)
            self.received.append((r.id, r.usage, 2))
        else:  # 4 and 7: streams the buyer abandons after a chunk or two (n=2 for one of them)
            body = {"model": "stories260k", "messages": messages, "max_tokens": CUT_MAX_TOKENS, "n": 1 + kind % 2,
                    "stream": True, "ignore_eos": True}
            await self._hang_up(body, cut_after=1 + kind % 2)

    async def _stream(self, stream: Any) -> None:
        request_id, usage, chunks = "", None, 0
        async for chunk in stream:
            request_id = chunk.id
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and _text(chunk.choices[0]):
                chunks += 1
        self.received.append((request_id, usage, chunks))

    async def _hang_up(self, body: dict[str, Any], cut_after: int) -> None:
        """Stream ``body``, and close the connection once more than ``cut_after`` chunks carried text."""
        request_id, chunks = "", 0
        url = f"{self.client.base_url}chat/completions"
        async with self.http.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[len(b"data: "):])
                request_id = chunk["id"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    chunks += 1
                if chunks > cut_after:
                    break
            response.close()  # the buyer hangs up mid-answer
        self.received.append((request_id, None, chunks))


def _text(choice: Any) -> str:
    return (choice.delta.content if hasattr(choice, "delta") else choice.text) or ""


@pytest.mark.slow
async def test_over_200_mixed_requests_the_ledger_holds_exactly_the_usage_buyers_received(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with (
        LiveServer(endpoint_token=TOKEN, parallel=4) as live,
        openai.AsyncOpenAI(base_url=live.base_url, api_key=TOKEN, max_retries=0) as client,
        aiohttp.ClientSession() as http,
    ):
        writer = LedgerWriter.open(path)
        live.state.accounts.recorder = LedgerRecorder(writer, input_price=PRICES[0], output_price=PRICES[1], selling=True)
        buyer = Buyer(client, http)
        gate = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with gate:
                await buyer.buy(i)

        await asyncio.gather(*(one(i) for i in range(208)))
        assert live.engine is not None
        while live.engine.stats().slots_busy or live.engine.stats().queue_depth:  # the server notices the last hang-ups
            await asyncio.sleep(0.05)
        await live.acall(lambda: live.state.accounts.flush(30))
        engine_completion_tokens = live.engine.stats().completion_tokens_total
        writer.close()

    rows = {e.request_id: e for e in LedgerStore(path).entries()}
    assert len(rows) == len(buyer.received) == 208
    complete = [(rid, usage) for rid, usage, _ in buyer.received if usage is not None]
    cut = [(rid, chunks) for rid, usage, chunks in buyer.received if usage is None]
    assert len(complete) == 156 and len(cut) == 52
    for rid, usage in complete:  # every finished request: to the token what its buyer was told
        row = rows[rid]
        assert row.complete and row.source == "platform"
        assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
        assert row.cached_tokens == usage.prompt_tokens_details.cached_tokens
    for rid, chunks in cut:  # every abandoned stream: recorded as such, with the tokens it did generate
        row = rows[rid]
        assert not row.complete and chunks <= row.completion_tokens < CUT_MAX_TOKENS * row.choices
    assert sum(r.choices > 1 for r in rows.values()) == 26 * 3 + 26
    # nothing served is missing: the ledger's completion tokens are every token the engine generated
    assert sum(r.completion_tokens for r in rows.values()) == engine_completion_tokens
    for row in rows.values():  # a complete request is paid for; one that ended early is not (its buyer never got the usage)
        assert row.gross_nanocents == (gross_nanocents(row.prompt_tokens, row.completion_tokens, *PRICES) if row.complete else 0)
        assert row.earned_nanocents * 100 == row.gross_nanocents * 95


def test_served_requests_survive_a_sigkill_and_the_ledger_grows_across_restarts(isolated_env: Path) -> None:
    ids = []
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", "--parallel", "2") as agent:
        agent.wait_ready()
        client = openai.OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0)
        for i in range(6):
            if i % 2:
                stream = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True)
                ids.append(next(iter(stream)).id)
                for _ in stream:
                    pass
            else:
                ids.append(client.completions.create(model="stories260k", prompt="Once", max_tokens=5).id)
        agent.process.send_signal(signal.SIGKILL)  # at once: the last answer has only just arrived
        assert agent.wait() == -signal.SIGKILL

    assert [e.request_id for e in LedgerStore(default_ledger_path()).entries()] == ids

    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0") as agent:
        agent.wait_ready()
        client = openai.OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0)
        ids.append(client.completions.create(model="stories260k", prompt="Once", max_tokens=5).id)
        assert agent.stop() == 0

    rows = LedgerStore(default_ledger_path()).entries()
    assert [e.request_id for e in rows] == ids
    assert all(e.source == "local" and e.gross_nanocents == 0 for e in rows)  # --no-register: nothing sold
    report = json.loads(run_cli("earnings", "--since", "24h", "--json").stdout)
    assert (report["requests"], report["local_requests"], report["earned_nanocents"]) == (7, 7, 0)
    assert report["completion_tokens"] == sum(e.completion_tokens for e in rows)


async def ask(live: LiveServer, timeout: float) -> str:
    """One small chat request, as a buyer with a client timeout sends it: the status, or how it ended."""
    body = {"model": "stories260k", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.post(f"{live.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                await response.read()
                return f"HTTP {response.status}"
    except asyncio.TimeoutError:
        return "timed out"


async def health_of(live: LiveServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{live.url}/health") as response:
        assert response.status == 200
        return await response.json()


async def ledger_gauge(live: LiveServer) -> str:
    """The ``vramsupply_ledger_healthy`` line a Prometheus scrape reads."""
    async with aiohttp.ClientSession() as http, http.get(f"{live.url}/metrics") as response:
        text = await response.text()
    return next(line for line in text.splitlines() if line.startswith("vramsupply_ledger_healthy "))


async def test_a_buyer_hanging_up_during_the_commit_costs_later_buyers_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with LiveServer(endpoint_token=TOKEN) as live:
        writer = LedgerWriter.open(path)
        live.state.accounts.recorder = LedgerRecorder(writer, input_price=PRICES[0], output_price=PRICES[1], selling=True)
        assert await ask(live, 10) == "HTTP 200"
        with HeldWriteLock(path):  # a backup tool holds the ledger: the next commit waits (1 s at most)
            assert await ask(live, 0.3) == "timed out"  # the buyer gives up while its row waits
            await asyncio.sleep(1.2)  # past that wait: the row is held in memory meanwhile
        answers = [await ask(live, 10) for _ in range(2)]
        for _ in range(100):  # the held rows are written at the writer's next try
            if (health := await health_of(live))["status"] == "ok":
                break
            await asyncio.sleep(0.05)
        writer.close()

    assert answers == ["HTTP 200", "HTTP 200"]
    assert health["status"] == "ok"
    assert len(LedgerStore(path).entries()) == 4, "the row of the buyer who hung up is written too"


async def test_a_dead_ledger_writer_leaves_buyers_served_and_health_degraded(tmp_path: Path) -> None:
    async with LiveServer(endpoint_token=TOKEN) as live:
        writer = LedgerWriter.open(tmp_path / "ledger.sqlite3")
        live.state.accounts.recorder = LedgerRecorder(writer, input_price=PRICES[0], output_price=PRICES[1], selling=True)

        def broken(entries: object) -> None:
            raise WriterBug("simulated")

        recording = await ledger_gauge(live)
        writer.store.add = broken  # type: ignore[method-assign]
        answers = [await ask(live, 10) for _ in range(2)]
        health = await health_of(live)
        alert = await ledger_gauge(live)
        writer.close()

    assert answers == ["HTTP 200", "HTTP 200"], "served at once: nobody waits on a writer that is gone"
    assert health["status"] == "degraded"
    assert (recording, alert) == ("vramsupply_ledger_healthy 1.0", "vramsupply_ledger_healthy 0.0"), "a scrape alerts on it too"
    assert any("earnings ledger writer stopped" in warning for warning in health["warnings"])


class FailingDecode:
    """llama.cpp's decode reporting a compute failure (status -3, as a GPU fault makes it) once the
    calls ``allow`` lets through are used up; ``allow(None)``: decoding works again. Only
    ``llama_cpp.llama_decode`` is replaced: the scheduler, server and ledger are the real ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._real = llama_cpp.llama_decode
        self._left: int | None = None
        monkeypatch.setattr(llama_cpp, "llama_decode", self)

    def allow(self, calls: int | None) -> None:
        self._left = calls

    def __call__(self, ctx: object, batch: object) -> int:
        if self._left is not None:
            if self._left <= 0:
                return -3
            self._left -= 1
        return self._real(ctx, batch)


async def buy_once(live: LiveServer, *, stream: bool, max_tokens: int = 5) -> dict[str, Any]:
    """One chat request as a buyer sends it: what came back (status, id, text chunks, error, usage)."""
    body = {"model": "stories260k", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    got: dict[str, Any] = {"id": None, "chunks": 0, "error": None, "usage": None}
    async with aiohttp.ClientSession() as http, http.post(f"{live.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        got["status"] = response.status
        events = [json.loads(line[len(b"data: "):]) async for line in response.content if line.startswith(b"data: {")] if stream else [await response.json()]
    for event in events:
        got["error"] = got["error"] or event.get("error")
        got["id"] = got["id"] or event.get("id")
        got["usage"] = event.get("usage") or got["usage"]
        got["chunks"] += sum(bool(c.get("delta", {}).get("content")) for c in event.get("choices", []))
    return got


async def test_a_request_that_failed_before_its_first_token_is_not_revenue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a request whose prompt llama.cpp failed to decode was a ledger row with its whole
    prompt billed, although its buyer got a 500 (or a stream holding nothing but the error)."""
    path = tmp_path / "ledger.sqlite3"
    decode = FailingDecode(monkeypatch)
    async with LiveServer(endpoint_token=TOKEN, parallel=1) as live:
        writer = LedgerWriter.open(path)
        live.state.accounts.recorder = LedgerRecorder(writer, input_price=PRICES[0], output_price=PRICES[1], selling=True)
        decode.allow(0)  # the prompt is never decoded
        refused = await buy_once(live, stream=False)
        failed_stream = await buy_once(live, stream=True)
        decode.allow(4)  # the prompt and three tokens, then the decode fails: a stream cut short
        cut = await buy_once(live, stream=True, max_tokens=40)
        decode.allow(4)  # the same, asked for as one answer: the buyer gets a 500 and no usage
        cut_whole = await buy_once(live, stream=False, max_tokens=40)
        decode.allow(None)
        served = await buy_once(live, stream=False)
        await live.acall(lambda: live.state.accounts.flush(30))
        writer.close()

    assert refused["status"] >= 500 and refused["error"] and refused["id"] is None
    assert failed_stream["status"] == 200 and failed_stream["error"] and failed_stream["chunks"] == 0 and failed_stream["usage"] is None
    assert cut["error"] and cut["chunks"] > 0 and cut["usage"] is None
    assert cut_whole["status"] >= 500 and cut_whole["error"] and cut_whole["usage"] is None
    assert served["status"] == 200 and served["usage"]["completion_tokens"] == 5
    rows = {e.request_id: e for e in LedgerStore(path).entries()}
    assert set(rows) == {cut["id"], served["id"]}, "the requests whose buyers got only an error are not in the ledger"
    assert len(rows) == 2, "nor is the whole answer failed part way, which its buyer never received"
    assert not rows[cut["id"]].complete and cut["chunks"] <= rows[cut["id"]].completion_tokens < 40, "recorded with what was sent, marked incomplete"
    assert (rows[cut["id"]].gross_nanocents, rows[cut["id"]].earned_nanocents) == (0, 0), "unpaid: its buyer never got the usage the platform bills by"
    assert rows[served["id"]].complete and rows[served["id"]].completion_tokens == 5
