"""`/health` while the earnings ledger records nothing: a real agent, a real full disk, a real bad path.

Buyers are served whether or not the ledger can record them, but never silently: `/health` says
"degraded", with the cause and the fix in `warnings`, while no row can be written, and "ok" again
once the rows held meanwhile are. Before, both of these runs answered "ok" with no warning at all.

The full disk is a 512 KiB tmpfs over the data dir, in a mount namespace of the agent's own
(unshare: no root needed outside it), filled from outside through ``/proc/<pid>/root``, as
`test_untested_paths.py` does for `bench`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL
from test_untested_paths import fill_up

from vramsupply.ledger import Entry, LedgerStore, default_ledger_path

SERVE = ("--model", str(TINY_MODEL), "--no-register", "--port", "0")


def health(agent: AgentProcess) -> dict[str, Any]:
    with urllib.request.urlopen(agent.base_url.removesuffix("/v1") + "/health", timeout=10) as response:
        assert response.status == 200
        return json.load(response)


def buy(agent: AgentProcess) -> str:
    """One small request, answered in full; its id."""
    client = openai.OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0)
    return client.completions.create(model="stories260k", prompt="Once", max_tokens=4).id


def logged(agent: AgentProcess, text: str) -> int:
    return sum(text in line for line in agent.stderr)


def can_mount_a_tmpfs(folder: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f'mount -t tmpfs -o size=64k tmpfs "{folder}"']
    return subprocess.run(probe, capture_output=True).returncode == 0


def ledger_copy(data: Path, into: Path) -> list[Entry]:
    """The rows of the ledger in ``data``, read from a copy: SQLite resolves ``/proc/<pid>/root``
    as a symlink to "/", which would open the file under the tmpfs instead of the one on it. The
    copy holds every commit: they are in the WAL file, which SQLite reads back on opening it."""
    name = default_ledger_path().name
    for suffix in ("", "-wal"):
        shutil.copyfile(data / (name + suffix), into / (name + suffix))
    store = LedgerStore(into / name)
    try:
        return store.entries()
    finally:
        store.close()


def agent_on_a_small_disk(data: Path) -> AgentProcess:
    """`vramsupply serve` whose data dir is a 512 KiB tmpfs in a mount namespace of its own."""
    script = f'mount -t tmpfs -o size=512k tmpfs "{data}" || exit 97\nexec "{sys.executable}" -m vramsupply "$@"\n'
    return AgentProcess(*SERVE, program=["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"])


def test_a_disk_that_fills_up_makes_health_degraded_until_the_ledger_is_written_again(tmp_path: Path) -> None:
    data = default_ledger_path().parent
    data.mkdir(parents=True)
    if not can_mount_a_tmpfs(data):
        pytest.skip("this machine cannot mount a tmpfs in a user and mount namespace of the test's own")
    with agent_on_a_small_disk(data) as agent:
        agent.wait_ready()
        seen = Path(f"/proc/{agent.process.pid}/root") / str(data).lstrip("/")  # the agent's data dir, from outside
        first = buy(agent)
        before = health(agent)

        fill_up(seen)
        unrecorded = [buy(agent) for _ in range(3)]  # served all the same
        full = health(agent)

        os.unlink(seen / "filler")  # the provider frees space
        last = buy(agent)
        agent.wait_for(lambda: health(agent)["status"] == "ok", "the held rows written")  # by this request, or the retry timer
        after = health(agent)
        rows = [e.request_id for e in ledger_copy(seen, tmp_path)]
        agent.stop()

    assert before["status"] == "ok"
    assert full["status"] == "degraded" and len(unrecorded) == 3
    assert full["warnings"] == [
        f"the earnings ledger {default_ledger_path()} cannot be written: database or disk is full; free space on its disk; "
        "3 requests served since are not recorded yet: held in memory, written by themselves once it can write "
        "(stopping the agent before then loses them)"
    ]
    assert logged(agent, "database or disk is full") == 1, "logged once, not per request"
    assert after["status"] == "ok" and not after.get("warnings")
    assert logged(agent, f"the earnings ledger {default_ledger_path()} is written again") == 1
    assert rows == [first, *unrecorded, last]


def test_a_ledger_path_that_is_a_directory_makes_health_degraded_until_it_is_moved() -> None:
    ledger = default_ledger_path()
    ledger.mkdir(parents=True)  # left behind by some tool, or a mistyped restore
    with AgentProcess(*SERVE) as agent:
        agent.wait_ready()
        at_start = health(agent)
        buy(agent)  # served all the same
        later = health(agent)
        assert agent.stop() == 0

    expected = (
        f"cannot open the earnings ledger {ledger}: Is a directory; move that directory out of the way; "
        "the agent tries again every 30 s while requests come (a restart tries at once), and until then requests are served and held in memory"
    )
    assert at_start["status"] == later["status"] == "degraded"
    assert at_start["warnings"] == [expected]
    assert later["warnings"] == [f"{expected}; 1 request not recorded so far"]  # before: no count, as the README promised one
    assert logged(agent, expected) == 1
    assert ledger.is_dir() and not any(ledger.iterdir())
