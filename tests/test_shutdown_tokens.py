"""Every token served reaches the platform exactly once, across a shutdown.

Heartbeats carry the tokens served since the last heartbeat the platform took (docs/platform-api.md).
At SIGTERM the draining notice carries what was served until then; the requests that finish during
the drain are reported by one last heartbeat before the DELETE, and a heartbeat still waiting for
its answer at SIGTERM is let end instead of being sent again inside the notice. What the platform
took is read from its own books: the reference platform's ``Provider`` record (kept by the test,
as it is dropped from the listing at the DELETE), or a double that adds up the heartbeats it takes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agent_process import AgentProcess
from aiohttp import web
from conftest import TINY_MODEL
from live_platform import LivePlatform, free_port
from test_platform_hostile import HostilePlatform, as_documented, lifecycle_with
from test_platform_lifecycle import EngineCounters, eventually, make_lifecycle
from test_platform_serve import marketplace_env

from vramsupply.ledger import LedgerStore, default_ledger_path
from vramsupply.platform.lifecycle import ProviderLifecycle

STREAM_TOKENS = 900


def stream(url: str, token: str, prompt: str, usage: list[dict[str, int]], started: threading.Event) -> None:
    """One buyer's stream to its end; records the usage it was billed."""
    body = {"prompt": prompt, "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: {"):
                started.set()
                usage.extend([event["usage"]] if (event := json.loads(line[6:])).get("usage") else [])


