"""Ctrl-C while `serve` is not serving yet (a Hub that never answers, a model loading) and during
`--demo`, whose output, like serve's, may have nobody reading it.

The agent is the real CLI in a child process. Where a test needs llama.cpp slower than the tiny
model makes it (weights read from a slow disk, a KV cache that takes forever to clear, a slow
prompt), the child is this file run as a program: the real command line with one llama.cpp call
slowed (``SLOW_LLAMA``, see ``slow_llama``); everything that must react is the real code.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL

THIS_FILE = Path(__file__).resolve()
AS_DOUBLE = [sys.executable, str(THIS_FILE)]
# Far beyond what any stop below may take, so that waiting for the Hub's timeout cannot pass for stopping.
HUB_TIMEOUT = "120"
STOP_WITHIN = 30  # seconds; the old agent took the Hub's whole timeout, or the whole load


class SilentHub:
    """A HuggingFace Hub that accepts connections and never answers (a stalled proxy or CDN edge)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []
        self.reached = threading.Event()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._connections.append(connection)
            self.reached.set()

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.close()


@pytest.fixture
def silent_hub() -> Iterator[SilentHub]:
    hub = SilentHub()
    try:
        yield hub
    finally:
        hub.close()


def hub_env(hub: SilentHub, tmp_path: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "",
        "VRAM_SUPPLY_DOWNLOAD_TIMEOUT": HUB_TIMEOUT,
    }


