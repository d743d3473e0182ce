"""A request relayed to an upstream engine is in the earnings ledger while in flight, as our own
engine's are: an agent killed outright in the middle of its stream leaves a row of it, which
`vramsupply earnings` reads as interrupted (before, it was lost: its row was written only when it ended).

The upstream is ``tests/doubles/hostile_upstream.py``'s, whose tokenizer counts a token per
character. Mid-stream the front knows what the upstream tells it: the row holds the upstream's own
usage where its chunks carry one (vLLM's ``continuous_usage_stats``), else a token for each piece of
text relayed and the prompt estimated from its text, bytes / 4 (``upstream.exchange``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from agent_process import AgentProcess
from aiohttp import web
from doubles.hostile_upstream import CHAT, Front, HostileUpstream, VllmUpstream, chunk, event, fronted, hang, streaming
from openai import OpenAI
from conftest import REPO
from test_ledger_interrupted import earnings
from test_upstream_drain import PIECE, EndlessUpstream, ThreadedUpstream

from vramsupply.ledger import LedgerStore, LedgerWriter, default_ledger_path
from vramsupply.ledger.recorder import LedgerRecorder

SENT = 5
"""Pieces of text the stalled upstream sends, a token each, before it sends nothing more."""
ESTIMATED_PROMPT = -(-len(CHAT["messages"][0]["content"].encode()) // 4)  # type: ignore[index]
"""The prompt's tokens in flight where the upstream reports none mid-stream: its text's bytes / 4, rounded up."""


def in_flight(ledger: Path) -> list[tuple[str, int, int]]:
    """("ours", prompt, completion tokens) of each row in flight, read as another program would: a
    relayed request is kept in flight under an id of ours (``req-…``), not the upstream's."""
    db = sqlite3.connect(f"{ledger.as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT request_id, prompt_tokens, completion_tokens FROM in_flight").fetchall()
        return [("ours" if request_id.startswith("req-") else request_id, prompt, completion) for request_id, prompt, completion in rows]
    except sqlite3.OperationalError:  # no ledger yet, or one without rows in flight
        return []
    finally:
        db.close()


def buy_a_stream(base_url: str, model: str, received: list[str]) -> None:
    """A buyer reading a chat stream through the official SDK, keeping each piece of text it gets."""
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    try:
        for part in client.chat.completions.create(model=model, messages=CHAT["messages"], stream=True):  # type: ignore[arg-type]
            if part.choices and part.choices[0].delta.content:
                received.append(part.choices[0].delta.content)
    except Exception:  # the agent is killed under it
        pass


def test_a_relayed_stream_in_flight_when_the_agent_is_killed_is_in_earnings_as_interrupted() -> None:
    ledger, received = default_ledger_path(), []
    double = HostileUpstream()
    double.generation = streaming(*(event(chunk(PIECE)) for _ in range(SENT)), then=hang)  # then silence, its stream open
    with ThreadedUpstream(double) as upstream:
        with AgentProcess("--engine", "upstream", "--upstream-url", upstream.url, "--port", "0", "--no-register") as agent:
            agent.wait_ready()
            threading.Thread(target=buy_a_stream, args=(agent.base_url, agent.model_id, received), daemon=True).start()
            agent.wait_for(lambda: len(received) == SENT, "the buyer receiving every piece sent")
            agent.wait_for(lambda: in_flight(ledger) == [("ours", ESTIMATED_PROMPT, SENT)], "the stream in flight, every piece relayed", timeout=30)
            agent.send_signal(signal.SIGKILL)
            assert agent.wait() == -signal.SIGKILL

    report = earnings()

    interrupted = {
        "requests": 1, "cut_requests": 1, "interrupted_requests": 1, "in_flight_requests": 0, "gross_nanocents": 0,
        "interrupted_prompt_tokens": ESTIMATED_PROMPT, "interrupted_completion_tokens": SENT,
    }
    assert {k: report[k] for k in interrupted} == interrupted, report


