"""A provider chooses how far the decode gives way: ``--decode-nice`` / ``VRAM_SUPPLY_DECODE_NICE``.

The decode ran 10 nice levels below the agent with no way to change it, and beside busy programs at
normal priority in its scheduling group (a desktop) it got about a tenth of a core: two busy loops
beside two engine-heavy test files took 130.7 s with the offset and 33.1 s without. 0 now keeps the
decode at the agent's own priority, as llama-server's ``--prio`` lets its user choose.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from dotenv import dotenv_values
from test_settings_finite import refused

from vramsupply.engine.priority import MAX_NICE, lower_compute_priority

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="only Linux keeps a nice value per thread")

SERVE = ("--model", str(TINY_MODEL), "--no-register", "--port", "0")


def setpriority_allowed() -> bool:
    result: list[int | None] = []
    thread = threading.Thread(target=lambda: result.append(lower_compute_priority(1)))
    thread.start()
    thread.join()
    return result[0] is not None


def nice_values(pid: int) -> set[int]:
    """The nice value of each thread of process ``pid``."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            values.add(os.getpriority(os.PRIO_PROCESS, int(task.name)))
        except OSError:  # the thread ended meanwhile
            pass
    return values


def answered(agent: AgentProcess) -> None:
    """One completion, so the scheduler thread has surely set its priority."""
    body = json.dumps({"model": agent.model_id, "prompt": "Once upon a time", "max_tokens": 4}).encode()
    request = urllib.request.Request(agent.base_url + "/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("args", "env", "offset"),
    [
        (("--decode-nice", "0"), {}, 0),
        ((), {"VRAM_SUPPLY_DECODE_NICE": "0"}, 0),
        (("--decode-nice", "4"), {}, 4),
        ((), None, 10),  # the default: the variable unset
    ],
    ids=["flag-0", "env-0", "flag-4", "default"],
)
def test_serve_runs_the_decode_that_many_nice_levels_below_the_agent(
    args: tuple[str, ...], env: dict[str, str] | None, offset: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not setpriority_allowed():
        pytest.skip("the kernel refuses setpriority here")
    if env is None:
        monkeypatch.delenv("VRAM_SUPPLY_DECODE_NICE")  # the suite sets 0 (conftest.isolated_env)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # the child starts at this thread's nice
    with AgentProcess(*SERVE, *args, env=env) as agent:
        agent.wait_ready()
        answered(agent)
        assert nice_values(agent.process.pid) == {base, min(base + offset, MAX_NICE)}
        assert agent.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "origin", "why"),
    [
        (("--decode-nice", "20"), {}, "flag --decode-nice", "less than or equal to 19"),
        ((), {"VRAM_SUPPLY_DECODE_NICE": "-1"}, "env VRAM_SUPPLY_DECODE_NICE", "greater than or equal to 0"),
        ((), {"VRAM_SUPPLY_DECODE_NICE": "x"}, "env VRAM_SUPPLY_DECODE_NICE", "valid integer"),
    ],
)
def test_serve_refuses_a_decode_nice_out_of_range_in_one_line(args: tuple[str, ...], env: dict[str, str], origin: str, why: str) -> None:
    result = run_cli("serve", *SERVE, *args, env=env)
    line = refused(result.stderr, result.returncode)
    assert line.startswith("error: invalid decode_nice = ") and f"(from {origin})" in line and why in line


def test_bench_refuses_a_decode_nice_out_of_range_and_records_the_one_it_ran_with() -> None:
    result = run_cli("bench", "--model", str(TINY_MODEL), "--seconds", "3", "--decode-nice", "20")
    line = refused(result.stderr, result.returncode)
    assert line.startswith("error: invalid decode_nice = 20 (from flag --decode-nice)") and "less than or equal to 19" in line
    measured = run_cli("bench", "--model", str(TINY_MODEL), "--parallel", "1", "--seconds", "3", "--decode-nice", "2", "--json", env={"VRAM_SUPPLY_THREADS": "1"})
    assert measured.returncode == 0, measured.stderr
    assert json.loads(measured.stdout)["settings"]["decode_nice"] == 2  # recorded with the settings that change the speed


def test_config_show_and_the_service_env_file_carry_decode_nice(tmp_path: Path) -> None:
    shown = run_cli("config", "show", "--json", env={"VRAM_SUPPLY_DECODE_NICE": "3"})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["decode_nice"] == {"value": "3", "source": "env VRAM_SUPPLY_DECODE_NICE"}
    env_file = tmp_path / "service.env"
    installed = run_cli(
        "service", "install", "--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
        env={"PATH": str(tmp_path), "VRAM_SUPPLY_MODEL": "qwen/qwen3.5-9b", "VRAM_SUPPLY_DECODE_NICE": "0"},
    )
    assert installed.returncode == 0, installed.stderr
    assert dotenv_values(env_file)["VRAM_SUPPLY_DECODE_NICE"] == "0"
