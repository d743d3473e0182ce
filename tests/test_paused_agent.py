"""A paused agent is not a stalled engine: ``kill -STOP``/``-CONT``, ``docker pause`` or a debugger
freeze every thread while the monotonic clock runs on. Once resumed, the agent keeps serving
(before, its engine watch saw a long wait with a request pending and stopped the agent, so that
systemd reloaded a healthy model); a decode that never returns is still a stall
(``engine/liveness.py``).

The agent is the real command line with one fault: its first decode after a trigger file exists
takes ``STEP_SECONDS`` (``tests/fault_agent.py``), a long prompt chunk of a big model on a CPU,
so the request is certainly inside a step when the process is frozen, and still in it when the
process resumes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from agent_process import AgentProcess
from conftest import REPO, TINY_MODEL
from test_liveness import PROMPT

from vramsupply.engine import Engine, EngineOptions
from vramsupply.engine.types import EngineError

FAULT_AGENT = [sys.executable, str(REPO / "tests" / "fault_agent.py")]
STALLING = "FAULT: stalling a decode"
PAUSE_THREAD = "vramsupply-pause-clock"

STALL_TIMEOUT = 4
PAUSED_SECONDS = 6
STEP_SECONDS = 7.5
"""The stuck step outlasts the pause by 1.5 s: that much of it runs after the resume (the old code's
engine watch saw the stall then), while what is not frozen of it (1.5 s, and up to one second more
that the pause clock cannot place) stays well under ``STALL_TIMEOUT``."""


# ---- the stall clock, driven by hand -------------------------------------------------------------


class Clocks:
    """A monotonic clock the test moves, a pause clock on it that nothing drives but the test, and
    the liveness of an engine with a request pending since time 0."""

    def __init__(self, stall_timeout: float = 10) -> None:
        from vramsupply.engine.liveness import Liveness, PauseClock

        self.now = 0.0
        self.pauses = PauseClock(lambda: self.now)
        self.liveness = Liveness(stall_timeout, lambda: self.now, self.pauses)
        self.pauses.watching()

    def run(self, seconds: int) -> None:
        """The process runs on for ``seconds``: its pause thread wakes every second, on time."""
        for _ in range(seconds):
            self.now += 1.0
            assert self.pauses.woke() == 0.0

    def freeze(self, seconds: float) -> None:
        """Nothing in the process runs for ``seconds`` (the pause thread has not woken since)."""
        self.now += seconds

    def failure(self) -> str | None:
        return self.liveness.failure(pending=True, running=True)


def test_a_freeze_longer_than_the_stall_timeout_with_a_request_pending_is_no_stall() -> None:
    clocks = Clocks(stall_timeout=10)
    clocks.liveness.progressed()  # a request arrives
    clocks.run(3)
    clocks.freeze(30)
    assert clocks.failure() is None  # a reader that runs before the pause thread does after the resume
    assert clocks.pauses.woke() == 29.0  # the freeze began somewhere in the last second's wait: 29 s of it are sure
    assert clocks.failure() is None


def test_a_decode_that_never_returns_is_still_a_stall_and_says_so_as_before() -> None:
    clocks = Clocks(stall_timeout=10)
    clocks.liveness.progressed()
    clocks.run(10)
    assert clocks.failure() is None
    clocks.run(1)
    assert clocks.failure() == "the inference engine stalled: no decode step finished for 11s with requests pending (stall timeout 10s)"


def test_a_stall_after_a_freeze_is_found_once_its_own_time_passes() -> None:
    clocks = Clocks(stall_timeout=10)
    clocks.freeze(100)  # while idle: the freeze gives no credit to the request that comes next
    assert clocks.pauses.woke() == 99.0
    clocks.liveness.progressed()
    clocks.run(3)
    clocks.freeze(20)  # during the request: 19 s of it are not counted, the second it began in is
    assert clocks.pauses.woke() == 19.0
    clocks.run(6)
    assert clocks.failure() is None
    clocks.run(1)
    assert clocks.failure() == "the inference engine stalled: no decode step finished for 11s with requests pending (stall timeout 10s)"


# ---- the pause thread's life ---------------------------------------------------------------------


OPTIONS = EngineOptions(model_path=TINY_MODEL, n_ctx=128, parallel=2, threads=1)


def pause_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in set(threading.enumerate()) - before if t.name == PAUSE_THREAD]


def test_the_pause_thread_runs_while_the_engine_serves_and_ends_with_it() -> None:
    before = set(threading.enumerate())
    with Engine.load(OPTIONS):
        started = pause_threads(before)
        assert len(started) == 1
    assert not any(thread.is_alive() for thread in started)


def test_an_engine_whose_warm_up_fails_starts_no_pause_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda ctx, batch: -3)
    before = set(threading.enumerate())
    with pytest.raises(EngineError):
        Engine.load(OPTIONS)
    assert pause_threads(before) == []


# ---- the real agent, paused ----------------------------------------------------------------------


def ask(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any] | str]:
    """GET (or POST ``body`` to) ``url``: the status and the JSON answer, or (0, why) without one."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
    except (OSError, ValueError) as error:
        return 0, repr(error)


