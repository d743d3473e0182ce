"""What the operations review found in a provider's logs and on its disk, each as the provider meets it.

- A damaged earnings ledger (``truncate -s 10000 ledger.sqlite3``: "database disk image is malformed")
  left the agent serving "degraded" for good, recording nothing, with a garbled fix ("it is damaged:
  move it away, and a new one is started, then restart the agent"), which nobody reads under systemd.
  Now the agent moves it aside itself at start and records into a new one; `vramsupply earnings`
  says so in one line and moves nothing. A locked or read-only file is never taken for a damaged one.
- ``/health`` (the platform's checks) and ``/metrics`` (a scrape every 15 s) wrote an INFO access
  line each, about 7,000 lines a day; now the successful ones are DEBUG lines.
- The thread tuner said "a step took 0.00045× as long with 1 as with 2"; now it says what it uses
  and how much faster that was, in words, the measured ratios at DEBUG.
- `vramsupply devplatform --api-key vs_live_…` took the key, but buyers using it got 401.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import openai
import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from live_platform import LivePlatform
from live_server import MODEL_ID, LiveServer
from test_engine_thread_tuner import TwoCoreMachine, serve_for, tuner_on

from vramsupply.engine.thread_switch_log import switch_line
from vramsupply.ledger import Entry, LedgerStore, default_ledger_path
from vramsupply.ledger.recorder import move_aside
from vramsupply.ledger.errors import damaged
from vramsupply.platform.api import RegisterRequest

SERVE = ("--model", str(TINY_MODEL), "--no-register", "--port", "0")


def health(agent: AgentProcess) -> dict[str, object]:
    with urllib.request.urlopen(agent.base_url.removesuffix("/v1") + "/health", timeout=10) as response:
        return json.load(response)


def buy(agent: AgentProcess) -> str:
    client = openai.OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0)
    return client.completions.create(model="stories260k", prompt="Once", max_tokens=4).id


def damaged_ledger(rows: int = 300) -> Path:
    """A ledger of ``rows`` requests, then cut to 10,000 bytes, as the review's ``truncate -s 10000`` did."""
    path = default_ledger_path()
    store = LedgerStore(path)
    store.add(Entry(time.time(), f"old-{i}", "m", "local", True, 1, 10, 0, 5, 100, 200, 0, 0) for i in range(rows))
    store.close()
    os.truncate(path, 10_000)
    return path


# ---- 1: a damaged ledger ----------------------------------------------------------------------------


def test_an_agent_started_on_a_damaged_ledger_moves_it_aside_and_records_into_a_new_one() -> None:
    ledger = damaged_ledger()
    with AgentProcess(*SERVE) as agent:
        agent.wait_ready()
        status = health(agent)
        sold = buy(agent)
        assert agent.stop() == 0

    [aside] = [p for p in ledger.parent.iterdir() if p.name.startswith("ledger.sqlite3.damaged-")]
    assert re.fullmatch(r"ledger\.sqlite3\.damaged-\d{8}T\d{6}Z", aside.name)
    assert aside.stat().st_size == 10_000, "the damaged file is kept as it was, for salvage"
    assert status["status"] == "ok" and not status.get("warnings")
    warnings = [line for line in agent.stderr if "damaged" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], agent.log
    assert f"the earnings ledger {ledger} was damaged (database disk image is malformed): moved it to {aside} and started a new one" in warnings[0]
    assert warnings[0].endswith(f"To try to salvage them: sqlite3 {aside} .recover | sqlite3 {ledger.parent}/ledger.recovered.sqlite3")
    store = LedgerStore(ledger)
    assert [e.request_id for e in store.entries()] == [sold]
    store.close()


def test_earnings_on_a_damaged_ledger_says_so_in_one_line_and_moves_nothing() -> None:
    ledger = damaged_ledger()
    before = sorted(p.name for p in ledger.parent.iterdir())

    result = run_cli("earnings")

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: the earnings ledger {ledger} is damaged (database disk image is malformed); `vramsupply serve` moves it aside "
        f"and starts a new one when it next starts. To try to salvage its rows: sqlite3 {ledger} .recover | sqlite3 {ledger.parent}/ledger.recovered.sqlite3"
    ]
    assert sorted(p.name for p in ledger.parent.iterdir()) == before and ledger.stat().st_size == 10_000


