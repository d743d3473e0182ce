"""`vramsupply status` says when instances the agent left listed wait to be deleted from the platform.

The agent keeps the ids of instances it could not delete (a killed run's, one at an old endpoint
URL) in its registration record and retries them; only `status --json` showed them, as part of the
record. A provider reading the table learns how many wait, since when, and who will retry them.
The record is written as the agent writes it, its /health played by ``OneAnswerPlatform``, and
`status` runs as the real CLI.
"""

from __future__ import annotations

import time
from typing import Any

from conftest import run_cli
from live_platform import API_KEY, free_port
from test_leftover_retry import account_of
from test_platform_cli import write_raw_state
from test_platform_ops_review import dead_pid
from test_status_honesty import healthy_agent, status_of

PLATFORM = "https://vram.supply"
SINCE = time.time() - 300


def kept(provider_id: str, *, retired: bool = False, platform_url: str = PLATFORM, key: str = API_KEY, noted_at: float = SINCE) -> dict[str, Any]:
    return {
        "provider_id": provider_id, "platform_url": platform_url, "account": account_of(key), "endpoint_url": "https://old.example.com",
        "pid": 4242, "noted_at": noted_at, "retired": retired,
    }  # fmt: skip


def left_listed_row(stdout: str) -> str:
    rows = [line for line in stdout.splitlines() if "left listed" in line]
    assert len(rows) == 1, f"one row says what waits to be deleted:\n{stdout}"
    [row] = rows
    return " ".join(row.replace("│", " ").split())


def test_status_says_how_many_instances_wait_to_be_deleted_since_when_and_that_the_running_agent_retries() -> None:
    with healthy_agent() as agent:
        leftovers = [kept("prov_killed"), kept("prov_old_url", retired=True, noted_at=SINCE + 60)]
        write_raw_state(local_url=agent.url, platform_url=PLATFORM, account=account_of(API_KEY), leftovers=leftovers)
        table, report = status_of(agent)

    assert table.returncode == 0, "waiting leftovers change no exit code: the agent serves and is listed"
    today = time.localtime(SINCE)[:3] == time.localtime()[:3]
    since = time.strftime("%H:%M" if today else "%Y-%m-%d %H:%M", time.localtime(SINCE))  # the earliest, with its date if not today
    row = left_listed_row(table.stdout)
    assert "2 instances left listed (1 by a killed run, 1 at an old endpoint URL) wait to be deleted from the platform" in row
    assert f"(since {since})" in row
    assert row.endswith("the agent retries while it serves")
    assert [left["provider_id"] for left in report["registration"]["leftovers"]] == ["prov_killed", "prov_old_url"]


def test_a_record_that_keeps_none_shows_no_such_line() -> None:
    with healthy_agent() as agent:
        write_raw_state(local_url=agent.url)
        table, _ = status_of(agent)

    assert table.returncode == 0
    assert "left listed" not in table.stdout


def test_with_no_agent_running_status_says_the_next_start_deletes_them() -> None:
    write_raw_state(pid=dead_pid(), phase="deregistered", provider_id=None, account=account_of(API_KEY), leftovers=[kept("prov_killed")])
    table = run_cli("status", env={"VRAM_SUPPLY_PORT": str(free_port()), "COLUMNS": "400"})  # no agent answers

    assert table.returncode == 1
    row = left_listed_row(table.stdout)
    assert "1 instance left listed (by a killed run) waits to be deleted from the platform" in row
    assert "the agent is not running: it retries it when it next starts" in row


def test_instances_of_another_account_are_said_to_wait_for_an_agent_using_it() -> None:
    with healthy_agent() as agent:
        leftovers = [kept("prov_mine"), kept("prov_theirs", key="sk-other-account-00000000000000")]
        write_raw_state(local_url=agent.url, platform_url=PLATFORM, account=account_of(API_KEY), leftovers=leftovers)
        table, _ = status_of(agent)

    row = left_listed_row(table.stdout)
    assert "the agent retries while it serves" in row
    assert "1 of them was registered with another platform or API key: only an agent using that one deletes it" in row
