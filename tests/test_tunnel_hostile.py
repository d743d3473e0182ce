"""`serve --tunnel cloudflared` against a cloudflared that misbehaves.

Each test puts a small, named test double of cloudflared on PATH (a Python script written into
the test's folder): one that records the signals it gets, one that ignores SIGTERM, a wrapper
that leaves a child holding its output and exits, one that fails with a reason, one that never
prints a URL, one that prints terminal control sequences. The real TunnelSupervisor (or a real
`serve`) runs it; what is checked are real processes: each run records its pid (and its child's)
and a test asserts they are gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli

from vramsupply.tunnel import tunnel_tool
from vramsupply.tunnel.supervisor import TunnelSupervisor

PRELUDE = '''
import json, os, signal, subprocess, sys, time
STATE = os.environ["HOSTILE_DOUBLE_DIR"]
STARTS = os.path.join(STATE, "starts.jsonl")
RUN = (len(open(STARTS).read().splitlines()) if os.path.exists(STARTS) else 0) + 1
URL = f"https://hostile-{RUN}-{os.getpid()}.trycloudflare.com"

def record(**fields):
    with open(STARTS, "a") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "run": RUN, "url": URL, **fields}) + "\\n")

def say(line):
    sys.stderr.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ") + line + "\\n")
    sys.stderr.flush()

def box():
    say("INF +--------------------------------------------------------------+")
    say("INF |  Your quick Tunnel has been created! Visit it at:            |")
    say(f"INF |  {URL}     |")
    say("INF +--------------------------------------------------------------+")

def noted(sig, frame):
    with open(os.path.join(STATE, "signals"), "a") as fh:
        fh.write(signal.Signals(sig).name + "\\n")

def forever():
    while True:
        time.sleep(3600)
'''

RECORDS_SIGNALS = '''
def leave(sig, frame):  # as cloudflared does on SIGINT or SIGTERM: it shuts down
    noted(sig, frame)
    sys.exit(0)
signal.signal(signal.SIGINT, leave)
signal.signal(signal.SIGTERM, leave)
record()
box()
forever()
'''

IGNORES_SIGTERM = '''
signal.signal(signal.SIGTERM, noted)  # noted, and otherwise ignored
record()
box()
forever()
'''

LEAVES_A_CHILD_AND_EXITS = '''
# A wrapper: its child inherits stdout and stderr (the supervisor's pipe) and ignores SIGTERM.
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
record(child=child.pid)
box()
if RUN == 1:
    sys.exit(1)  # the wrapper is gone; its child still holds the pipe open
forever()
'''

FAILS_WITH_A_REASON = '''
record()
say("INF Requesting new quick Tunnel on trycloudflare.com...")
say("\\x1b[31mERR failed to request quick Tunnel: 429 Too Many Requests\\x1b[0m")
say("INF +------------------+")
sys.exit(1)
'''

NEVER_PRINTS_A_URL = '''
record()
say("INF Requesting new quick Tunnel on trycloudflare.com...")
say('ERR failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel": dial tcp: i/o timeout ' + "x" * 1000)
forever()
'''

PRINTS_CONTROL_CHARACTERS = '''
record()
say("INF \\x1b]0;owned\\x07 title set, \\x1b[2J screen cleared, a NUL \\x00 here")
box()
forever()
'''


@pytest.fixture
def cloudflared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Put a test double named `cloudflared`, running ``behaviour`` after PRELUDE, first on PATH; returns its record folder."""

    def install(behaviour: str) -> Path:
        bin_dir, state = tmp_path / "bin", tmp_path / "double"
        bin_dir.mkdir()
        state.mkdir()
        script = bin_dir / "cloudflared"
        script.write_text(f"#!{sys.executable}\n{PRELUDE}\n{behaviour}")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("HOSTILE_DOUBLE_DIR", str(state))
        return state

    return install


@pytest.fixture(autouse=True)
def no_double_left(tmp_path: Path) -> Iterator[None]:
    """Whatever a test (or the code before its fix) leaves running is killed after it."""
    yield
    for pid in every_pid(tmp_path / "double"):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def starts(state: Path) -> list[dict[str, object]]:
    path = state / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def every_pid(state: Path) -> list[int]:
    return [int(pid) for run in starts(state) for pid in (run["pid"], run.get("child")) if pid is not None]