def test_a_relayed_sale_the_agent_is_killed_right_after_recording_is_not_counted_again_as_interrupted() -> None:
    """Its row in flight is under an id of ours, its finished row under the upstream's: they were two
    commits, and an agent killed between them left both, so `earnings` and the next start counted
    the one sale twice, the second time as an interrupted request. Now one commit writes the one
    and deletes the other, as for our own engine's requests."""
    ledger, received, usage = default_ledger_path(), [], {"prompt_tokens": 9, "completion_tokens": SENT, "total_tokens": 9 + SENT}
    double = HostileUpstream()
    double.generation = streaming(*(event(chunk(PIECE)) for _ in range(SENT)), event(chunk(usage=usage)), event("[DONE]"))
    serve = ("--engine", "upstream", "--port", "0", "--no-register")
    with ThreadedUpstream(double) as upstream:
        killed = [sys.executable, str(REPO / "tests" / "killed_after_sale_agent.py")]
        with AgentProcess(*serve, "--upstream-url", upstream.url, program=killed) as agent:
            agent.wait_ready()
            buy_a_stream(agent.base_url, agent.model_id, received)
            assert agent.wait() == -signal.SIGKILL and "FAULT: killed after the sale's commit" in agent.log, agent.log
        after_kill = earnings()
        with AgentProcess(*serve, "--upstream-url", upstream.url) as restarted:
            restarted.wait_ready()
            assert restarted.stop() == 0, restarted.log

    sold = {"requests": 1, "cut_requests": 0, "interrupted_requests": 0, "in_flight_requests": 0, "prompt_tokens": 9, "completion_tokens": SENT}
    assert received == [PIECE] * SENT
    assert {k: after_kill[k] for k in sold} == sold, after_kill
    assert not any("recorded as interrupted" in line for line in restarted.stderr), restarted.log
    assert [(e.request_id, e.complete, e.interrupted) for e in LedgerStore(ledger).entries()] == [("chatcmpl-1", True, False)]
    assert in_flight(ledger) == []


@contextlib.asynccontextmanager
async def ledgered(upstream: HostileUpstream, ledger: Path) -> AsyncIterator[Front]:
    """Our front before ``upstream``, recording in a real earnings ledger at ``ledger``."""
    async with fronted(upstream) as front:
        assert front.backend.state is not None
        accounts = front.backend.state.accounts
        writer = LedgerWriter.open(ledger)
        accounts.recorder = LedgerRecorder(writer, input_price=100, output_price=200, selling=False)
        try:
            yield front
        finally:
            await accounts.flush(10)
            writer.close()


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"{what}: never happened"
        await asyncio.sleep(0.05)


async def test_a_relayed_stream_is_in_flight_with_the_upstreams_own_counts_and_finished_leaves_only_its_row(tmp_path: Path) -> None:
    ledger, released = tmp_path / "ledger.sqlite3", asyncio.Event()

    async def vllm_stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """Two tokens a chunk, each chunk with the usage so far (continuous_usage_stats), then the final usage once released."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for tokens in (2, 4, 6):
            await response.write(event(chunk("ab", usage={"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens})))
        await released.wait()
        await response.write(event(chunk(usage={"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15})) + event("[DONE]"))
        return response

    upstream = VllmUpstream()
    upstream.generation = vllm_stream
    async with ledgered(upstream, ledger) as front:
        options = {"include_usage": True, "continuous_usage_stats": True}
        buying = asyncio.create_task(front.stream({**CHAT, "stream_options": options}))
        await until(lambda: in_flight(ledger) == [("ours", 9, 6)], "the stream in flight, with the upstream's count so far")
        released.set()
        events = await buying

    assert events[-2]["usage"]["completion_tokens"] == 6 and events[-1] == "[DONE]"
    assert in_flight(ledger) == [], "its finished row replaced its row in flight"
    assert [(e.request_id, e.prompt_tokens, e.completion_tokens, e.complete) for e in LedgerStore(ledger).entries()] == [("chatcmpl-1", 9, 6, True)]


async def test_a_relayed_stream_its_buyer_hangs_up_on_leaves_no_row_in_flight(tmp_path: Path) -> None:
    """A stream abandoned by its buyer is not recorded (``upstream.proxy``): its row in flight goes too."""
    ledger = tmp_path / "ledger.sqlite3"
    async with ledgered(EndlessUpstream(), ledger) as front:
        async with front.buyer.post(front.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            assert response.status == 200
            await until(lambda: len(in_flight(ledger)) == 1, "the stream in flight")
            response.close()  # the buyer hangs up mid-answer
        await until(lambda: in_flight(ledger) == [], "its row in flight gone")

    assert LedgerStore(ledger).entries() == [], "nothing recorded, as before"


async def test_two_relayed_streams_under_one_upstream_id_each_keep_their_own_row_in_flight(tmp_path: Path) -> None:
    """An upstream's ids need not be unique (Ollama's are one of 999 numbers; this double gives every
    request ``chatcmpl-1``): kept under that id, two streams shared one row, and the first to end
    took it from the other, which a kill then lost."""
    ledger = tmp_path / "ledger.sqlite3"
    async with ledgered(EndlessUpstream(), ledger) as front:
        url = front.url + "/v1/chat/completions"
        async with front.buyer.post(url, json={**CHAT, "stream": True}) as first, front.buyer.post(url, json={**CHAT, "stream": True}) as second:
            assert first.status == second.status == 200
            await until(lambda: len(in_flight(ledger)) == 2, "both streams in flight, a row each")
            first.close()  # one buyer hangs up
            await until(lambda: len(in_flight(ledger)) == 1, "the abandoned stream's row gone, the other's kept")
            second.close()
        await until(lambda: in_flight(ledger) == [], "both rows gone")
