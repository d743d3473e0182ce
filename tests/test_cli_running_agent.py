"""The commands a provider runs beside an agent that serves: they know it runs, and act on it.

An operations review ran them on a machine with a live agent: `bench` measured a machine the agent
shared without a word (and on a GPU would load a second copy of the model), `models rm --yes`
deleted the model the agent serves, a restart during the drain was told the first agent "is
serving", a SIGTERM in the first second of `serve` ended it with 143 and no word, `status` said
nothing of money, and run as the provider's own user `status` and `earnings` found nothing of an
agent that runs as the system service.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from agent_process import AgentProcess
from conftest import REPO, TINY_MODEL, run_cli
from fakehub import FakeHub, standard_repos
from live_platform import API_KEY, LivePlatform, free_port

from vramsupply.config import data_dir

SERVE_HERE = ("--model", str(TINY_MODEL), "--no-register", "--port", "0")
FAULT_AGENT = [sys.executable, str(REPO / "tests" / "fault_agent.py")]


def run_patched(patch: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI with one module attribute of this machine replaced (``patch``: Python run first)."""
    program = f"import sys\n{patch}\nfrom vramsupply.cli import main\nsys.argv[0] = 'vramsupply'\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "250", **(env or {})}, timeout=120
    )


def buy(base_url: str, token: str | None, answers: list[Any], max_tokens: int = 4) -> None:
    body = json.dumps({"model": "stories260k", "prompt": "Once upon a time", "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(base_url + "/completions", body, headers), timeout=120) as response:
            answers.append((response.status, json.load(response)))
    except OSError as error:
        answers.append((0, repr(error)))


# bench beside a serving agent


def test_bench_beside_a_serving_agent_says_in_one_line_before_measuring_that_the_agent_lowers_the_result() -> None:
    with AgentProcess(*SERVE_HERE) as agent:
        agent.wait_ready()
        bench = run_cli("bench", "--model", str(TINY_MODEL), "--parallel", "1", "--seconds", "3", env={"VRAM_SUPPLY_THREADS": "1"})

    assert bench.returncode == 0, bench.stderr
    lines = bench.stderr.splitlines()
    assert lines[0].startswith(f"warning: a vramsupply agent (pid {agent.process.pid}) is serving on this machine: "), bench.stderr
    assert "the result is lower than the machine can do" in lines[0]
    assert lines[1].startswith("bench: loading"), "said before measuring"


def test_bench_refuses_to_load_a_second_copy_on_the_gpu_beside_a_serving_agent_unless_told() -> None:
    gpu_build = "import vramsupply.gpu.devices as devices; devices.build_has_gpu_backend = lambda: True"
    with AgentProcess(*SERVE_HERE) as agent:
        agent.wait_ready()
        refused = run_patched(gpu_build, "bench", "--model", str(TINY_MODEL), "--seconds", "3")
        on_the_cpu = run_patched(gpu_build, "bench", "--model", str(TINY_MODEL), "--seconds", "3", env={"VRAM_SUPPLY_N_GPU_LAYERS": "0", "VRAM_SUPPLY_THREADS": "1", "VRAM_SUPPLY_PARALLEL": "1"})

    assert refused.returncode == 1 and refused.stdout == ""
    [line] = refused.stderr.splitlines()
    assert line.startswith(f"error: a vramsupply agent (pid {agent.process.pid}) is serving on this machine: a second copy of the model on the GPU")
    assert line.endswith("stop the agent first, or pass --beside-agent to measure anyway")
    assert on_the_cpu.returncode == 0, on_the_cpu.stderr  # no layer on the GPU: no second copy there, a warning only
    assert on_the_cpu.stderr.startswith("warning: a vramsupply agent"), on_the_cpu.stderr


# models rm and the model the agent serves


@pytest.fixture
def hub_env(tmp_path: Path) -> Any:
    with FakeHub(standard_repos()) as hub:
        yield {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}


def cached(env: dict[str, str]) -> list[str]:
    return sorted(item["model_id"] for item in json.loads(run_cli("models", "list", "--json", env=env).stdout))


def test_models_rm_keeps_the_model_the_running_agent_serves_unless_forced(hub_env: dict[str, str]) -> None:
    for model in ("acme/Widget-7B", "quantco/Splitty-GGUF"):
        assert run_cli("models", "pull", model, "--quant", "Q4_K_M", env=hub_env).returncode == 0
    with AgentProcess("--model", "acme/Widget-7B", "--quant", "Q4_K_M", "--no-register", "--port", "0", env=hub_env) as agent:
        agent.wait_ready()
        named = run_cli("models", "rm", "acme/Widget-7B-GGUF", "--yes", env=hub_env)
        everything = run_cli("models", "rm", "--all", "--yes", env=hub_env)
        left = cached(hub_env)
        forced = run_cli("models", "rm", "acme/widget-7b", "--yes", "--force", env=hub_env)

    pid = agent.process.pid
    assert named.returncode == 1 and named.stdout == ""
    [line] = named.stderr.splitlines()
    assert line.startswith(f"error: the running agent (pid {pid}) serves acme/widget-7b: removed, its next start would download it again"), line
    assert line.endswith("stop the agent first, or pass --force to remove it anyway")
    assert everything.returncode == 0, everything.stderr
    assert "removed quantco/splitty Q4_K_M" in everything.stdout and "acme/widget-7b" not in everything.stdout
    assert everything.stderr.strip() == (
        f"keeping acme/widget-7b: the running agent (pid {pid}) serves acme/widget-7b; --force removes it too, "
        "and then its next start would download it again (or could not start offline)"
    )
    assert left == ["acme/widget-7b"]
    assert forced.returncode == 0 and "removed acme/widget-7b Q4_K_M" in forced.stdout
    assert cached(hub_env) == []


# a second agent while the first drains


def test_a_second_agent_started_while_the_first_drains_is_told_to_wait_for_it(tmp_path: Path) -> None:
    trigger = tmp_path / "trigger"
    env = {"FAULT_AGENT_KIND": "stall_once", "FAULT_AGENT_TRIGGER": str(trigger), "FAULT_STALL_SECONDS": "120"}
    with AgentProcess(*SERVE_HERE, "--drain-timeout", "120", env=env, program=FAULT_AGENT) as first:
        first.wait_ready()
        trigger.touch()
        answers: list[Any] = []
        threading.Thread(target=buy, args=(first.base_url, None, answers), daemon=True).start()
        first.wait_for(lambda: "FAULT: stalling a decode" in first.log, "a request held in flight")
        first.send_signal(signal.SIGTERM)
        first.wait_for(lambda: "stopping: waiting up to 120s for 1 in-flight request(s)" in first.log, "the drain")
        second = run_cli(*("serve", *SERVE_HERE), timeout=60)

    assert second.returncode == 1 and second.stdout == ""
    [line] = second.stderr.splitlines()
    assert line.startswith(f"error: another vramsupply agent (pid {first.process.pid}) is stopping (draining in-flight requests) on the data dir {data_dir()}; wait for it to exit"), line


# a stop before serving started


def importing_the_command_line(pid: int) -> bool:
    """Whether process ``pid`` runs Python code of the command line: it has loaded pydantic's
    compiled core (Linux's /proc), which the interpreter's own start never does."""
    return "pydantic_core" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads what a process has loaded from Linux's /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_as_serve_starts_exits_0_with_one_line(sig: signal.Signals) -> None:
    serve = subprocess.Popen([sys.executable, "-m", "vramsupply", "serve", *SERVE_HERE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while serve.poll() is None and not importing_the_command_line(serve.pid):
            time.sleep(0.001)
        serve.send_signal(sig)  # at once: the command line is still importing, long before serve's own handling
        out, err = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert (serve.returncode, out) == (0, ""), err
    assert err.splitlines() == [f"{sig.name} received: stopped before serving started"]


def sigterm_handled(pid: int) -> bool:
    """Whether process ``pid`` has a handler of its own for SIGTERM (Linux's /proc: its SigCgt mask)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def sigterm_after(seconds: float | None) -> tuple[subprocess.Popen[str], bool]:
    """`serve` sent SIGTERM ``seconds`` after it was spawned (None: the moment it handles SIGTERM);
    whether a handler of its own was ever seen in place before the signal."""
    serve = subprocess.Popen([sys.executable, "-m", "vramsupply", "serve", *SERVE_HERE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    handled = False
    deadline = time.monotonic() + (60 if seconds is None else seconds)
    while time.monotonic() < deadline and not (seconds is None and handled):
        handled = handled or sigterm_handled(serve.pid)
        time.sleep(0.001)
    serve.send_signal(signal.SIGTERM)
    return serve, handled


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's signal handlers from Linux's /proc")
@pytest.mark.parametrize("seconds", [0.0, 0.02, 0.05, 0.1, None], ids=["at once", "20 ms", "50 ms", "100 ms", "once handled"])
def test_a_sigterm_in_the_first_moments_of_serve_exits_0_unless_python_ran_none_of_it_yet(seconds: float | None) -> None:
    """What a stop of a service just started meets. While the interpreter starts, before it runs any
    code of vramsupply (10 to 20 ms), nothing can catch the signal, which ends the process: systemd
    counts that as a clean stop (README), a shell says 143. From the first line of ours on
    (``__main__``), SIGTERM exits 0 with one line, whenever it lands."""
    serve, handled = sigterm_after(seconds)
    try:
        out, err = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert "Traceback" not in err, err
    if serve.returncode == -signal.SIGTERM:
        assert seconds is not None and not handled and (out, err) == ("", ""), "ended by the signal only before any code of ours ran"
    elif seconds is None or "SIGTERM received: stopping" not in err:  # not yet serve's own handling, which logs
        assert (serve.returncode, out, err) == (0, "", "SIGTERM received: stopped before serving started\n")
    else:
        assert serve.returncode == 0, err


# what status says of money, and of the system service


def test_status_shows_the_prices_in_force_and_the_last_24_hours_from_the_ledger() -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    market = {"VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2"}
    with LivePlatform() as platform:
        market["VRAM_SUPPLY_PLATFORM_URL"] = platform.url
        args = ("--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint, "--output-price", "300", "--input-price", "150")
        with AgentProcess(*args, env=market) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            answers: list[Any] = []
            buy(endpoint + "/v1", platform.providers[0].offer.endpoint_token, answers)
            as_json = run_cli("status", "--json")
            table = run_cli("status", env={"COLUMNS": "250"})

    [(code, answer)] = answers
    assert code == 200, answer
    assert as_json.returncode == table.returncode == 0, table.stdout
    earnings = json.loads(as_json.stdout)["earnings"]
    assert earnings["prices"]["output_price"] == 300
    # the input price the agent was started with (a flag), not the configured default
    assert earnings["prices"]["input_price"] == 150 and earnings["prices"]["input_price_from"] == "agent"
    day = earnings["last_24h"]
    assert day["requests"] == 1 and day["completion_tokens"] == answer["usage"]["completion_tokens"] and day["earned_nanocents"] > 0
    assert "per million tokens: output $3.00 (you earn $2.85)" in table.stdout
    assert "1 request, " in table.stdout and "earned $0.0" in table.stdout


SERVICE_HOME = """
import pathlib
home = pathlib.Path(sys.argv.pop(1))
try:
    import vramsupply.cli.local_agent as agent
    agent.SERVICE_DATA_HOME = home
except ImportError:  # a version that knows no service data: it runs as it is
    pass
"""


def test_status_and_earnings_say_where_the_system_services_data_is_when_the_users_own_holds_nothing(tmp_path: Path) -> None:
    service_home = tmp_path / "var-lib-vramsupply"
    (service_home / "vramsupply").mkdir(parents=True)
    port = {"VRAM_SUPPLY_PORT": str(free_port())}
    table = run_patched(SERVICE_HOME, str(service_home), "status", env=port)
    as_json = run_patched(SERVICE_HOME, str(service_home), "status", "--json", env=port)
    earnings = run_patched(SERVICE_HOME, str(service_home), "earnings")
    earnings_json = run_patched(SERVICE_HOME, str(service_home), "earnings", "--json")
    no_service = run_patched(SERVICE_HOME, str(tmp_path / "absent"), "status", env=port)

    reading = f"sudo -u vramsupply env XDG_DATA_HOME={service_home} vramsupply"
    assert table.returncode == as_json.returncode == 1, "exit codes unchanged: no agent serves here"
    assert f"the system service keeps its data in {service_home / 'vramsupply'}: read it with `{reading} status`" in table.stdout.replace("\n", "")
    assert json.loads(as_json.stdout)["service"] == {"data_dir": str(service_home / "vramsupply"), "command": f"{reading} status"}
    assert earnings.returncode == 0 and f"read it with `{reading} earnings`" in earnings.stdout.replace("\n", "")
    assert json.loads(earnings_json.stdout)["service"]["command"] == f"{reading} earnings"
    assert "system service" not in no_service.stdout
