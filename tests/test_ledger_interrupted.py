"""A request in flight when the agent is killed outright is in the earnings ledger, as interrupted.

The ledger wrote a request's row only when it ended, so an agent killed with SIGKILL (or by the OOM
killer, or a power cut) in the middle of a stream left no trace of it: `vramsupply earnings` said
nothing of tokens served, which heartbeats may already have reported to the platform. Now the
request has a row in flight from its first token, its completion tokens written every 2 s; after
the kill `earnings` reads it as interrupted, and the next start records it so, once.

The stream stops mid-answer for good (``fault_agent.py``: every decode after the first 40 blocks),
so the kill finds it in flight whatever the machine's speed, and its tokens written are final.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent_process import AgentProcess
from conftest import REPO, TINY_MODEL, run_cli
from openai import OpenAI
from test_ledger_unpaid import SCHEMA_1

from vramsupply.ledger import LedgerStore, LedgerWriter, default_ledger_path

PROMPT = "Once upon a time"
SERVE = ("--model", str(TINY_MODEL), "--port", "0", "--no-register")


def buy_a_long_stream(base_url: str, model: str, tokens: list[str]) -> None:
    """A buyer streaming 400 tokens that never come in full: each token it receives is kept."""
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    try:
        for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=400, extra_body={"ignore_eos": True}, logprobs=0, stream=True):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                tokens.extend(chunk.choices[0].logprobs.tokens or [])
    except Exception:  # the agent is killed under it
        pass


def in_flight(ledger: Path) -> list[tuple[int, int]]:
    """(prompt, completion tokens) of each row in flight, read as another program would."""
    db = sqlite3.connect(f"{ledger.as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT prompt_tokens, completion_tokens FROM in_flight").fetchall()
    except sqlite3.OperationalError:  # no such table: a ledger without rows in flight
        return []
    finally:
        db.close()


def earnings() -> dict[str, object]:
    result = run_cli("earnings", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_stream_in_flight_when_the_agent_is_killed_is_in_earnings_as_interrupted(tmp_path: Path) -> None:
    ledger, trigger = default_ledger_path(), tmp_path / "trigger"
    env = {"FAULT_AGENT_KIND": "stall", "FAULT_AGENT_TRIGGER": str(trigger), "FAULT_AGENT_AFTER": "40"}
    with AgentProcess(*SERVE, "--stall-timeout", "3600", env=env, program=[sys.executable, str(REPO / "tests" / "fault_agent.py")]) as agent:
        agent.wait_ready()
        client = OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0)
        prompt_tokens = client.completions.create(model=agent.model_id, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
        trigger.touch()
        received: list[str] = []
        threading.Thread(target=buy_a_long_stream, args=(agent.base_url, agent.model_id, received), daemon=True).start()
        agent.wait_for(lambda: "FAULT: stalling a decode" in agent.log, "the stream stopped mid-answer")
        agent.wait_for(lambda: in_flight(ledger) == [(prompt_tokens, len(received))], "every token the buyer got written in flight")
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait()
    served = len(received)

    after_kill = earnings()

    with AgentProcess(*SERVE) as restarted:
        restarted.wait_ready()
        assert restarted.stop() == 0, restarted.log
    after_restart = earnings()
    rows = LedgerStore(ledger).entries()

    assert 0 < served < 400
    interrupted = {
        "requests": 2, "cut_requests": 1, "interrupted_requests": 1, "in_flight_requests": 0,
        "interrupted_prompt_tokens": prompt_tokens, "interrupted_completion_tokens": served,
        "cut_prompt_tokens": prompt_tokens, "cut_completion_tokens": served, "completion_tokens": 1 + served,
    }
    assert {k: after_kill[k] for k in interrupted} == interrupted, after_kill
    assert after_restart == {**after_kill, "since": after_restart["since"]}, "the next start records it as earnings read it"
    assert [(r.complete, r.interrupted, r.prompt_tokens, r.completion_tokens, r.gross_nanocents) for r in rows] == [
        (True, False, prompt_tokens, 1, 0),
        (False, True, prompt_tokens, served, 0),
    ]
    assert in_flight(ledger) == []
    said = [line for line in restarted.stderr if "recorded as interrupted" in line]
    assert len(said) == 1 and "1 request in flight when an earlier agent process ended" in said[0], restarted.log
    assert f"{prompt_tokens} prompt + {served} completion tokens served" in said[0]


def test_a_schema_2_ledger_is_brought_up_to_date_and_its_interrupted_requests_keep_apart_when_rolled_up() -> None:
    """A ledger an earlier version wrote gains the rows in flight in place; a request a killed
    agent left there is recorded by the next writer, and days rolled up still tell it apart."""
    from vramsupply.host.processes import process_start
    from vramsupply.ledger.in_flight import InFlight
    from vramsupply.ledger.schema import MIGRATE_1_TO_2

    path, now = default_ledger_path(), time.time()
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_1 + MIGRATE_1_TO_2 + "PRAGMA user_version=2;")
    old.execute("INSERT INTO requests VALUES (NULL, ?, 'old', 'org/model', 'platform', 1, 1, 50, 0, 10, 100, 200, 7000, 6650)", (now - 60,))
    old.commit()
    old.close()
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    gone = f"{killed.pid}:{process_start(killed.pid) or ''}"
    killed.wait()
    store = LedgerStore(path)
    store.run = gone  # as the killed agent wrote it
    store.in_flight([InFlight("cut-off", "org/model", "platform", 1, 12, 34, 100, 200, now - 30)])
    store.close()

    LedgerWriter(LedgerStore(path)).close()
    report = earnings()
    store = LedgerStore(path)
    store.roll_up(now=now, max_rows=0)
    [day] = store.groups(now - 86400)
    store.close()

    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (3,)
    assert (report["requests"], report["cut_requests"], report["interrupted_requests"]) == (2, 1, 1)
    assert (report["interrupted_prompt_tokens"], report["interrupted_completion_tokens"], report["gross_nanocents"]) == (12, 34, 7000)
    assert (day.requests, day.interrupted_requests, day.interrupted_prompt_tokens, day.interrupted_completion_tokens) == (2, 1, 12, 34)
    assert (day.cut_requests, day.cut_completion_tokens, day.gross_nanocents) == (1, 34, 7000)
