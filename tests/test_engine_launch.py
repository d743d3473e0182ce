"""`vramsupply serve --engine vllm|sglang`: the agent launches the engine, waits until it really
answers, supervises it and stops it. The engine is `tests/doubles/fake_engine.py`, a test double
that accepts vLLM's and SGLang's command lines and serves their HTTP surface by delegating to
llama-cpp-python's `llama_cpp.server` (real vLLM and SGLang need a GPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path

import pytest
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from llama_cpp_upstream import FAKE_ENGINE, request_json, wait_until
from openai import OpenAI

from vramsupply.upstream import UpstreamBackend, UpstreamError, UpstreamOptions
from vramsupply.upstream.launch import LaunchError, LaunchOptions, command_line
from vramsupply.upstream.metrics import GAUGES, UpstreamLoad, read_load

TOKEN = "launch-endpoint-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def double_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"FAKE_ENGINE_GGUF": str(TINY_MODEL), "FAKE_ENGINE_RECORD": str(tmp_path / "starts.jsonl"), "VRAM_SUPPLY_ENDPOINT_TOKEN": TOKEN, **extra}


def events(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def starts(tmp_path: Path) -> list[dict[str, object]]:
    return [event for event in events(tmp_path) if "argv" in event]


def alive(pid: int) -> bool:
    """Running, not exited (an exited child of a dead parent may linger as a zombie until reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return str(reply.read().decode())


def upstream_running(port: str) -> float:
    return read_load(fetch(f"http://127.0.0.1:{port}/metrics"), GAUGES["vllm"]).running  # type: ignore[union-attr]


def test_vllm_is_launched_on_loopback_supervised_restarted_and_stopped(tmp_path: Path) -> None:
    agent = AgentProcess(
        "--engine", "vllm", "--model", "Org/Tiny-Model", "--engine-command", f"{sys.executable} {FAKE_ENGINE} vllm serve",
        "--tensor-parallel-size", "2", "--max-model-len", "512", "--engine-args", "--gpu-memory-utilization 0.5",
        "--port", "0", "--no-register", env=double_env(tmp_path, FAKE_ENGINE_PIECE_DELAY="0.5"),
    )  # fmt: skip
    try:
        agent.wait_ready(timeout=120)
        [first] = starts(tmp_path)
        argv = first["argv"]
        assert isinstance(argv, list)
        port, key = argv[argv.index("--port") + 1], argv[argv.index("--api-key") + 1]
        assert argv == [
            "vllm", "serve", "Org/Tiny-Model", "--host", "127.0.0.1", "--port", port, "--api-key", key,
            "--served-model-name", "org/tiny-model", "--tensor-parallel-size", "2", "--max-model-len", "512",
            "--gpu-memory-utilization", "0.5",
        ]  # fmt: skip
        assert agent.model_id == "org/tiny-model"
        assert agent.printed(f"through vllm at http://127.0.0.1:{port}/v1 (16 slots, 512-token context)")
        assert "[vllm] fake vllm: serving Org/Tiny-Model as org/tiny-model" in agent.log, "its output, with its name on each line"
        assert key not in agent.output, "the engine's API key never reaches the log"

        with OpenAI(base_url=agent.base_url, api_key=TOKEN, max_retries=0) as client:
            chunks = list(client.completions.create(model="org/tiny-model", prompt="Once", max_tokens=3, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1, "usage taken from the engine"
        root = agent.base_url.removesuffix("/v1")
        wait_until(lambda: "vramsupply_upstream_kv_cache_usage 0.25" in fetch(root + "/metrics"), "the engine's gauges on our /metrics")

        # A buyer hanging up mid-stream cancels the engine's request (the double records the cancellation).
        body = json.dumps({"prompt": "Once", "max_tokens": 200, "stream": True}).encode()
        request = urllib.request.Request(agent.base_url + "/completions", body, {"Content-Type": "application/json", **AUTH})
        with urllib.request.urlopen(request, timeout=30) as reply:
            reply.readline()
            assert upstream_running(port) == 1
        wait_until(lambda: {"cancelled": "/v1/completions"} in events(tmp_path), "the engine's request cancelled", timeout=30)
        assert upstream_running(port) == 0

        # The engine dies: /health says 503 until the supervisor has it running and ready again.
        os.kill(int(first["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        wait_until(lambda: len(starts(tmp_path)) == 2, "a restart", timeout=60)
        wait_until(lambda: request_json(root + "/health")[0] == 200, "ready again", timeout=120)
        assert "vllm failed (vllm exited with status -9); starting it again" in agent.log
        second = starts(tmp_path)[1]
        status, answer = request_json(agent.base_url + "/completions", {"prompt": "Once", "max_tokens": 2}, AUTH)
        assert status == 200 and answer["model"] == "org/tiny-model"

        assert agent.stop(signal.SIGTERM) == 0
        assert not alive(int(second["pid"])), "the engine is stopped with the agent"  # type: ignore[call-overload]
    finally:
        agent.kill()
    assert "Traceback" not in agent.log


def test_sglang_is_launched_with_its_own_flags(tmp_path: Path) -> None:
    agent = AgentProcess(
        "--engine", "sglang", "--model", "Org/Tiny-Model", "--engine-command", f"{sys.executable} {FAKE_ENGINE} sglang",
        "--tp", "2", "--nnodes", "2", "--node-rank", "0", "--dist-init-addr", "10.0.0.1:5000", "--parallel", "8",
        "--port", "0", "--no-register", env=double_env(tmp_path),
    )  # fmt: skip
    try:
        agent.wait_ready(timeout=120)
        argv = starts(tmp_path)[0]["argv"]
        assert isinstance(argv, list)
        port, key = argv[argv.index("--port") + 1], argv[argv.index("--api-key") + 1]
        assert argv == [
            "sglang", "--model-path", "Org/Tiny-Model", "--host", "127.0.0.1", "--port", port, "--api-key", key,
            "--served-model-name", "org/tiny-model", "--enable-metrics", "--tp", "2", "--max-running-requests", "8",
            "--nnodes", "2", "--node-rank", "0", "--dist-init-addr", "10.0.0.1:5000",
        ]  # fmt: skip
        assert agent.printed("through sglang at") and agent.printed("(8 slots, 2048-token context)"), "context learned from the engine"
        status, answer = request_json(agent.base_url + "/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, AUTH)
        assert status == 200 and answer["usage"]["completion_tokens"] >= 1

        # An agent killed outright (OOM, SIGKILL) takes its engine with it: no orphan holds the GPU.
        agent.kill()
        engine = int(starts(tmp_path)[0]["pid"])  # type: ignore[call-overload]
        wait_until(lambda: not alive(engine), "the engine gone with the agent", timeout=30)
    finally:
        agent.kill()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (UpstreamOptions("vllm", model="./model.gguf", upstream_model=None), "--engine vllm loads a weights repo (safetensors, AWQ or FP8), not a GGUF file"),
        (UpstreamOptions("vllm", model=None, upstream_model=None), "--engine vllm needs the weights to load: pass --model org/model"),
        (UpstreamOptions("sglang", model="Org/M", upstream_model=None, node_rank=1), "the agent runs on SGLang's rank-0 node, not rank 1"),
        (UpstreamOptions("vllm", model="Org/M", upstream_model=None, nnodes=2), "vLLM spans nodes through a Ray cluster"),
    ],
)
async def test_launch_misconfigurations_are_refused_before_anything_starts(options: UpstreamOptions, message: str) -> None:
    with pytest.raises(UpstreamError, match=re.escape(message)):
        await UpstreamBackend(options).prepare()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "vllm", "--model", "Org/M", "--engine-command", "/nonexistent/vllm serve"], "error: cannot start vllm (/nonexistent/vllm): No such file or directory"),
        (["--engine", "tgi"], "invalid engine = 'tgi' (from flag --engine)"),
    ],
)
def test_engine_misconfigurations_get_one_line(args: list[str], message: str) -> None:
    result = run_cli("serve", *args, "--port", "0", "--no-register")
    assert result.returncode in (1, 2)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_first_start_that_exits_is_reported_not_retried_forever(tmp_path: Path) -> None:
    command = f"{sys.executable} {FAKE_ENGINE} vllm serve --unknown-flag"
    result = run_cli("serve", "--engine", "vllm", "--model", "Org/M", "--engine-command", command, "--port", "0", "--no-register", env=double_env(tmp_path))
    assert result.returncode == 1
    assert "error: vllm exited with status 2 before it was ready" in result.stderr
    assert "[vllm] usage: vllm" in result.stderr, "the engine's own complaint is in the log"


def test_command_lines_and_load_gauges() -> None:
    options = LaunchOptions(engine="vllm", model="Qwen/Qwen3-8B-AWQ", served_name="qwen/qwen3-8b", port=9000, api_key="k", pipeline_parallel=2)
    assert command_line(options)[:3] == ["vllm", "serve", "Qwen/Qwen3-8B-AWQ"]
    assert command_line(options)[-2:] == ["--pipeline-parallel-size", "2"]
    with pytest.raises(LaunchError, match="--pipeline-parallel-size is vLLM's"):
        command_line(LaunchOptions(engine="sglang", model="m", served_name="m", port=1, api_key="k", pipeline_parallel=2))

    vllm = (
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\nvllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
        'vllm:num_requests_waiting{model_name="m"} 4.0\nvllm:kv_cache_usage_perc{engine="0"} 0.5\nvllm:kv_cache_usage_perc{engine="1"} 0.75\n'
    )
    assert read_load(vllm, GAUGES["vllm"]) == read_load(vllm) == UpstreamLoad(running=5, waiting=4, cache_usage=0.75)
    sglang = "# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name=\"m\"} 7.0\nsglang:num_queue_reqs{model_name=\"m\"} 1.0\n"
    assert read_load(sglang, GAUGES["sglang"]).running == 7  # type: ignore[union-attr]
    llama_server = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 0\n"
    assert (read_load(llama_server).running, read_load(llama_server).waiting) == (2, 0)  # type: ignore[union-attr]
    assert read_load("process_cpu_seconds_total 3.0\n") is None
    assert read_load("not prometheus {{{") is None
