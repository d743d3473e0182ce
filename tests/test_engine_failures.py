"""llama.cpp failing under the engine: decodes that fail, and a step that hangs while the agent stops.

A decode that fails ends only its own requests (500), unless every decode keeps failing: then the
engine has failed, like a dead scheduler thread (``tests/test_liveness.py``): /health turns 503
naming llama.cpp's status, and ``serve`` deregisters and exits 1 so that systemd restarts it.

A decode step that hangs when the agent is stopped must not hold the stop hostage: at the drain's
deadline each buyer still gets the ``shutting_down`` error event, the event loop goes on (systemd's
watchdog pings, a second signal), and the agent exits once the step ends, or at once on a second signal.

Faults are induced by replacing llama.cpp's decode call, in this process (``monkeypatch``) or in
the agent's (``tests/fault_agent.py``); everything that must notice is the real code.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from agent_process import AgentProcess
from conftest import REPO, TINY_MODEL
from live_platform import LivePlatform, free_port
from live_server import LiveServer
from test_liveness import PROMPT, get, post
from test_platform_serve import marketplace_env
import test_service_serve
from test_service_serve import NotifySocket
from test_shutdown import stream

from vramsupply.engine.liveness import FAILING_STEPS

FAULT_AGENT = [sys.executable, str(REPO / "tests" / "fault_agent.py")]
COMPUTE_FAILED = -3
CAUSE = (
    f"the inference engine failed: llama.cpp failed every decode of the last {FAILING_STEPS} steps "
    "(status -3: the computation failed in llama.cpp's backend, most often the GPU out of memory or a driver error)"
)


class FailingDecodes:
    """llama.cpp's decode, except that the next ``to_fail`` calls return -3 (compute failed)."""

    def __init__(self) -> None:
        self.to_fail = 0
        self._real = llama_cpp.llama_decode

    def __call__(self, ctx: object, batch: object) -> int:
        if self.to_fail > 0:
            self.to_fail -= 1
            return COMPUTE_FAILED
        return self._real(ctx, batch)


def test_decodes_that_fail_now_and_then_fail_only_their_requests_and_health_stays_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = FailingDecodes()
    with LiveServer() as live:
        monkeypatch.setattr(llama_cpp, "llama_decode", decodes)
        for _ in range(3):  # a run one short of the limit, then a success: the run starts over
            decodes.to_fail = FAILING_STEPS - 1
            for _ in range(FAILING_STEPS - 1):
                status, answer = post(live.base_url + "/completions", PROMPT)
                assert status == 500 and "llama.cpp failed to decode this request (status -3: " in answer["error"]["message"], answer
            assert get(live.url + "/health")[0] == 200
            status, answer = post(live.base_url + "/completions", PROMPT)
            assert status == 200 and answer["usage"]["completion_tokens"] > 0, answer
        assert live.engine is not None and live.engine.failure is None


def test_decodes_that_keep_failing_turn_health_503_naming_llama_cpps_status(monkeypatch: pytest.MonkeyPatch) -> None:
    decodes = FailingDecodes()
    with LiveServer() as live:
        monkeypatch.setattr(llama_cpp, "llama_decode", decodes)
        decodes.to_fail = 10**6
        answers = [post(live.base_url + "/completions", PROMPT) for _ in range(FAILING_STEPS)]
        health_status, health = get(live.url + "/health")
        after_status, after = post(live.base_url + "/completions", PROMPT)

    assert [status for status, _ in answers] == [500] * FAILING_STEPS, answers
    assert (health_status, health["status"], health["reason"]) == (503, "error", CAUSE)
    assert after_status == 503 and after["error"]["code"] == "engine_failed" and CAUSE in after["error"]["message"], after


def test_serve_whose_decodes_keep_failing_deregisters_and_exits_1_naming_llama_cpps_status(tmp_path: Path) -> None:
    trigger = tmp_path / "trigger"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LivePlatform() as platform:
        env = {**marketplace_env(platform.url), "FAULT_AGENT_KIND": "fail_status", "FAULT_AGENT_TRIGGER": str(trigger)}
        args = ["--model", str(TINY_MODEL), "--port", str(port), "--endpoint-url", endpoint]
        with AgentProcess(*args, env=env, program=FAULT_AGENT) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            token = platform.providers[0].offer.endpoint_token
            assert _buy(endpoint, token)[0] == 200, "healthy before the fault"
            trigger.touch()
            answers = []
            while agent.process.poll() is None and len(answers) < 100:  # buyers keep coming, as the platform sends them
                answers.append(_buy(endpoint, token))
            code = agent.wait(timeout=30)
        assert platform.providers == [], "deregistered"
    assert code == 1, agent.output
    assert agent.stderr[-1] == f"error: {CAUSE}", agent.output
    assert "Traceback" not in agent.log
    # Each buyer served before the engine was declared failed got llama.cpp's error; none was left hanging.
    failed = [(status, body) for status, body in answers if status == 500]
    assert len(failed) == FAILING_STEPS and all("(status -3: " in body["error"]["message"] for _, body in failed), answers
    assert {status for status, _ in answers} <= {500, 503, 0}, answers


