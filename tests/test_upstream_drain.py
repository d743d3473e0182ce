"""Stopping an agent that sells an upstream server while buyers are being served: at the
`--drain-timeout` deadline every request the upstream has not finished ends the way our own
engine ends its generations. A stream gets the `shutting_down` error event, not a cut connection;
a whole answer still awaited gets a 503 saying so; what was already sent is in the earnings ledger,
marked incomplete; the upstream's requests are closed, so it stops generating for nobody; and the
agent deregisters and exits 0 (before, aiohttp's shutdown waited twice its own timeout, then cut
the stream with nothing recorded: 73 s with the default drain, past systemd's stop timeout).

The upstream is a real aiohttp server in a thread (the agent is a real process, which the test
blocks on) that streams one character every 50 ms for ever and never finishes a whole answer.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from agent_process import AgentProcess
from aiohttp import web
from doubles.hostile_upstream import HostileUpstream, chunk, event
from live_platform import LivePlatform, free_port
from test_upstream_serve import AUTH, agent_env

from vramsupply.ledger import LedgerStore, default_ledger_path

PIECE = "x"  # one token by the double's tokenizer (a token per character)


class EndlessUpstream(HostileUpstream):
    """Streams ``PIECE`` for ever; a whole answer never comes. Notes when its requests begin and end."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = self.endless
        self.began = {True: threading.Event(), False: threading.Event()}  # by "stream"
        self.closed = {True: threading.Event(), False: threading.Event()}

    async def endless(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        streamed = body.get("stream") is True
        self.began[streamed].set()
        try:
            if not streamed:
                await asyncio.sleep(3600)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            while True:
                await response.write(event(chunk(PIECE)))
                await asyncio.sleep(0.05)
        finally:  # the front closed the request (a write failed, or this handler was cancelled)
            self.closed[streamed].set()


class ThreadedUpstream:
    """``upstream`` served on localhost from a thread with its own event loop."""

    def __init__(self, upstream: HostileUpstream) -> None:
        self.upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="upstream", daemon=True)
        self._runner = web.AppRunner(upstream.app(), handler_cancellation=True, shutdown_timeout=1)
        self.url = ""

    def __enter__(self) -> ThreadedUpstream:
        self._thread.start()
        self._run(self._start())
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    def __exit__(self, *exc_info: object) -> None:
        self._run(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)


def post(url: str, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **AUTH})


def stream_buyer(url: str, model: str, outcome: dict[str, Any]) -> Callable[[], None]:
    """Reads a stream to its end: each data line in ``outcome["events"]``, or how the connection failed."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}], "stream": True}

    def buy() -> None:
        outcome["events"] = events = []
        try:
            with urllib.request.urlopen(post(url + "/v1/chat/completions", body), timeout=120) as response:
                for line in response:
                    if line.startswith(b"data: "):
                        events.append(line[6:].decode().strip())
        except Exception as exc:  # noqa: BLE001 - a cut connection is what the test looks for
            outcome["failed"] = f"{type(exc).__name__}: {exc}"

    return buy


def whole_buyer(url: str, model: str, outcome: dict[str, Any]) -> Callable[[], None]:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}]}

    def buy() -> None:
        try:
            with urllib.request.urlopen(post(url + "/v1/chat/completions", body), timeout=120) as response:
                outcome["status"], outcome["body"] = response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            outcome["status"], outcome["body"] = error.code, json.loads(error.read())
        except Exception as exc:  # noqa: BLE001
            outcome["failed"] = f"{type(exc).__name__}: {exc}"

    return buy


def pieces_received(events: list[str]) -> int:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return sum(c["choices"][0]["delta"]["content"].count(PIECE) for c in chunks if c.get("choices"))


def serve_and_stop(signals: list[signal.Signals], drain_timeout: str, drained_line: str) -> tuple[int, AgentProcess, dict[str, Any], dict[str, Any], EndlessUpstream]:
    """An agent before the endless upstream, one stream and one whole answer in flight, then ``signals``."""
    double = EndlessUpstream()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    streamed: dict[str, Any] = {}
    whole: dict[str, Any] = {}
    with ThreadedUpstream(double) as upstream, LivePlatform() as platform:
        args = ("--engine", "upstream", "--upstream-url", upstream.url, "--port", str(port), "--endpoint-url", endpoint, "--drain-timeout", drain_timeout)
        with AgentProcess(*args, env=agent_env(platform.url)) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration once the upstream is ready")
            agent.wait_ready()  # the ready line names the model: read before it, the buyers asked for '' and got 404
            buyers = [threading.Thread(target=buy(endpoint, agent.model_id, outcome)) for buy, outcome in ((stream_buyer, streamed), (whole_buyer, whole))]
            for buyer in buyers:
                buyer.start()
            agent.wait_for(lambda: double.began[False].is_set() and pieces_received(list(streamed.get("events", []))) >= 3, "both requests under way")
            agent.send_signal(signals[0])
            for sig in signals[1:]:
                agent.wait_for(lambda: drained_line in agent.log, "the drain")
                agent.send_signal(sig)
            code = agent.wait(timeout=60)
            for buyer in buyers:
                buyer.join(30)
        assert platform.providers == [], "deregistered"
    return code, agent, streamed, whole, double


def assert_ended_cleanly_and_billed(agent: AgentProcess, streamed: dict[str, Any], whole: dict[str, Any], double: EndlessUpstream) -> None:
    assert "failed" not in streamed, f"the stream was cut: {streamed['failed']}"
    last = json.loads(streamed["events"][-1])
    assert "error" in last, f"the stream ended without an error event, after {streamed['events'][-2:]}"
    assert last["error"] == {"message": "The server is shutting down.", "type": "server_error", "param": None, "code": "shutting_down"}, "as our own engine ends it"
    assert whole.get("status") == 503 and whole["body"]["error"]["code"] == "shutting_down", whole
    [row] = LedgerStore(default_ledger_path()).entries()  # the whole answer never came: nothing to bill
    assert (row.complete, row.completion_tokens) == (False, pieces_received(streamed["events"])), "what the buyer received, billed as incomplete"
    assert row.prompt_tokens > 0
    assert double.closed[True].wait(10) and double.closed[False].wait(10), "the upstream's requests were closed"
    assert "Traceback" not in agent.log


def test_sigterm_ends_forwarded_requests_at_the_drain_deadline_bills_what_was_sent_and_exits_0() -> None:
    code, agent, streamed, whole, double = serve_and_stop([signal.SIGTERM], "1", "")
    assert code == 0, agent.output
    assert_ended_cleanly_and_billed(agent, streamed, whole, double)
    assert "ending 2 forwarded request(s) the upstream has not finished" in agent.log


def test_a_second_signal_during_the_drain_ends_forwarded_requests_at_once_the_same_way() -> None:
    code, agent, streamed, whole, double = serve_and_stop([signal.SIGINT, signal.SIGINT], "600", "waiting up to 600s for 2 in-flight request(s)")
    assert code == 130, agent.output
    assert agent.stderr[-1] == "error: stopped without waiting for 2 in-flight requests"
    assert_ended_cleanly_and_billed(agent, streamed, whole, double)