def test_a_damaged_ledger_is_moved_with_its_wal_and_shm_and_an_earlier_one_is_never_overwritten(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    noon = 1_796_558_400.0  # 2026-12-06 12:00:00 UTC
    for attempt in ("first", "second"):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{ledger}{suffix}").write_text(f"{attempt}{suffix}")
        move_aside(ledger, now=noon)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"ledger.sqlite3.damaged-20261206T120000Z{tail}" for tail in ("", "-2", "-2-shm", "-2-wal", "-shm", "-wal")
    ]
    assert Path(f"{tmp_path}/ledger.sqlite3.damaged-20261206T120000Z-wal").read_text() == "first-wal"
    assert Path(f"{tmp_path}/ledger.sqlite3.damaged-20261206T120000Z-2").read_text() == "second"


def test_only_corruption_counts_as_damage_never_a_locked_or_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    LedgerStore(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError) as locked:
        sqlite3.connect(path, timeout=0, isolation_level=None).execute("BEGIN IMMEDIATE")
    holder.execute("ROLLBACK")
    with pytest.raises(sqlite3.OperationalError) as read_only:
        sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute("CREATE TABLE t (x)")
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not a ledger at all\n" * 400)
    with pytest.raises(sqlite3.DatabaseError) as garbage:
        sqlite3.connect(not_a_database).execute("PRAGMA user_version").fetchone()

    assert not damaged(locked.value) and not damaged(read_only.value)
    assert damaged(garbage.value)


def test_a_data_dir_that_is_a_file_is_named_as_such_by_serve_and_earnings(isolated_env: Path) -> None:
    """mkdir's "File exists" named nothing, and `earnings` said "No requests recorded"."""
    folder = default_ledger_path().parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("")  # the data dir is a file
    with AgentProcess(*SERVE) as agent:
        agent.wait_ready()
        assert agent.stop() == 0
    said = f"{folder} is a file, not a directory"
    warned = [line for line in agent.stderr if " WARNING " in line]
    assert len(warned) == 3 and all(said in line for line in warned), warned  # the lock, the ledger, the agent's state
    earnings = run_cli("earnings")
    assert earnings.returncode == 1
    assert earnings.stderr.strip() == f"error: cannot read the earnings ledger {default_ledger_path()}: {said}"


# ---- 2: access lines of health checks and scrapes -----------------------------------------------------


def access_lines(agent: AgentProcess) -> list[str]:
    return [line for line in agent.stderr if " vramsupply.access: " in line]


def probe_and_buy(agent: AgentProcess) -> None:
    root = agent.base_url.removesuffix("/v1")
    for path in ("/health", "/metrics", "/health?full=1"):
        urllib.request.urlopen(root + path, timeout=10).close()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(root + "/health", data=b"{}", method="POST"), timeout=10)
    assert refused.value.code == 405
    buy(agent)


def test_successful_health_checks_and_scrapes_are_not_logged_at_info_but_buyers_and_errors_are() -> None:
    with AgentProcess(*SERVE) as agent:
        agent.wait_ready()
        probe_and_buy(agent)
        assert agent.stop() == 0

    lines = access_lines(agent)
    assert not [line for line in lines if '"GET /health' in line or '"GET /metrics' in line], lines
    assert [line for line in lines if '"POST /health HTTP/1.1" 405' in line and " INFO " in line]
    assert [line for line in lines if '"POST /v1/completions HTTP/1.1" 200' in line and " INFO " in line]


def test_at_debug_the_health_checks_and_scrapes_are_logged_as_debug_lines() -> None:
    with AgentProcess(*SERVE, "--log-level", "DEBUG") as agent:
        agent.wait_ready()
        probe_and_buy(agent)
        assert agent.stop() == 0

    probes = [line for line in access_lines(agent) if '"GET /health' in line or '"GET /metrics' in line]
    assert len(probes) == 3 and all(" DEBUG vramsupply.access: " in line for line in probes), probes