def _buy(endpoint: str, token: str | None) -> tuple[int, dict[str, Any]]:
    """One buyer's request; status 0 when the agent no longer listens."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        endpoint + "/v1/completions", json.dumps(PROMPT).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)
    except OSError as error:
        return 0, {"no answer": repr(error)}


notify_socket = test_service_serve.notify_socket  # the fixture playing systemd's notify socket

STALLING = "FAULT: stalling a decode"
RESUMES = "FAULT: the decode resumes"


def agent_with_a_decode_that_will_stall(tmp_path: Path, notify_socket: NotifySocket, seconds: int) -> tuple[AgentProcess, Path]:
    """The agent with ``--drain-timeout 1``, pinging a watchdog every 0.2 s; its first decode after
    the returned trigger file exists blocks ``seconds``, then goes on."""
    trigger = tmp_path / "trigger"
    env = {
        "FAULT_AGENT_KIND": "stall_once", "FAULT_AGENT_TRIGGER": str(trigger), "FAULT_STALL_SECONDS": str(seconds),
        "NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000",
    }
    agent = AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", "--drain-timeout", "1", env=env, program=FAULT_AGENT)
    agent.wait_ready()
    return agent, trigger


def buyer_whose_decode_stalls(agent: AgentProcess, trigger: Path) -> tuple[threading.Thread, list[str]]:
    """A streaming buyer, its very first decode stuck (the fault strikes the next decode)."""
    trigger.touch()
    outcome: list[str] = []
    buyer = threading.Thread(target=stream, args=(agent.base_url.removesuffix("/v1"), None, outcome, threading.Event()), daemon=True)
    buyer.start()
    agent.wait_for(lambda: STALLING in agent.log, "the stalled decode")
    return buyer, outcome


def sigterm_while_the_decode_stalls(agent: AgentProcess, trigger: Path) -> list[str]:
    """A buyer's stream stalls in the decode, then SIGTERM; what the buyer got once answered."""
    buyer, outcome = buyer_whose_decode_stalls(agent, trigger)
    agent.send_signal(signal.SIGTERM)
    buyer.join(60)
    return outcome


def watchdog_pings(notify_socket: NotifySocket) -> int:
    return notify_socket.assignments().count("WATCHDOG=1")


def test_sigterm_while_a_decode_hangs_ends_the_stream_at_the_deadline_and_the_loop_goes_on(tmp_path: Path, notify_socket: NotifySocket) -> None:
    agent, trigger = agent_with_a_decode_that_will_stall(tmp_path, notify_socket, seconds=8)
    with agent:
        outcome = sigterm_while_the_decode_stalls(agent, trigger)
        stuck_when_answered = RESUMES not in agent.log
        # systemd's watchdog is pinged from the event loop: it goes on while the step is stuck.
        pings = watchdog_pings(notify_socket)
        agent.wait_for(lambda: watchdog_pings(notify_socket) >= pings + 3 or RESUMES in agent.log, "watchdog pings")
        stuck_while_pinging = RESUMES not in agent.log
        code = agent.wait(timeout=60)
    assert outcome and json.loads(outcome[0])["error"]["code"] == "shutting_down", (outcome, agent.output)
    assert stuck_when_answered, "the buyer was answered at the drain's deadline, not once the stuck step ended"
    assert stuck_while_pinging, "the event loop went on while the step was stuck"
    assert code == 0, agent.output
    assert RESUMES in agent.log and "without freeing" not in agent.log, "the model was freed once the step had ended"
    assert "Traceback" not in agent.log


def test_a_second_sigterm_while_a_decode_hangs_stops_at_once(tmp_path: Path, notify_socket: NotifySocket) -> None:
    agent, trigger = agent_with_a_decode_that_will_stall(tmp_path, notify_socket, seconds=300)
    with agent:
        outcome = sigterm_while_the_decode_stalls(agent, trigger)
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=30)  # not the step's 300 s, nor the close's wait for it
    assert outcome and json.loads(outcome[0])["error"]["code"] == "shutting_down", (outcome, agent.output)
    assert code == 130, agent.output
    assert agent.stderr[-1] == "error: stopped without waiting for 1 in-flight request", agent.output
    assert RESUMES not in agent.log and "Traceback" not in agent.log


def test_an_engine_whose_thread_cannot_start_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a memory limit (ulimit -v) Python could not start the scheduler's thread, and serve
    ended in a traceback; now it is an EngineError, one line from the CLI, the model freed."""
    from vramsupply.engine import Engine, EngineError, EngineOptions
    from vramsupply.errors import VramsupplyError

    start = threading.Thread.start

    def refused(thread: threading.Thread) -> None:
        if thread.name == "vramsupply-scheduler":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refused)
    with pytest.raises(EngineError, match=r"cannot start the engine's thread \(can't start new thread\): too little memory") as refusal:
        Engine.load(EngineOptions(model_path=TINY_MODEL, threads=1))
    assert isinstance(refusal.value, VramsupplyError)