@pytest.mark.parametrize(
    "signals", [(signal.SIGINT,), (signal.SIGINT, signal.SIGINT), (signal.SIGTERM,)], ids=["ctrl-c", "ctrl-c-twice", "sigterm"]
)
def test_a_stop_while_the_hub_never_answers_ends_serve_at_once_without_a_traceback(
    silent_hub: SilentHub, tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    """Before, the agent said "stopped before the model was ready" and then stayed until the Hub's
    read timed out, deaf to a second Ctrl-C, ending with uvloop's "Event loop is closed" twice."""
    with AgentProcess("--model", "org/model", "--no-register", "--port", "0", env=hub_env(silent_hub, tmp_path)) as agent:
        assert silent_hub.reached.wait(STOP_WITHIN), agent.output
        for sig in signals:
            agent.send_signal(sig)
        code = agent.wait(STOP_WITHIN)
    # Two signals: the first may have ended the agent (0) before the second came (130 from Python,
    # or death by SIGINT where it came as the interpreter was exiting, which a shell shows as 130).
    assert code in ((0, 130, -signal.SIGINT) if len(signals) > 1 else (0,)), agent.output
    assert "stopped before the model was ready" in agent.log or agent.stderr[-1] == "error: stopped before the engine was ready"
    assert "Traceback" not in agent.log and "Event loop is closed" not in agent.log


def test_ctrl_c_while_the_weights_load_abandons_the_load_and_exits_0() -> None:
    """Weights that take minutes to read (a large model, a slow disk): the first Ctrl-C has llama.cpp
    stop before its next tensor. Before, it waited for the whole load, then for nothing."""
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", program=AS_DOUBLE, env={"SLOW_LLAMA": "disk"}) as agent:
        agent.wait_for(lambda: "reading the weights from a slow disk" in agent.log, "the load")
        code = agent.stop(signal.SIGINT, timeout=STOP_WITHIN)
    assert code == 0, agent.output
    assert "SIGINT received: abandoning the model load" in agent.log and "again to stop at once" in agent.log
    assert "model load abandoned" in agent.log and "Traceback" not in agent.log
    assert not any(line.startswith("vramsupply ready") for line in agent.stdout)


def test_a_stop_while_llama_cpp_sets_up_the_context_says_so_and_a_second_stops_at_once() -> None:
    """Setting up the context (allocating and clearing a KV cache: seconds to minutes) cannot be
    interrupted: the first Ctrl-C says it waits for that and that a second one does not wait."""
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0", program=AS_DOUBLE, env={"SLOW_LLAMA": "context"}) as agent:
        agent.wait_for(lambda: "clearing a KV cache that takes forever" in agent.log, "the context's setup")
        agent.send_signal(signal.SIGINT)
        agent.wait_for(lambda: "SIGINT received" in agent.log, "the first Ctrl-C's log line")
        code = agent.stop(signal.SIGINT, timeout=STOP_WITHIN)
    assert code == 130, agent.output
    assert "SIGINT received: abandoning the model load (a KV cache llama.cpp is already allocating is finished first); again to stop at once" in agent.log
    assert agent.stderr[-1] == "error: stopped before the engine was ready", "no request was in flight to not wait for"
    assert "Traceback" not in agent.log


def test_ctrl_c_during_the_demo_purchase_lets_the_answer_finish_and_never_says_still_serving() -> None:
    """The buyer's request is in flight, so the first Ctrl-C lets it finish; before, the demo then
    printed "still serving and heartbeating ... Ctrl-C stops and deregisters" while it stopped."""
    with AgentProcess("--demo", "--port", "0", program=AS_DOUBLE, env={"SLOW_LLAMA": "prompt"}) as agent:
        agent.wait_for(lambda: agent.printed("demo: a buyer asks"), "the demo's purchase", timeout=90)
        code = agent.stop(signal.SIGINT, timeout=STOP_WITHIN)
    assert code == 0, agent.output
    assert agent.printed("demo: the platform counted"), "the buyer's answer, in flight, was finished"
    assert not agent.printed("still serving"), agent.output
    assert "deregistered" in agent.log and "Traceback" not in agent.log


def test_a_demo_whose_output_nobody_reads_goes_on_serving() -> None:
    """``serve --demo | head -3``: the reader leaves while the demo prints the answer. Before, the
    agent deregistered and exited 1 without a word; now the demo's lines go to the log, as serve's."""
    process = subprocess.Popen(
        [*AS_DOUBLE, "serve", "--demo", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VRAM_SUPPLY_THREADS": "1", "SLOW_LLAMA": "prompt"},
    )
    log: list[str] = []
    assert process.stdout is not None and process.stderr is not None
    stderr = process.stderr
    reader = threading.Thread(target=lambda: [log.append(line) for line in stderr], daemon=True)
    reader.start()
    try:
        printed = []
        for line in process.stdout:
            printed.append(line)
            if line.startswith("demo: a buyer asks"):
                break
        process.stdout.close()  # the reader leaves before the answer comes
        deadline = time.monotonic() + 90
        while not any("demo: still serving" in line for line in log):
            assert process.poll() is None, f"the agent exited {process.returncode}: {''.join(log)}"
            assert time.monotonic() < deadline, "".join(log)
            time.sleep(0.05)
        assert any("cannot write to standard output (Broken pipe); serving goes on" in line for line in log)
        url = re.search(r" at (http://\S+)/v1 ", printed[0])
        assert url is not None, printed
        with urllib.request.urlopen(url.group(1) + "/health", timeout=10) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_WITHIN) == 0
        reader.join(10)  # every last line of the log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in "".join(log)


def slow_llama(kind: str) -> None:
    """Slow one llama.cpp call in this process, the way a slow machine is slow:

    - ``disk``: each tensor of the weights takes 5 s to read; llama.cpp still asks the agent's own
      progress callback whether to go on (polled), as it does between tensors;
    - ``context``: setting up the context never ends, as a KV cache far too large to clear soon;
    - ``prompt``: a decode of more than 4 tokens (a prompt; the warm-up decodes 2) takes 5 s.
    """
    import ctypes

    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    log = os.fdopen(os.dup(2), "w")  # its own copy: older agents pointed fd 2 at /dev/null around a load
    if kind == "disk":
        load = bindings.llama_model_load_from_file

        def from_slow_disk(path: bytes, params: bindings.llama_model_params) -> object:
            # The agent's callback by its address: the field itself reads as a view that follows it.
            address = ctypes.cast(params.progress_callback, ctypes.c_void_p).value
            ask_agent = bindings.llama_progress_callback(address) if address else None

            def read_tensor(progress: float, user_data: object) -> bool:
                for _ in range(100):
                    if ask_agent and not ask_agent(progress, user_data):
                        return False
                    time.sleep(0.05)
                return True

            slow = bindings.llama_progress_callback(read_tensor)
            params.progress_callback = slow
            print("double: reading the weights from a slow disk", file=log, flush=True)
            return load(path, params)  # `slow` lives until the load returns

        bindings.llama_model_load_from_file = from_slow_disk
    elif kind == "context":

        def endless_context(model: object, params: object) -> object:
            print("double: clearing a KV cache that takes forever", file=log, flush=True)
            threading.Event().wait()
            raise AssertionError("unreachable")

        bindings.llama_init_from_model = endless_context
    elif kind == "prompt":
        decode = llama_cpp.llama_decode

        def slow_prompt(ctx: object, batch: bindings.llama_batch) -> int:
            if batch.n_tokens > 4:
                time.sleep(5)
            return decode(ctx, batch)

        llama_cpp.llama_decode = slow_prompt
    else:
        raise SystemExit(f"unknown SLOW_LLAMA={kind!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(THIS_FILE.parent.parent))  # the package next to this file, not an installed one
    slow_llama(os.environ["SLOW_LLAMA"])
    from vramsupply.cli import main

    sys.argv[0] = "vramsupply"
    main()