def signals(state: Path) -> list[str]:
    path = state / "signals"
    return path.read_text().split() if path.exists() else []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited; only its parent has not reaped it yet
            return fh.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_until_gone(pids: list[int], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while left := [pid for pid in pids if alive(pid)]:
        assert time.monotonic() < deadline, f"{what}: {left} still running"
        time.sleep(0.05)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: never happened"
        await asyncio.sleep(0.05)


def supervisor(urls: list[str], **options: object) -> TunnelSupervisor:
    return TunnelSupervisor(tunnel_tool("cloudflared"), "http://127.0.0.1:9", urls.append, **options)  # type: ignore[arg-type]


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vramsupply.tunnel" and r.levelno == logging.WARNING and text in r.getMessage()]


# A terminal's Ctrl-C reaches its whole foreground process group: the agent runs in a session of
# its own here, as it would in a terminal, and the test sends SIGINT to that group.
IN_A_TERMINAL = [sys.executable, "-c", "import os, sys; os.setsid(); os.execv(sys.executable, [sys.executable, '-m', 'vramsupply', *sys.argv[1:]])"]


def test_ctrl_c_in_a_terminal_leaves_the_tunnel_up_until_the_agent_itself_stops_it(cloudflared: Callable[[str], Path]) -> None:
    state = cloudflared(RECORDS_SIGNALS)
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", "--tunnel", "cloudflared", program=IN_A_TERMINAL) as agent:
        agent.wait_for(lambda: agent.printed("public URL (cloudflared tunnel): https://hostile-1-"), "the tunnel's URL")
        os.killpg(agent.process.pid, signal.SIGINT)  # Ctrl-C
        assert agent.wait() == 0
    [run] = starts(state)
    assert signals(state) == ["SIGTERM"], "only the agent's own stop reached cloudflared, not the terminal's Ctrl-C"
    assert "cloudflared exited" not in agent.log, "not restarted while the agent drained"
    wait_until_gone([int(run["pid"])], "cloudflared after the agent stopped")


def test_a_second_signal_kills_a_cloudflared_that_ignores_sigterm(cloudflared: Callable[[str], Path]) -> None:
    state = cloudflared(IGNORES_SIGTERM)
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", "--tunnel", "cloudflared") as agent:
        agent.wait_for(lambda: agent.printed("public URL (cloudflared tunnel): https://hostile-1-"), "the tunnel's URL")
        agent.send_signal(signal.SIGTERM)
        agent.wait_for(lambda: signals(state) == ["SIGTERM"], "the agent asking cloudflared to stop")
        agent.send_signal(signal.SIGTERM)  # "stop now", while the agent waits for cloudflared
        agent.wait()
    [run] = starts(state)
    wait_until_gone([int(run["pid"])], "a cloudflared that ignores SIGTERM, after the agent stopped at once")
    assert "Traceback" not in agent.log


def test_a_killed_agent_takes_down_even_a_cloudflared_that_ignores_sigterm(cloudflared: Callable[[str], Path]) -> None:
    state = cloudflared(IGNORES_SIGTERM)
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", "--tunnel", "cloudflared") as agent:
        agent.wait_for(lambda: agent.printed("public URL (cloudflared tunnel): https://hostile-1-"), "the tunnel's URL")
        agent.process.send_signal(signal.SIGKILL)  # the OOM killer, kill -9: no stop of its own
        agent.wait()
    [run] = starts(state)
    wait_until_gone([int(run["pid"])], "a cloudflared that ignores SIGTERM, after its agent was killed")


async def test_stop_cancelled_during_its_grace_period_kills_the_tool_at_once(cloudflared: Callable[[str], Path]) -> None:
    state = cloudflared(IGNORES_SIGTERM)
    urls: list[str] = []
    tunnel = supervisor(urls)
    tunnel.start()
    await wait_until(lambda: bool(urls), "the URL")
    stopping = asyncio.create_task(tunnel.stop())
    await wait_until(lambda: signals(state) == ["SIGTERM"], "SIGTERM sent")
    stopping.cancel()  # "stop now"
    with pytest.raises(asyncio.CancelledError):
        await stopping
    [run] = starts(state)
    wait_until_gone([int(run["pid"])], "a cloudflared that ignores SIGTERM, once its stop was cancelled")


async def test_a_wrapper_that_exits_leaving_a_child_is_restarted_and_nothing_is_left_behind(cloudflared: Callable[[str], Path]) -> None:
    """Its child holds the output pipe open: the exit is still seen, and every process goes."""
    state = cloudflared(LEAVES_A_CHILD_AND_EXITS)
    urls: list[str] = []
    tunnel = supervisor(urls, delays=(0.05,))
    tunnel.start()
    try:
        await wait_until(lambda: len(urls) == 2, "a second run after the first exited")
        wait_until_gone([int(starts(state)[0]["child"])], "the first run's child, once it had exited")
    finally:
        await tunnel.stop()
    first, second = starts(state)
    assert urls == [first["url"], second["url"]]
    wait_until_gone(every_pid(state), "the tunnel's processes after stop")


async def test_why_cloudflared_failed_is_in_the_warning_that_it_exited(cloudflared: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    cloudflared(FAILS_WITH_A_REASON)
    tunnel = supervisor([], delays=(30.0,))
    tunnel.start()
    try:
        await wait_until(lambda: warnings(caplog, "cloudflared exited"), "the warning")
    finally:
        await tunnel.stop()
    [warning] = warnings(caplog, "cloudflared exited")
    assert "code 1" in warning and "restarting it in 30s" in warning
    assert '"\\x1b[31mERR failed to request quick Tunnel: 429 Too Many Requests\\x1b[0m"' in warning, "its last meaningful line, escaped"
    assert "\x1b" not in warning


async def test_a_cloudflared_that_prints_no_url_is_warned_about_with_its_last_line(cloudflared: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    state = cloudflared(NEVER_PRINTS_A_URL)
    tunnel = supervisor([], url_warning_after=0.2)
    tunnel.start()
    try:
        await wait_until(lambda: warnings(caplog, "no public URL"), "the warning")
    finally:
        await tunnel.stop()
    [warning] = warnings(caplog, "no public URL")
    assert 'its last line: "ERR failed to request quick Tunnel: Post "https://api.trycloudflare.com/tunnel": dial tcp: i/o timeout' in warning
    assert len(warning) < 400, "the line is cut"
    wait_until_gone(every_pid(state), "cloudflared after stop")


async def test_control_characters_cloudflared_prints_are_escaped_in_the_debug_log(cloudflared: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    cloudflared(PRINTS_CONTROL_CHARACTERS)
    caplog.set_level(logging.DEBUG, logger="vramsupply.tunnel")
    urls: list[str] = []
    tunnel = supervisor(urls)
    tunnel.start()
    try:
        await wait_until(lambda: bool(urls), "the URL")
    finally:
        await tunnel.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "vramsupply.tunnel"]
    raw = [ascii(m) for m in messages if any(ord(c) < 0x20 or ord(c) == 0x7F for c in m)]
    assert not raw, f"control characters reached the log: {raw}"
    assert any("\\x1b]0;owned\\x07 title set, \\x1b[2J screen cleared, a NUL \\x00 here" in m for m in messages), [ascii(m) for m in messages]


@pytest.mark.parametrize(
    "line",
    [
        "https://foo.trycloudflare.com.evil.example",
        "https://foo.trycloudflare.com-evil.example",
        "https://foo.trycloudflare.com@evil.example",
        "https://foo.trycloudflare.com%2eevil.example",
        "https://foo.trycloudflare.com\u3002evil.example",
        "https://foo.trycloudflare.com:8443",
        "https://foo.trycloudflare.comx",
    ],
)
def test_a_longer_host_or_a_port_after_a_trycloudflare_name_is_not_its_url(line: str) -> None:
    assert tunnel_tool("cloudflared").public_url(f"INF |  {line}   |") is None


def test_a_quick_tunnel_url_still_ends_at_a_space_a_path_a_quote_or_the_line_end() -> None:
    tool = tunnel_tool("cloudflared")
    for line in ("|  https://a-b.trycloudflare.com   |", "https://a-b.trycloudflare.com", "https://a-b.trycloudflare.com/", 'url="https://a-b.trycloudflare.com"'):
        assert tool.public_url(line) == "https://a-b.trycloudflare.com", line


async def test_what_goes_wrong_with_the_tunnel_is_handed_on_until_a_url_comes(cloudflared: Callable[[str], Path]) -> None:
    """For /health's warnings, which `vramsupply status` shows: a provider behind NAT is on the
    market only through the tunnel. No URL ever came, so none "will change"."""
    cloudflared(FAILS_WITH_A_REASON)
    troubles: list[str | None] = []
    tunnel = TunnelSupervisor(tunnel_tool("cloudflared"), "http://127.0.0.1:9", [].append, on_trouble=troubles.append, delays=(30.0,))
    tunnel.start()
    try:
        await wait_until(lambda: bool(troubles), "the trouble handed on")
    finally:
        await tunnel.stop()
    [trouble] = troubles
    assert trouble is not None and "cloudflared exited (code 1)" in trouble and "429 Too Many Requests" in trouble
    assert "restarting it in 30s" in trouble and "URL will change" not in trouble


def test_a_failing_tunnel_is_a_health_warning_that_status_shows(cloudflared: Callable[[str], Path]) -> None:
    """With --no-register the tunnel still makes the agent public: `status` shows where (the URL
    was only in the log). A tunnel that keeps failing is a /health warning while it lasts."""
    cloudflared(FAILS_WITH_A_REASON)
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--tunnel", "cloudflared", "--no-register") as agent:
        agent.wait_ready()
        agent.wait_for(lambda: "cloudflared exited" in agent.log, "the tunnel's failure")
        health = json.loads(run_cli("status", "--json").stdout)["agent"]["health"]
        assert agent.stop(signal.SIGTERM) == 0
    assert any("cloudflared exited (code 1)" in warning and "429 Too Many Requests" in warning for warning in health["warnings"])
    assert health["status"] == "ok"


def test_without_registering_status_shows_the_tunnels_public_url(cloudflared: Callable[[str], Path]) -> None:
    state = cloudflared(RECORDS_SIGNALS)
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--tunnel", "cloudflared", "--no-register") as agent:
        agent.wait_for(lambda: agent.printed("public URL (cloudflared tunnel)"), "the public URL")
        [start] = starts(state)
        shown = json.loads(run_cli("status", "--json").stdout)
        assert agent.stop(signal.SIGTERM) == 0
    assert shown["registration"]["endpoint_url"] == start["url"]
    assert f"public at {start['url']}/v1 through the cloudflared tunnel" in shown["registration"]["message"]
    assert not shown["agent"]["health"].get("warnings")
