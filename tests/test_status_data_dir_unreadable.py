"""`vramsupply status` shows the agent's health when it may not enter the agent's data dir.

The system service keeps its data where the provider's own user may not go, and a provider may
point XDG_DATA_HOME at another user's folder: `status` stopped at the first file it looked for
there ("Permission denied: …/registration.json", exit 1) and showed nothing, though the agent's
health comes from its HTTP endpoint. It now shows that, and names in one line each what it could
not read (the registration record, the earnings ledger); `earnings` says the same in one line.
"""

from __future__ import annotations

import json
import time

from test_ledger import fill_ledger
from test_ledger_read_only import run_as, without_privileges
from test_platform_cli import write_raw_state
from test_status_honesty import healthy_agent

from vramsupply.config import data_dir
from vramsupply.ledger import default_ledger_path
from vramsupply.platform import default_state_path


def test_status_shows_the_agents_health_and_names_what_it_may_not_read_in_the_data_dir() -> None:
    write_raw_state()
    fill_ledger(time.time())
    record, ledger = default_state_path(), default_ledger_path()
    data_dir().chmod(0o000)  # a folder this user may not enter
    try:
        with healthy_agent(slots_busy=0, queue=0) as agent:  # answers /health where the settings say the agent listens
            port = {"VRAM_SUPPLY_PORT": agent.url.rsplit(":", 1)[1]}
            table = run_as(without_privileges(), "status", env={**port, "COLUMNS": "400"})
            as_json = run_as(without_privileges(), "status", "--json", env=port)
        earnings = run_as(without_privileges(), "earnings")
    finally:
        data_dir().chmod(0o700)

    assert table.returncode == as_json.returncode == 3, table.stderr  # it serves, but nothing says it is listed
    assert table.stderr == as_json.stderr == ""
    rows = [" ".join(line.strip("│ ").split()) for line in table.stdout.splitlines()]
    assert f"agent │ ok {agent.url}" in rows and "model │ stories260k" in rows
    assert f"registration │ none recorded: cannot read {record}: Permission denied" in rows
    assert f"last 24 h │ unknown: cannot read the earnings ledger {ledger}: Permission denied" in rows
    assert "prices │ none: the running agent's record, which holds them, cannot be read (see registration)" in rows
    report = json.loads(as_json.stdout)
    assert report["agent"]["healthy"] is True and report["agent"]["health"]["model"] == "stories260k"
    assert report["registration_error"] == f"cannot read {record}: Permission denied"
    assert report["earnings"]["ledger_error"] == f"cannot read the earnings ledger {ledger}: Permission denied"
    assert earnings.returncode == 1 and earnings.stdout == ""
    assert earnings.stderr == f"error: cannot read the earnings ledger {ledger}: Permission denied\n"