def ok(health: tuple[int, dict[str, Any] | str]) -> bool:
    status, answer = health
    return status == 200 and isinstance(answer, dict) and answer.get("status") == "ok"


def state(pid: int) -> str:
    """The process's state letter in /proc: "T" while stopped."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def pause(agent: AgentProcess, seconds: float) -> None:
    """SIGSTOP the agent, keep it stopped ``seconds``, SIGCONT it; return once it runs again."""
    pid = agent.process.pid
    os.kill(pid, signal.SIGSTOP)
    agent.wait_for(lambda: state(pid) == "T", "the agent stopped")
    time.sleep(seconds)  # the pause itself: deliberate, not a wait for something to happen
    os.kill(pid, signal.SIGCONT)
    agent.wait_for(lambda: state(pid) != "T", "the agent running again")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_an_agent_paused_longer_than_the_stall_timeout_keeps_serving_once_resumed(tmp_path: Path) -> None:
    trigger = tmp_path / "trigger"
    env = {"FAULT_AGENT_KIND": "stall_once", "FAULT_AGENT_TRIGGER": str(trigger), "FAULT_STALL_SECONDS": str(STEP_SECONDS)}
    args = ["--model", str(TINY_MODEL), "--no-register", "--port", "0", "--stall-timeout", str(STALL_TIMEOUT)]
    with AgentProcess(*args, env=env, program=FAULT_AGENT) as agent:
        agent.wait_ready()
        health = agent.base_url.removesuffix("/v1") + "/health"
        assert ask(health)[0] == 200
        trigger.touch()
        answers: list[tuple[int, Any]] = []
        buyer = threading.Thread(target=lambda: answers.append(ask(agent.base_url + "/completions", PROMPT)), daemon=True)
        buyer.start()
        agent.wait_for(lambda: STALLING in agent.log, "the request inside a long decode step")
        pause(agent, PAUSED_SECONDS)
        health_on_resuming = ask(health)  # the step still runs, the request still pending
        buyer.join(60)
        health_after = ask(health)
        exited = agent.process.poll()
        code = agent.stop()
    assert ok(health_on_resuming), (health_on_resuming, agent.log)
    [(status, answer)] = answers
    assert status == 200 and isinstance(answer, dict) and answer["usage"]["completion_tokens"] > 0, (status, answer, agent.log)
    assert ok(health_after), (health_after, agent.log)
    assert exited is None and code == 0, agent.log
    assert "stalled" not in agent.log
    assert "(SIGSTOP, docker pause, a debugger, or a host too busy to run it): not counted as an engine stall" in agent.log, agent.log
