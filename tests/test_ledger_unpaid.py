"""The ledger earns only what buyers pay for: a request that ended early is served but unpaid.

The platform bills a request by the usage its buyer receives at the end of the answer; a buyer who
hangs up (or whose stream the agent cuts) never receives it, and the platform charges nothing.
Before, the ledger priced such a request like a complete one (a relayed stream abandoned after three
chunks was 55,226,000 nanocents of "revenue" the platform never billed), recorded a request dropped
while still queued as a 0-token row, and `vramsupply earnings` rounded 1.500696 ¢ to "$0.02".
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import llama_cpp
import pytest
from conftest import run_cli
from live_server import LiveServer

from vramsupply.ledger import Entry, LedgerStore, LedgerWriter, default_ledger_path, earned_nanocents, gross_nanocents
from vramsupply.ledger.money import dollars_text
from vramsupply.ledger.recorder import LedgerRecorder

TOKEN = "endpoint-token-for-unpaid-tests"
PRICES = (137, 291)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sell_through(live: LiveServer, path: Path) -> LedgerWriter:
    """Record what ``live`` serves as ``serve`` does for an agent registered on the platform."""
    writer = LedgerWriter.open(path)
    live.state.accounts.recorder = LedgerRecorder(writer, input_price=PRICES[0], output_price=PRICES[1], selling=True)
    return writer


def chat(content: str, max_tokens: int, **more: Any) -> dict[str, Any]:
    return {"model": "stories260k", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **more}


async def buy_stream(http: aiohttp.ClientSession, live: LiveServer, body: dict[str, Any], hang_up_after: int | None = None) -> dict[str, Any]:
    """A buyer streaming ``body``: reads it all (and its usage), or closes the connection once more
    than ``hang_up_after`` chunks carried text. Returns the id, the text chunks read and the usage."""
    got: dict[str, Any] = {"id": None, "chunks": 0, "usage": None}
    async with http.post(f"{live.base_url}/chat/completions", json=body, headers=AUTH) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            got["id"] = got["id"] or chunk["id"]
            got["usage"] = chunk.get("usage") or got["usage"]
            got["chunks"] += sum(bool(c["delta"].get("content")) for c in chunk["choices"])
            if hang_up_after is not None and got["chunks"] > hang_up_after:
                response.close()  # the buyer hangs up mid-answer
                break
    return got


async def settled(live: LiveServer) -> None:
    """Every slot idle, nothing queued, and every request that ended early recorded."""
    engine = live.engine
    assert engine is not None
    deadline = time.monotonic() + 30
    while (stats := engine.stats()).slots_busy or stats.queue_depth:
        assert time.monotonic() < deadline, "the server noticed the buyers who left within seconds"
        await asyncio.sleep(0.02)
    await live.acall(lambda: live.state.accounts.flush(30))


async def test_a_stream_the_buyer_abandons_is_recorded_with_its_tokens_and_earns_nothing(isolated_env: Path) -> None:
    path = default_ledger_path()
    async with LiveServer(endpoint_token=TOKEN, parallel=2) as live, aiohttp.ClientSession() as http:
        writer = sell_through(live, path)
        paid = await buy_stream(http, live, chat("Tell me a story.", 12, stream=True, stream_options={"include_usage": True}))
        cut = await buy_stream(http, live, chat("Tell me a long story.", 1800, stream=True, ignore_eos=True), hang_up_after=3)
        await settled(live)
        writer.close()

    rows = {e.request_id: e for e in LedgerStore(path).entries()}
    assert set(rows) == {paid["id"], cut["id"]}
    sold, abandoned = rows[paid["id"]], rows[cut["id"]]
    assert (sold.complete, sold.prompt_tokens, sold.completion_tokens) == (True, paid["usage"]["prompt_tokens"], 12)
    assert sold.gross_nanocents == gross_nanocents(sold.prompt_tokens, 12, *PRICES) > 0
    assert not abandoned.complete and abandoned.source == "platform", "recorded as sold through the platform, ended early"
    assert abandoned.prompt_tokens > 0 and cut["chunks"] <= abandoned.completion_tokens < 1800, "with the tokens it served"
    assert (abandoned.gross_nanocents, abandoned.earned_nanocents) == (0, 0), "no buyer paid for it: the platform bills none of it"

    report = json.loads(run_cli("earnings", "--since", "24h", "--json").stdout, parse_float=Decimal)
    table = run_cli("earnings", "--since", "24h", env={"COLUMNS": "200"})

    assert (report["requests"], report["cut_requests"]) == (2, 1)
    assert (report["cut_prompt_tokens"], report["cut_completion_tokens"]) == (abandoned.prompt_tokens, abandoned.completion_tokens)
    assert report["completion_tokens"] == 12 + abandoned.completion_tokens, "served tokens are all counted"
    assert (report["gross_nanocents"], report["earned_nanocents"]) == (sold.gross_nanocents, sold.earned_nanocents), "money: complete requests only"
    assert (report["cut_gross_nanocents"], report["cut_earned_cents"]) == (0, 0)
    assert table.returncode == 0, table.stderr
    assert (
        f"ended early, unpaid: 1 request(s) (the buyer hung up, or the agent cut them: drain deadline, engine failure), "
        f"{abandoned.prompt_tokens:,} prompt + {abandoned.completion_tokens:,} completion tokens served"
    ) in table.stdout
    assert f"{dollars_text(sold.gross_nanocents)} │ {dollars_text(sold.earned_nanocents)}" in table.stdout
    assert "older vramsupply" not in table.stdout


class DecodeGate:
    """Holds llama.cpp's decode while closed, as a long prefill ahead in line does, so that a request
    can be seen waiting in the queue or in the middle of its prefill. Only ``llama_cpp.llama_decode``
    is replaced: the scheduler, server and ledger are the real ones. Closed from ``async with`` on
    (the model is loaded by then), open again on leaving it, also when the test failed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._real = llama_cpp.llama_decode
        self._open = threading.Event()
        self.holding = threading.Event()

    async def __aenter__(self) -> DecodeGate:
        self._monkeypatch.setattr(llama_cpp, "llama_decode", self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.open()

    def __call__(self, ctx: object, batch: object) -> int:
        if not self._open.is_set():
            self.holding.set()
            self._open.wait(60)  # never forever, should the test fail before it opens
        return self._real(ctx, batch)

    def open(self) -> None:
        self._open.set()

    async def until_holding(self) -> None:
        assert await asyncio.to_thread(self.holding.wait, 30), "the scheduler reached the decode"


async def until(condition: Any, what: str) -> None:
    """Wait until ``condition()`` (a value, or an awaitable one) is true: ``what`` failed if it never is."""
    deadline = time.monotonic() + 30
    while not ((await value) if inspect.isawaitable(value := condition()) else value):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def hung_up(http: aiohttp.ClientSession, live: LiveServer) -> int:
    """How many requests the server has ended because their buyer hung up (status 499 on /metrics)."""
    async with http.get(f"{live.url}/metrics") as response:
        text = await response.text()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith("vramsupply_requests_total{") and 'status="499"' in line)


