"""`vramsupply status` finds the agent that runs now, wherever it listens, and one data dir holds one agent.

A provider runs `serve --no-register --port 0` to try a model, leaves an old demo's record behind,
kills an agent, or starts a second one in the same shell: `status` must show the agent that runs
(or say that none does, and that what it shows is from an earlier run), its exit code must tell a
script whether the agent earns, and a second `serve` on the same data dir must refuse to start
rather than share the endpoint token, the registration record and the ledger.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agent_process import AgentProcess, demo_until_its_answer
from conftest import TINY_MODEL, run_cli
from live_platform import LivePlatform, free_port
from test_platform_cli import OneAnswerPlatform

from vramsupply.config import data_dir
from vramsupply.instance_lock import lock_holder
from vramsupply.platform import Phase, RegistrationState, default_state_path, read_state
from vramsupply.platform.state import process_start, write_state

@contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[AgentProcess]:
    """`serve --no-register --port 0` with the tiny model, ready."""
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", *args, env=env) as agent:
        agent.wait_ready()
        yield agent


def agent_url(agent: AgentProcess) -> str:
    return agent.base_url.removesuffix("/v1")


def status(env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict]:
    """`status` as a table and as JSON (the JSON parsed); at the configured port nothing listens."""
    env = {"VRAM_SUPPLY_PORT": str(free_port()), **(env or {})}
    as_json = run_cli("status", "--json", env=env)
    return run_cli("status", env={**env, "COLUMNS": "250"}), json.loads(as_json.stdout)


def finished_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def earlier_demo_record(pid: int, **fields: object) -> None:
    """What `serve --demo` leaves behind: deregistered from its in-process platform, long ago."""
    record = {
        "phase": Phase.deregistered, "platform_url": "http://127.0.0.1:40000", "model": "stories260k",
        "endpoint_url": "http://127.0.0.1:40001", "provider_id": "prov_demo", "message": "deregistered prov_demo",
        "pid": pid, "updated_at": time.time() - 3600, "local_url": "http://127.0.0.1:40001",
    }
    write_state(default_state_path(), RegistrationState.model_validate({**record, **fields}))


# status finds the agent that runs now


def test_status_finds_an_agent_serving_without_registering_on_any_port_not_an_old_demos_record() -> None:
    earlier_demo_record(finished_pid())
    with serving() as agent:
        table, report = status()

    assert table.returncode == 0, table.stdout
    assert report["agent"]["url"] == agent_url(agent) and report["agent"]["healthy"] is True
    registration = report["registration"]
    assert (registration["phase"], registration["current"], registration["pid"]) == ("not_registering", True, agent.process.pid)
    assert registration["local_url"] == agent_url(agent)
    assert "not_registering" in table.stdout and "not on the market" in table.stdout
    assert "earlier run" not in table.stdout and "prov_demo" not in table.stdout


def test_a_record_left_by_an_agent_that_ended_is_shown_as_from_an_earlier_run_even_once_deregistered() -> None:
    gone = finished_pid()
    earlier_demo_record(gone)
    table, report = status()

    assert table.returncode == 1
    assert report["registration"]["phase"] == "deregistered" and report["registration"]["current"] is False
    assert f"this record is from an earlier run: agent process {gone} has ended" in table.stdout
    assert report["agent"]["url"] != "http://127.0.0.1:40001", "not the dead agent's address"


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="process start times come from Linux's /proc")
def test_a_record_whose_pid_now_belongs_to_another_program_is_not_the_running_agents() -> None:
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    healthy = json.dumps({"status": "ok", "model": "someone-else"}).encode()
    try:
        with OneAnswerPlatform(200, healthy) as something:  # answers where the dead agent listened
            started = process_start(other.pid)
            assert started is not None
            earlier_demo_record(other.pid, phase=Phase.registered, process_start=started - 1, local_url=something.url)
            table, report = status()
    finally:
        other.kill()
        other.wait()

    assert table.returncode == 1, "the agent that wrote the record is not running"
    assert report["registration"]["current"] is False and report["agent"]["url"] != something.url
    assert f"agent process {other.pid} has ended (pid {other.pid} is another program now)" in table.stdout


def test_status_says_an_agent_is_starting_before_it_listens() -> None:
    earlier_demo_record(finished_pid())
    with socket.create_server(("127.0.0.1", 0)) as silent_hub:  # accepts, never answers: the download waits
        hub = {"HF_ENDPOINT": f"http://127.0.0.1:{silent_hub.getsockname()[1]}"}
        with AgentProcess("--model", "org/model", "--no-register", "--port", "0", env=hub) as agent:
            silent_hub.settimeout(60)
            asking, _ = silent_hub.accept()  # the agent asks the Hub: it is past its start, downloading
            with asking:
                table, report = status()

    assert table.returncode == 1
    assert report["agent"]["error"].startswith(f"agent process {agent.process.pid} is starting: not listening yet (downloading or preparing its model)")
    assert report["agent"]["error"].endswith("or it could not record where it listens (a full or read-only data dir: its log says so)")
    assert report["registration"]["current"] is False
    assert "from an earlier run" in table.stdout and "the starting agent replaces it once it listens" in table.stdout


def test_status_says_plainly_that_nothing_listens() -> None:
    port = free_port()
    table, report = status({"VRAM_SUPPLY_PORT": str(port)})

    assert table.returncode == 1
    assert report["agent"]["error"] == f"no agent answering at http://127.0.0.1:{port} (nothing is listening there: connection refused)"
    for internals in ("Cannot connect to host", "ssl:default", "Connect call failed"):
        assert internals not in table.stdout


def test_status_exits_3_while_the_agent_serves_but_the_platform_rejects_it() -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        market = {"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": "sk-not-the-platforms-key"}
        with AgentProcess("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, env=market) as agent:
            agent.wait_ready()
            agent.wait_for(lambda: getattr(read_state(default_state_path()), "phase", None) is Phase.rejected, "the rejection")
            table, report = status()

    assert table.returncode == 3, table.stdout
    assert report["agent"]["healthy"] is True and report["registration"]["phase"] == "rejected"
    assert "rejected" in table.stdout


# one agent per data dir


def test_a_second_agent_on_the_same_data_dir_is_refused_in_one_line_before_loading() -> None:
    with serving() as first:
        second = run_cli("serve", "--model", str(TINY_MODEL), "--no-register", "--port", "0", timeout=60)
        _, report = status()

    expected = (
        f"error: another vramsupply agent (pid {first.process.pid}) is serving from the data dir {data_dir()}; "
        "two agents must not share one"
    )
    assert second.returncode == 1 and second.stdout == "", "refused before the model loads"
    [line] = second.stderr.splitlines()
    assert line.startswith(expected), line
    assert "XDG_DATA_HOME=~/.local/share/agent2 vramsupply serve" in line
    assert report["agent"]["url"] == agent_url(first) and report["registration"]["pid"] == first.process.pid


def test_an_agent_from_before_the_lock_still_serving_is_named_not_taken_for_another_program() -> None:
    """An upgrade in place leaves the older agent serving until its restart; it takes no lock, and a
    `serve` beside it was told "another program listens there: choose another --port", which
    started a second agent on the same token, registration record and ledger."""
    older = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "vramsupply", "serve"], stdin=subprocess.PIPE)
    stranger = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "vramsupply", "status"], stdin=subprocess.PIPE)
    try:
        earlier_demo_record(older.pid, phase=Phase.registered, updated_at=time.time())  # records without a start time, as then
        refused = run_cli("serve", "--model", str(TINY_MODEL), "--no-register", "--port", "0", timeout=60)
        earlier_demo_record(stranger.pid, phase=Phase.registered, updated_at=time.time())  # a pid now some other command's
        with serving() as started:
            assert started.process.poll() is None
    finally:
        for process in (older, stranger):
            process.kill()
            process.wait()

    assert refused.returncode == 1 and refused.stdout == "", refused
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"error: an older vramsupply agent (pid {older.pid}, from before this check) is serving from the data dir {data_dir()}"), line


def test_the_demo_runs_beside_a_serving_agent_and_leaves_nothing_in_its_data_dir() -> None:
    """The demo kept its record and its bought answer in the provider's data dir: refused beside the
    provider's agent, and a row of its earnings."""
    with serving() as first:
        before = sorted(path.name for path in data_dir().iterdir())
        demo_until_its_answer()
        _, report = status()
        earnings = json.loads(run_cli("earnings", "--json").stdout)

    assert sorted(path.name for path in data_dir().iterdir()) == before
    assert report["registration"]["pid"] == first.process.pid, "the serving agent's record is untouched"
    assert earnings["requests"] == 0, earnings