def test_streams_that_finish_during_the_drain_are_reported_to_the_platform_before_it_deregisters() -> None:
    """The audit's run: 6 streams of 900 tokens on 4 slots, SIGTERM while 4 run and 2 wait. The
    buyers got every token and the ledger held them all, but the platform had heard only what was
    served before the signal."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = ("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, "--parallel", "4", "--context-length", "1024", "--drain-timeout", "120")
    with LivePlatform() as platform:
        with AgentProcess(*args, env=marketplace_env(platform.url)) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            [provider] = platform.providers  # the platform's books for this instance, read after the DELETE too
            usage: list[dict[str, int]] = []
            started = [threading.Event() for _ in range(6)]
            buyers = [
                threading.Thread(target=stream, args=(endpoint, provider.offer.endpoint_token, f"Once upon a time {i}", usage, event))
                for i, event in enumerate(started)
            ]  # fmt: skip
            for buyer in buyers:
                buyer.start()
            agent.wait_for(lambda: sum(event.is_set() for event in started) >= 4 and provider.queue_depth == 2, "4 streams running, 2 waiting")
            code = agent.stop(signal.SIGTERM, timeout=150)
            for buyer in buyers:
                buyer.join(30)
        assert platform.providers == [], "deregistered"
    assert code == 0, agent.output
    assert [u["completion_tokens"] for u in usage] == [STREAM_TOKENS] * 6, "every stream, the waiting ones too, finished during the drain"
    rows = LedgerStore(default_ledger_path()).entries()
    in_ledger = (sum(row.prompt_tokens for row in rows), sum(row.completion_tokens for row in rows))
    assert in_ledger == (sum(u["prompt_tokens"] for u in usage), STREAM_TOKENS * 6)
    assert (provider.reported_prompt_tokens, provider.reported_completion_tokens) == in_ledger
    assert "could not report" not in agent.log and "Traceback" not in agent.log


async def test_tokens_served_during_the_drain_go_in_one_last_heartbeat_before_the_delete() -> None:
    counters = EngineCounters(prompt_tokens_total=10, completion_tokens_total=20)
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, counters)
        lifecycle.start()
        await eventually(lambda: len(platform.providers) == 1)
        [provider] = platform.providers
        counters.prompt_tokens_total, counters.completion_tokens_total = 50, 120
        await lifecycle.drain(timeout=3)
        assert (provider.status, provider.reported_prompt_tokens, provider.reported_completion_tokens) == ("draining", 40, 100)
        counters.prompt_tokens_total, counters.completion_tokens_total = 57, 420  # the requests in flight finish
        assert await lifecycle.stop(timeout=5) is True
        assert platform.providers == []
    assert (provider.reported_prompt_tokens, provider.reported_completion_tokens) == (47, 400), "counted once, none left out"


class Books:
    """A platform double's books: the tokens of every heartbeat it took (answered 2xx).
    ``hold()``: the next heartbeat carrying tokens is taken, and answered only at ``release()``;
    ``refuse_held``: that answer is then a 500 (taken back: it never counted)."""

    def __init__(self, *, refuse_held: bool = False) -> None:
        self.taken: list[dict[str, Any]] = []
        self.holding = threading.Event()
        self._armed = False
        self._refuse_held = refuse_held

    def hold(self) -> None:
        self._armed = True

    @property
    def tokens(self) -> tuple[int, int]:
        return sum(beat["prompt_tokens"] for beat in self.taken), sum(beat["completion_tokens"] for beat in self.taken)

    async def heartbeat(self, platform: HostilePlatform, request: web.Request, body: Any) -> web.StreamResponse:
        held = self._armed and bool(body["prompt_tokens"] or body["completion_tokens"])
        answer = await as_documented(platform, request, body)
        if answer.status == 200:
            self.taken.append(body)
        if held:
            self._armed = False
            self.holding.set()
            await platform.held()
        if held and self._refuse_held:
            self.taken.remove(body)
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        return answer


@contextlib.asynccontextmanager
async def drained_while_a_heartbeat_waits(books: Books) -> AsyncIterator[tuple[HostilePlatform, ProviderLifecycle, EngineCounters]]:
    """A lifecycle whose heartbeat carrying 12 + 42 tokens the platform holds unanswered, drained then."""
    counters = EngineCounters()
    with HostilePlatform() as platform:
        platform.script("heartbeat", books.heartbeat)
        lifecycle = lifecycle_with(platform, counters)
        lifecycle.start()
        await eventually(lambda: len(books.taken) >= 2)
        books.hold()
        counters.prompt_tokens_total, counters.completion_tokens_total = 12, 42
        await eventually(books.holding.is_set)
        await lifecycle.drain(timeout=3)
        yield platform, lifecycle, counters


async def test_a_heartbeat_waiting_for_its_answer_at_shutdown_is_counted_once() -> None:
    """The audit's race: the heartbeat carrying 42 tokens reached the platform, the drain cancelled
    it before its answer came, and the draining notice carried the 42 tokens again."""
    books = Books()
    async with drained_while_a_heartbeat_waits(books) as (platform, lifecycle, _):
        assert platform.requests("heartbeat")[-1].body["status"] == "draining"
        platform.release()
        assert await lifecycle.stop(timeout=5) is True
    assert books.tokens == (12, 42)


async def test_a_heartbeat_waiting_at_shutdown_that_the_platform_then_refuses_has_its_tokens_in_the_last_one() -> None:
    books = Books(refuse_held=True)
    async with drained_while_a_heartbeat_waits(books) as (platform, lifecycle, counters):
        counters.completion_tokens_total = 50  # served during the drain
        platform.release()
        assert await lifecycle.stop(timeout=5) is True
    assert books.tokens == (12, 50)
    assert [beat["status"] for beat in books.taken if beat["completion_tokens"]] == ["draining"]


async def test_a_heartbeat_on_its_way_that_takes_the_whole_wait_is_said_so_not_no_answer_within_0_s(caplog: pytest.LogCaptureFixture) -> None:
    books = Books()
    with caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        async with drained_while_a_heartbeat_waits(books) as (platform, lifecycle, _):
            assert await lifecycle.stop(timeout=1) is True, "deregistered"
            platform.release()
    [said] = [r.getMessage() for r in caplog.records if "could not report" in r.getMessage()]
    assert said == (
        f"could not report the last 12 prompt and 42 completion tokens served to {platform.url} (the heartbeat on its way got no "
        "answer within 0.5 s, so the last one was not sent): the platform's count misses them"
    )  # before: "(no answer within 0 s)", and a last heartbeat with no time to be answered


async def test_a_last_heartbeat_the_platform_never_answers_still_leaves_the_delete_its_time(caplog: pytest.LogCaptureFixture) -> None:
    books = Books()
    counters = EngineCounters()
    with HostilePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        platform.script("heartbeat", books.heartbeat)
        lifecycle = lifecycle_with(platform, counters)
        lifecycle.start()
        await eventually(lambda: len(books.taken) >= 2)
        await lifecycle.drain(timeout=3)
        counters.completion_tokens_total = 30  # served during the drain
        books.hold()
        assert await lifecycle.stop(timeout=1) is True, "deregistered"
        platform.release()
    [said] = [r for r in caplog.records if "could not report" in r.getMessage()]
    assert said.levelno == logging.WARNING
    assert said.getMessage() == f"could not report the last 0 prompt and 30 completion tokens served to {platform.url} (no answer within 0.5 s): the platform's count misses them"


async def test_tokens_that_cannot_be_reported_at_shutdown_are_said_in_one_line_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    counters = EngineCounters()
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, counters)
        lifecycle.start()
        await eventually(lambda: len(platform.providers) == 1)
        await lifecycle.drain(timeout=3)
    counters.prompt_tokens_total, counters.completion_tokens_total = 5, 77  # served during the drain, the platform gone meanwhile
    with caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        assert await lifecycle.stop(timeout=1) is False
    said = [r.getMessage() for r in caplog.records if "could not report" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"could not report the last 5 prompt and 77 completion tokens served to {platform.url} (")
