"""A second Ctrl-C or SIGTERM stops `serve --engine vllm` at once, even with an engine deaf to SIGTERM.

A provider whose vLLM hangs in a CUDA call presses Ctrl-C, waits, and presses it again. The agent
said "stopping without waiting", then waited the engine's whole stop timeout (30 s) anyway and
exited 0, as if the stop had gone to plan: the wait for the engine swallowed the second signal.
Now the engine's process group is killed at once and the agent exits 130 with the one line a
stop-now gets on the llama.cpp engine. The engine is `tests/doubles/fake_engine.py` told to ignore
SIGTERM and SIGINT, or a shell that ignores them and never gets ready.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from agent_process import AgentProcess
from llama_cpp_upstream import FAKE_ENGINE
from test_engine_launch import alive, double_env, starts

STOP_TIMEOUT = 30.0
"""The engine's stop timeout the agent used to wait out: every exit here comes well within it."""


def stop_twice(agent: AgentProcess, first_said: str) -> tuple[int, float]:
    """SIGTERM, and once the agent says it is stopping, SIGTERM again: its exit code and how long it took."""
    agent.send_signal(signal.SIGTERM)
    agent.wait_for(lambda: first_said in agent.log, "the first signal's line")
    began = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    return agent.wait(timeout=STOP_TIMEOUT + 15), time.monotonic() - began


def test_a_second_sigterm_kills_a_ready_engine_that_ignores_sigterm_and_exits_130(tmp_path: Path) -> None:
    agent = AgentProcess(
        "--engine", "vllm", "--model", "Org/Tiny-Model", "--engine-command", f"{sys.executable} {FAKE_ENGINE} vllm serve",
        "--port", "0", "--no-register", env=double_env(tmp_path, FAKE_ENGINE_IGNORE_STOP="1"),
    )  # fmt: skip
    try:
        agent.wait_ready(timeout=120)
        engine = int(starts(tmp_path)[0]["pid"])  # type: ignore[call-overload]
        code, took = stop_twice(agent, "SIGTERM received: finishing in-flight requests")
    finally:
        agent.kill()
    assert code == 130 and took < STOP_TIMEOUT / 2, (code, took, agent.log)
    assert "SIGTERM received again: stopping without waiting" in agent.log
    assert "error: stopped at once, with no request in flight" in agent.output  # none was sent
    assert not alive(engine), "the engine was killed, not left behind"
    assert "Traceback" not in agent.output


def test_a_second_sigterm_while_a_deaf_engine_is_still_starting_exits_130_at_once(tmp_path: Path) -> None:
    pid_file = tmp_path / "engine.pid"
    never_ready = f"sh -c 'trap \"\" TERM INT; echo $$ > {pid_file}; exec sleep 300'"
    agent = AgentProcess(
        "--engine", "vllm", "--model", "Org/Tiny-Model", "--engine-command", never_ready, "--port", "0", "--no-register",
    )  # fmt: skip
    try:
        agent.wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the engine's start")
        engine = int(pid_file.read_text())
        code, took = stop_twice(agent, "SIGTERM received")
    finally:
        agent.kill()
    assert code == 130 and took < STOP_TIMEOUT / 2, (code, took, agent.log)
    assert "error: stopped before the engine was ready" in agent.output
    assert not alive(engine), "the engine was killed, not left behind"
    assert "Traceback" not in agent.output


def test_a_helper_the_engine_started_in_its_own_session_holding_its_output_does_not_hold_the_stop(tmp_path: Path) -> None:
    """The engine's process group gets the signals; a process it started with ``setsid`` is outside
    it, and kept the output pipe open: the agent read it to its end, and never stopped."""
    helper = tmp_path / "helper.pid"
    wrapper = tmp_path / "engine.sh"
    wrapper.write_text(f'#!/bin/sh\nsetsid sleep 300 &\necho $! > {helper}\nexec {sys.executable} {FAKE_ENGINE} "$@"\n')
    wrapper.chmod(0o755)
    agent = AgentProcess(
        "--engine", "vllm", "--model", "Org/Tiny-Model", "--engine-command", f"{wrapper} vllm serve", "--port", "0", "--no-register",
        env=double_env(tmp_path),
    )  # fmt: skip
    try:
        agent.wait_ready(timeout=120)
        began = time.monotonic()
        code = agent.stop(signal.SIGTERM, timeout=40)
        took = time.monotonic() - began
    finally:
        agent.kill()
        holder = int(helper.read_text())
        if alive(holder):
            os.kill(holder, signal.SIGKILL)
    assert code == 0 and took < 20, (code, took, agent.log[-2000:])
    assert "vllm exited, but a process it started still holds its output open: not reading it any more" in agent.log


def test_a_second_sigterm_while_the_engine_loads_leaves_no_unclosed_connection_in_the_log(tmp_path: Path) -> None:
    failing = tmp_path / "health-fails"
    failing.touch()  # /health answers 500: the agent's probes keep asking, on open connections
    agent = AgentProcess(
        "--engine", "vllm", "--model", "Org/Tiny-Model", "--engine-command", f"{sys.executable} {FAKE_ENGINE} vllm serve",
        "--port", "0", "--no-register", env=double_env(tmp_path, FAKE_ENGINE_FAIL_HEALTH=str(failing), FAKE_ENGINE_IGNORE_STOP="1"),
    )  # fmt: skip
    try:
        agent.wait_for(lambda: "upstream not ready" in agent.log, "a probe of the loading engine")
        time.sleep(1)
        code, _ = stop_twice(agent, "SIGTERM received")
    finally:
        agent.kill()
    assert code == 130, agent.log
    assert "Unclosed" not in agent.log and " ERROR " not in agent.log, agent.log[-2000:]