def test_malformed_http_from_a_client_is_one_warning_line_not_an_error_with_a_traceback() -> None:
    with AgentProcess(*SERVE) as agent:
        agent.wait_ready()
        root = agent.base_url.removesuffix("/v1")
        too_long = urllib.request.Request(root + "/" + "a" * 9000)
        brotli = urllib.request.Request(agent.base_url + "/completions", data=b"{}", headers={"Content-Encoding": "br"})
        for request in (too_long, brotli):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 400
        buy(agent)  # the agent carries on
        assert agent.stop() == 0

    said = [line for line in agent.stderr if " aiohttp.server: " in line]
    assert len(said) == 2 and all(" WARNING " in line and "malformed HTTP, answered 400" in line for line in said), said
    assert "Traceback" not in agent.log  # before: an ERROR line each, with aiohttp's traceback folded into it


def test_a_stream_its_buyer_cuts_short_gets_an_access_line_too() -> None:
    """aiohttp writes none for a handler cancelled by the hang-up: the cut stream was in the ledger
    and /metrics (499), and missing from the access log."""
    with AgentProcess(*SERVE) as agent:
        agent.wait_ready()
        body = json.dumps({"prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}).encode()
        request = urllib.request.Request(agent.base_url + "/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.readline()  # the first event: then the buyer leaves
        agent.wait_for(lambda: any("(the buyer hung up)" in line for line in access_lines(agent)), "the hang-up's access line", timeout=30)
        assert agent.stop() == 0
    [line] = [line for line in access_lines(agent) if "(the buyer hung up)" in line]
    assert re.search(r' INFO vramsupply\.access: 127\.0\.0\.1 "POST /v1/completions HTTP/1\.1" 499 - \d+\.\d{6}s req_[0-9a-f]{24} \(the buyer hung up\)$', line), line


# ---- 3: the thread tuner's lines -------------------------------------------------------------------------


def test_each_thread_switch_says_what_is_used_and_why_in_a_providers_words(caplog: pytest.LogCaptureFixture) -> None:
    machine = TwoCoreMachine(busy_programs=1)  # one thread: 6 ms a step, two: 330 ms
    tuner = tuner_on(machine)
    with caplog.at_level(logging.DEBUG, logger="vramsupply.engine.thread_tuner"):
        serve_for(tuner, machine, 2)
        machine.busy_programs = 0
        serve_for(tuner, machine, 3)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]

    assert info == [
        "using 1 CPU thread instead of 2: other programs may be keeping the cores busy; steps were 55× faster with 1",
        "using 2 CPU threads instead of 1: the cores have room again; steps were 1.3× faster with 2",
    ], "one line per change of thread count"
    assert [line for line in debug if line.startswith("thread probe: steps with 1 took 0.018 of the time of steps with 2")]


def test_a_switch_line_says_the_speed_up_in_plain_numbers() -> None:
    assert switch_line(1, 2, [0.55, 0.56, 0.6]) == "using 1 CPU thread instead of 2: other programs may be keeping the cores busy; steps were 1.8× faster with 1"
    assert switch_line(1, 2, [0.00045]).endswith("steps were over 100× faster with 1")  # one step beside a stalled one
    assert switch_line(4, 2, [0.97, 0.98, 0.99]) == "using 4 CPU threads instead of 2: the cores have room again; steps were about as fast with 4"


# ---- 4: the reference platform's buyers with a key of another prefix ----------------------------------


async def test_buyers_of_a_devplatform_started_with_any_key_login_accepts_are_served_with_it() -> None:
    key = "vs_live_0123456789abcdef"  # a key `login` accepts, given to `devplatform --api-key`
    with LivePlatform(api_key=key) as platform, LiveServer(endpoint_token="endpoint-token-for-tests") as agent:
        offer = RegisterRequest(endpoint_url=agent.url, model=MODEL_ID, input_price_per_million=100, output_price_per_million=200,
                                context_length_offered=2048, endpoint_token="endpoint-token-for-tests")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            body = offer.model_dump(mode="json", exclude_none=True)
            async with session.post(f"{platform.url}/v1/providers/register", json=body) as registered:
                assert registered.status == 201, await registered.text()
        async with openai.AsyncOpenAI(base_url=f"{platform.url}/v1", api_key=key, max_retries=0) as buyer:
            completion = await buyer.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Once"}], max_tokens=4)
        async with openai.AsyncOpenAI(base_url=f"{platform.url}/v1", api_key="vs_live_someone_else", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError):
                await stranger.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Once"}], max_tokens=4)

    assert completion.choices[0].message.content