async def test_a_queued_request_its_buyer_drops_before_it_got_a_slot_leaves_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with LiveServer(endpoint_token=TOKEN, parallel=1) as live, aiohttp.ClientSession() as http, DecodeGate(monkeypatch) as gate:
        writer = sell_through(live, path)
        engine = live.engine
        assert engine is not None
        first = asyncio.create_task(buy_stream(http, live, chat("Tell me a story.", 5, stream=True, stream_options={"include_usage": True})))
        await gate.until_holding()  # the only slot is busy with the first buyer's prompt
        dropped = asyncio.create_task(buy_stream(http, live, chat("And one for me.", 5, stream=True)))
        await until(lambda: engine.stats().queue_depth == 1, "the second request waits in the queue")
        dropped.cancel()  # its buyer gives up while it waits for a slot
        await until(dropped.done, "the buyer's task ended")
        await until(lambda: hung_up(http, live), "the server noticed the buyer who left")
        gate.open()
        served = await first
        await settled(live)
        writer.close()

    rows = LedgerStore(path).entries()
    assert [(e.request_id, e.complete, e.completion_tokens) for e in rows] == [(served["id"], True, 5)], "nothing served, nothing recorded"


async def test_a_buyer_who_hangs_up_during_the_prefill_leaves_a_row_with_its_prompt_and_no_money(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt reached a slot and was being computed: work done for it, recorded, but unpaid."""
    path = tmp_path / "ledger.sqlite3"
    async with LiveServer(endpoint_token=TOKEN, parallel=1) as live, aiohttp.ClientSession() as http, DecodeGate(monkeypatch) as gate:
        writer = sell_through(live, path)
        left = asyncio.create_task(buy_stream(http, live, chat("Tell me a story about a dragon.", 5, stream=True)))
        await gate.until_holding()
        left.cancel()  # before its first token
        await until(left.done, "the buyer's task ended")
        await until(lambda: hung_up(http, live), "the server noticed the buyer who left")
        gate.open()
        await settled(live)
        writer.close()

    rows = LedgerStore(path).entries()
    assert len(rows) == 1
    row = rows[0]
    assert (row.complete, row.gross_nanocents, row.earned_nanocents) == (False, 0, 0)
    assert row.prompt_tokens > 0 and row.completion_tokens <= 1, "its prompt; at most the token the decode under way sampled"


def test_small_amounts_are_shown_with_four_significant_digits_not_rounded_to_a_cent(isolated_env: Path) -> None:
    """1.500696 ¢ gross and its 95 %, 1.4256612 ¢, were "$0.02" and "$0.01": earned looked like half of gross."""
    gross = gross_nanocents(10920, 16, *PRICES)
    assert (gross, earned_nanocents(gross)) == (1_500_696_000, 1_425_661_200)
    store = LedgerStore(default_ledger_path())
    store.add([Entry(time.time() - 60, "req-1", "org/model", "platform", True, 1, 10920, 0, 16, *PRICES, gross, earned_nanocents(gross))])
    store.close()

    table = run_cli("earnings", "--since", "24h", env={"COLUMNS": "80"})

    assert table.returncode == 0, table.stderr
    assert "$0.01501 │ $0.01426" in table.stdout
    assert "$0.02" not in table.stdout and "$0.01 " not in table.stdout
    assert "ended early" not in table.stdout
    assert dollars_text(123_456 * 10**9) == "$1,234.56" and dollars_text(12_345_678_000) == "$0.1235" and dollars_text(0) == "$0.00"


SCHEMA_1 = """
CREATE TABLE requests (
    id INTEGER PRIMARY KEY, finished_at REAL NOT NULL, request_id TEXT NOT NULL, model TEXT NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('platform', 'local')), complete INTEGER NOT NULL, choices INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    input_price INTEGER NOT NULL, output_price INTEGER NOT NULL, gross_nanocents INTEGER NOT NULL, earned_nanocents INTEGER NOT NULL
);
CREATE INDEX requests_finished_at ON requests (finished_at);
CREATE TABLE daily (
    day TEXT NOT NULL, model TEXT NOT NULL, source TEXT NOT NULL, input_price INTEGER NOT NULL, output_price INTEGER NOT NULL,
    requests INTEGER NOT NULL, cut_requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, gross_nanocents INTEGER NOT NULL, earned_nanocents INTEGER NOT NULL,
    PRIMARY KEY (day, model, source, input_price, output_price)
);
PRAGMA user_version=1;
"""


def test_a_ledger_an_older_version_wrote_opens_and_keeps_the_money_it_recorded(isolated_env: Path) -> None:
    """Rows an older vramsupply priced although their request ended early are not rewritten: the
    report sums them as recorded and says how much of the totals is such money."""
    now = time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(now - 10 * 86400))
    path = default_ledger_path()
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_1)
    cut_gross, sold_gross, day_gross = gross_nanocents(76, 154, *PRICES), gross_nanocents(50, 10, *PRICES), gross_nanocents(900, 300, *PRICES)
    for i, (complete, prompt, completion, gross) in enumerate(((0, 76, 154, cut_gross), (1, 50, 10, sold_gross))):
        old.execute("INSERT INTO requests VALUES (NULL, ?, ?, 'org/model', 'platform', ?, 1, ?, 0, ?, ?, ?, ?, ?)",
                    (now - 60 + i, f"old-{i}", complete, prompt, completion, *PRICES, gross, earned_nanocents(gross)))
    old.execute("INSERT INTO daily VALUES (?, 'org/model', 'platform', ?, ?, 3, 2, 900, 0, 300, ?, ?)", (day, *PRICES, day_gross, earned_nanocents(day_gross)))
    old.commit()
    old.close()

    report = json.loads(run_cli("earnings", "--since", "30d", "--json").stdout, parse_float=Decimal)
    table = run_cli("earnings", "--since", "30d", env={"COLUMNS": "200"})

    assert report["gross_nanocents"] == cut_gross + sold_gross + day_gross, "summed as recorded, never priced again"
    assert (report["requests"], report["cut_requests"], report["untracked_cut_requests"]) == (5, 3, 2)
    assert (report["cut_prompt_tokens"], report["cut_completion_tokens"]) == (76, 154)
    assert (report["cut_gross_nanocents"], report["cut_earned_nanocents"]) == (cut_gross, earned_nanocents(cut_gross))
    assert table.returncode == 0, table.stderr
    assert "ended early, unpaid: 3 request(s)" in table.stdout and "76 prompt + 154 completion tokens served" in table.stdout
    assert "2 of them, in days an older vramsupply rolled up, count as complete there" in table.stdout
    assert f"an older vramsupply priced some of them: {dollars_text(cut_gross)} gross, {dollars_text(earned_nanocents(cut_gross))} earned" in table.stdout
    # the first note must not say the totals leave them all out; status's day says how much was never paid
    assert "gross and earned leave them out, but for what an older vramsupply recorded on some of them (below)" in " ".join(table.stdout.split())
    day_row = " ".join(run_cli("status", env={"COLUMNS": "400"}).stdout.split())
    assert f"{dollars_text(earned_nanocents(cut_gross))} of it recorded by an older vramsupply on cut requests, which no buyer paid" in day_row
    store = LedgerStore(path)
    assert [e.gross_nanocents for e in store.entries()] == [cut_gross, sold_gross], "history is not rewritten"
    store.roll_up(now=now, max_rows=0)  # the rows the new version rolls up keep the split
    assert sum(g.cut_gross_nanocents for g in store.groups(now - 30 * 86400)) == cut_gross
    assert sum(g.untracked_cut_requests for g in store.groups(now - 30 * 86400)) == 2
    store.close()