def test_the_refusals_advice_runs_a_second_agent_on_a_data_dir_of_its_own(tmp_path: Path) -> None:
    own_dir = {"XDG_DATA_HOME": str(tmp_path / "agent2")}
    with serving() as first, serving(env=own_dir) as second:
        _, first_report = status()
        _, second_report = status(own_dir)

    assert first_report["agent"]["url"] == agent_url(first) and first_report["agent"]["healthy"] is True
    assert second_report["agent"]["url"] == agent_url(second) and second_report["agent"]["healthy"] is True


def test_a_killed_agent_leaves_no_lock_behind() -> None:
    with serving() as killed:
        killed.process.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL

    with serving() as next_one:
        assert lock_holder() == next_one.process.pid
        assert next_one.stop() == 0


def test_other_commands_run_beside_a_serving_agent() -> None:
    with serving():
        earnings = run_cli("earnings")
        platform = subprocess.Popen(
            [sys.executable, "-m", "vramsupply", "devplatform", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert platform.stdout is not None
            first_line = platform.stdout.readline()
        finally:
            platform.send_signal(signal.SIGINT)
            platform.communicate(timeout=30)

    assert earnings.returncode == 0, earnings.stderr
    assert first_line.startswith("reference platform listening on http://127.0.0.1:")
