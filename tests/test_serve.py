"""`vramsupply serve` as a user runs it: a real subprocess, real signals, real HTTP."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types import Completion

from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from vramsupply.engine import EngineStats
from vramsupply.serve import Snapshot, Throughput

TOKEN = "serve-test-token"


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None) -> Iterator[AgentProcess]:
    """The tiny model served locally on a free port, ready."""
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", *args, env=env) as served:
        served.wait_ready()
        yield served


async def test_at_default_settings_sixteen_buyers_stream_at_once() -> None:
    """No --parallel: every one of 16 concurrent buyers gets its first token before any answer is
    done (with 4 slots the fifth waited for a whole answer)."""
    with serving(env={"VRAM_SUPPLY_ENDPOINT_TOKEN": TOKEN}) as served:
        assert served.printed("(16 slots, ")
        events: list[tuple[str, int]] = []

        async def buy(client: AsyncOpenAI, i: int) -> None:
            stream = await client.completions.create(
                model=served.model_id, prompt=f"Story {i}: once upon a time", max_tokens=400, stream=True, extra_body={"ignore_eos": True},
            )
            async with stream:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text and ("first", i) not in events:
                        events.append(("first", i))
            events.append(("done", i))

        async with AsyncOpenAI(base_url=served.base_url, api_key=TOKEN, max_retries=0) as client:
            await asyncio.gather(*(buy(client, i) for i in range(16)))
    kinds = [kind for kind, _ in events]
    assert kinds == ["first"] * 16 + ["done"] * 16, kinds


def test_sigterm_during_a_stream_lets_it_finish_then_exits_0() -> None:
    with serving("--parallel", "2", env={"VRAM_SUPPLY_ENDPOINT_TOKEN": TOKEN}) as served:
        assert served.model_id == "stories260k"
        assert len([line for line in served.stdout if line.startswith("vramsupply ready")]) == 1
        with OpenAI(base_url=served.base_url, api_key=TOKEN, max_retries=0) as client:
            stream = client.completions.create(
                model=served.model_id,
                prompt="Once upon a time",
                max_tokens=300,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            chunks = [next(stream)]
            served.send_signal(signal.SIGTERM)
            chunks.extend(stream)

        code = served.wait()

    assert code == 0
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 300
    assert "SIGTERM received" in served.log
    assert "waiting up to 30s for 1 in-flight request(s)" in served.log
    assert "Traceback" not in served.log


def test_endpoint_token_from_the_environment_guards_v1_not_health() -> None:
    with serving(env={"VRAM_SUPPLY_ENDPOINT_TOKEN": TOKEN}) as served:
        root = served.base_url.removesuffix("/v1")
        unauthorized = http_get(served.base_url + "/models")
        authorized = http_get(served.base_url + "/models", {"Authorization": f"Bearer {TOKEN}"})
        by_file_name = http_get(served.base_url + "/models/stories260K.gguf", {"Authorization": f"Bearer {TOKEN}"})
        health = http_get(root + "/health")
        served.send_signal(signal.SIGINT)
        code = served.wait()

    assert unauthorized[0] == 401 and unauthorized[1]["error"]["code"] == "invalid_api_key"
    assert authorized[0] == 200 and authorized[1]["data"][0]["id"] == "stories260k"
    assert by_file_name[0] == 200 and by_file_name[1]["id"] == "stories260k"
    assert health[0] == 200 and health[1]["status"] == "ok"
    assert code == 0
    assert TOKEN not in served.log


def test_serve_raises_its_open_files_limit_so_many_buyers_can_connect() -> None:
    """Started with the common soft limit of 1,024 open files (256 here), the agent raises it to the
    hard limit (up to 65,536): each buyer's connection holds one, and past the limit no /health
    probe could connect either."""
    soft_256 = ["sh", "-c", 'ulimit -Sn 256 && exec "$0" -m vramsupply "$@"', sys.executable]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--no-register", program=soft_256) as served:
        served.wait_ready()
        limits = Path(f"/proc/{served.process.pid}/limits").read_text()
        served.send_signal(signal.SIGINT)
        assert served.wait() == 0
    [line] = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3] == str(wanted), line


@pytest.mark.parametrize(
    "smallest",
    [["--n-batch", "1", "--parallel", "1"], ["--n-batch", "4", "--parallel", "4"], ["--context-length", "16", "--parallel", "16"]],
    ids=["one-token steps", "steps as wide as the slots", "a cache as small as the slots"],
)
def test_the_smallest_decode_steps_allowed_still_serve_concurrent_buyers(smallest: list[str]) -> None:
    """--n-batch, and the context (llama.cpp's batch is at most the context), may be as small as
    --parallel. Before, llama.cpp aborted the process at load (a 2-token warm-up past n_batch 1;
    an output row per sequence, the prompt cache's spare one too, past a batch of 4 or 16 rows),
    and the scheduler thread died once a stream and new prompts needed more rows than the batch
    held."""
    with serving(*smallest) as served:
        client = OpenAI(base_url=served.base_url, api_key="x", max_retries=0)

        def ask(prompt: str) -> Completion:
            return client.completions.create(model="stories260k", prompt=prompt, max_tokens=6, temperature=0)

        alone = ask("Once upon a time").choices[0].text
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, ["Once upon a time", "Lily went", "The dog", "One day"]))
        served.send_signal(signal.SIGINT)
        assert served.wait() == 0
    assert alone and answers[0].choices[0].text == alone
    assert all(a.choices[0].finish_reason in ("length", "stop") for a in answers)


def test_drain_timeout_bounds_the_wait_for_a_long_request() -> None:
    with serving("--drain-timeout", "0.5") as served:
        with OpenAI(base_url=served.base_url, api_key="unused", max_retries=0) as client:
            stream = client.completions.create(
                model=served.model_id, prompt="Once", max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
            )
            next(stream)
            started = time.monotonic()
            served.send_signal(signal.SIGTERM)
            code = served.wait()
            waited = time.monotonic() - started

    assert code == 0
    assert "waiting up to 0.5s for 1 in-flight request(s)" in served.log
    assert waited < 5


def test_missing_model_file_is_one_line_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("serve", "--model", str(tmp_path / "absent.gguf"), "--no-register")

    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "absent.gguf" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_model_at_all_says_how_to_give_one() -> None:
    result = run_cli("serve", "--no-register")

    assert result.returncode != 0
    assert "--model" in result.stderr and "VRAM_SUPPLY_MODEL" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--model", str(TINY_MODEL), "--port", str(port), "--no-register")

    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "value", "setting"), [("--parallel", "0", "parallel"), ("--context-length", "3", "context_length")])
def test_bad_flag_values_name_the_flag(flag: str, value: str, setting: str) -> None:
    result = run_cli("serve", "--model", str(TINY_MODEL), flag, value, "--no-register")

    assert result.returncode == 2
    assert setting in result.stderr and f"flag {flag}" in result.stderr


def test_throughput_is_tokens_per_second_over_the_recent_window() -> None:
    throughput = Throughput(window=5.0)

    assert throughput.update(0, now=100.0) == 0.0
    assert throughput.update(50, now=101.0) == 50.0
    assert throughput.update(150, now=102.0) == 75.0
    assert throughput.update(150, now=110.0) == pytest.approx(0.0)


def test_status_line_shows_slots_queue_speed_and_tokens_served() -> None:
    stats = EngineStats(
        slots_total=4, slots_busy=3, queue_depth=2, prompt_tokens_total=1000, completion_tokens_total=234,
        cached_tokens_total=10, requests_total=12,
    )

    assert Snapshot(stats, 41.26).line() == "3/4 slots busy, 2 queued, 41.3 tok/s, 1,234 tokens served (12 requests)"


def test_a_local_model_is_served_without_loading_the_hub_client() -> None:
    """huggingface_hub and its HTTP stack hold ~12 MB of memory that serving a local file never uses."""
    with serving(env={"PYTHONPROFILEIMPORTTIME": "1"}) as served:
        with OpenAI(base_url=served.base_url, api_key="none", max_retries=0) as client:
            answer = client.completions.create(model=served.model_id, prompt="Once upon a time", max_tokens=4)
        assert served.stop(signal.SIGINT) == 0

    assert answer.usage is not None and answer.usage.completion_tokens == 4
    imported = {line.rsplit("|", 1)[-1].strip() for line in served.stderr if line.startswith("import time:")}
    assert {"vramsupply.engine.scheduler", "vramsupply.hub.local", "vramsupply.gpu.planning"} <= imported
    assert not {name for name in imported if name.startswith(("huggingface_hub", "httpx2", "vramsupply.hub.access"))}
