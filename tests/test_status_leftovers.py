"""`vramsupply status` says when instances the agent left listed wait to be deleted from the platform.

The agent keeps the ids of instances it could not delete (a killed run's, one at an old endpoint
URL) in its registration record and retries them; only `status --json` showed them, as part of the
record. A provider reading the table learns how many wait, since when, and who will retry them.
The record is written as the agent writes it, its /health played by ``OneAnswerPlatform``, and
`status` runs as the real CLI.
"""

from __future__ import annotations

import json
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
    assert "2 instances left listed (1 by an earlier run, 1 at an old endpoint URL) wait to be deleted from the platform" in row
    assert f"(since {since})" in row
    assert row.endswith("the agent retries while it serves")
    assert [left["provider_id"] for left in report["registration"]["leftovers"]] == ["prov_killed", "prov_old_url"]


def test_a_stop_whose_delete_failed_is_not_called_a_killed_run() -> None:
    """The platform was down at the stop: the run ended cleanly and said it could not deregister."""
    write_raw_state(pid=dead_pid(), phase="deregister_failed", account=account_of(API_KEY))
    table = run_cli("status", env={"VRAM_SUPPLY_PORT": str(free_port()), "COLUMNS": "400"})
    report = json.loads(run_cli("status", "--json", env={"VRAM_SUPPLY_PORT": str(free_port())}).stdout)

    row = left_listed_row(table.stdout)
    assert "1 instance left listed (by an earlier run) waits to be deleted from the platform" in row  # before: "by a killed run"
    # --json says it too; the record keeps none yet (the next start adds it), and the JSON said nothing
    assert report["registration"]["leftovers"] == []
    [waiting] = report["registration"]["waiting_to_delete"]
    assert waiting["provider_id"] == report["registration"]["provider_id"] and waiting["retired"] is False


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
    assert "1 instance left listed (by an earlier run) waits to be deleted from the platform" in row
    assert "the agent is not running: it retries it when it next starts" in row


def test_instances_of_another_account_are_said_to_wait_for_an_agent_using_it() -> None:
    with healthy_agent() as agent:
        leftovers = [kept("prov_mine"), kept("prov_theirs", key="sk-other-account-00000000000000")]
        write_raw_state(local_url=agent.url, platform_url=PLATFORM, account=account_of(API_KEY), leftovers=leftovers)
        table, _ = status_of(agent)

    row = left_listed_row(table.stdout)
    assert "the agent retries the one of its own while it serves" in row
    assert "1 of them was registered with another platform or API key: only an agent using that one deletes it" in row


def clock(at: float) -> str:
    """A time as `status` writes it: with its date when not today."""
    today = time.localtime(at)[:3] == time.localtime()[:3]
    return time.strftime("%H:%M" if today else "%Y-%m-%d %H:%M", time.localtime(at))


def status_with_no_agent() -> str:
    table = run_cli("status", env={"VRAM_SUPPLY_PORT": str(free_port()), "COLUMNS": "400"})  # no agent answers
    assert table.returncode == 1
    return left_listed_row(table.stdout)


def test_a_killed_run_s_own_instance_is_counted_with_those_its_record_keeps() -> None:
    """The record of a run that ended registered names an instance still listed: the next start
    deletes it along with the kept ones (``leftovers.left_by``), so it waits too, since that run
    last wrote its record."""
    last_written = SINCE - 600
    leftovers = [kept("prov_killed"), kept("prov_old_url", retired=True)]
    write_raw_state(pid=dead_pid(), provider_id="prov_current", account=account_of(API_KEY), updated_at=last_written, leftovers=leftovers)

    row = status_with_no_agent()

    assert "3 instances left listed (2 by earlier runs, 1 at an old endpoint URL) wait to be deleted from the platform" in row
    assert f"(since {clock(last_written)})" in row
    assert "the agent is not running: it retries them when it next starts" in row


def test_a_killed_run_that_kept_no_others_still_shows_its_own_instance_waiting() -> None:
    write_raw_state(pid=dead_pid(), provider_id="prov_current", account=account_of(API_KEY), updated_at=SINCE)

    row = status_with_no_agent()

    assert "1 instance left listed (by an earlier run) waits to be deleted from the platform" in row
    assert f"(since {clock(SINCE)})" in row
    assert "the agent is not running: it retries it when it next starts" in row


def test_a_deregistered_record_names_no_instance_waiting() -> None:
    write_raw_state(pid=dead_pid(), phase="deregistered", account=account_of(API_KEY))
    table = run_cli("status", env={"VRAM_SUPPLY_PORT": str(free_port()), "COLUMNS": "400"})

    assert "left listed" not in table.stdout


def test_with_another_account_s_instances_among_them_the_line_says_how_many_the_agent_retries() -> None:
    leftovers = [kept("prov_killed"), kept("prov_old_url", retired=True), kept("prov_theirs", key="sk-other-account-00000000000000")]
    write_raw_state(pid=dead_pid(), provider_id="prov_current", account=account_of(API_KEY), leftovers=leftovers)

    row = status_with_no_agent()

    assert "4 instances left listed (3 by earlier runs, 1 at an old endpoint URL) wait to be deleted" in row
    assert "the agent is not running: it retries the 3 of its own when it next starts" in row
    assert "1 of them was registered with another platform or API key: only an agent using that one deletes it" in row
