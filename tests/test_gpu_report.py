"""Where the model runs, said out loud: no silent CPU fallback, in the terminal, the log, /health,
`vramsupply status` and the registration. The GPU options reach llama.cpp or fail in one line."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

import vramsupply.gpu.devices as devices
import vramsupply.gpu.report as report
from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from live_platform import LivePlatform
from test_serve import http_get
from vramsupply.gpu.devices import Device, NoAnswer, PresentGpu
from vramsupply.gpu.report import PlacementMonitor, describe_placement

CPU = Device("CPU", "AMD EPYC", "cpu", 64 << 30, 60 << 30)
CUDA0 = Device("CUDA0", "NVIDIA GeForce RTX 4090", "gpu", 24 << 30, 23 << 30)
RTX = PresentGpu("NVIDIA", "NVIDIA GeForce RTX 4090")
GONE = "GPU disappeared since start (NVIDIA GeForce RTX 4090 no longer listed by the driver): requests may fail or run on the CPU"


def test_a_gpu_the_build_cannot_use_is_a_warning() -> None:
    placement = describe_placement(32, -1, (8, 16), devices=[CPU], present=[RTX], gpu_backend=False)

    assert placement.backend == "cpu" and placement.layers_on_gpu == 0 and placement.layers_total == 33
    assert placement.warnings == (
        "GPU present (NVIDIA GeForce RTX 4090) but this llama.cpp build has no GPU backend: the model runs on the CPU; "
        "reinstall with install.sh (it builds for the GPU it finds)",
    )
    assert placement.lines()[:2] == [
        "running on CPU (AMD EPYC) (60.00 GiB free of 64.00 GiB)",
        "layers on the GPU: 0/33; threads: 8 decode, 16 prompt",
    ]


def test_full_partial_and_no_offload() -> None:
    full = describe_placement(32, 1 << 30, (8, 16), devices=[CUDA0, CPU], present=[RTX], gpu_backend=True)
    assert (full.backend, full.layers_on_gpu, full.warnings) == ("gpu", 33, ())
    assert full.as_json()["devices"] == [{"name": "CUDA0 (NVIDIA GeForce RTX 4090)", "total_bytes": 24 << 30, "free_bytes": 23 << 30}]

    partial = describe_placement(32, 20, (8, 16), devices=[CUDA0, CPU], present=[RTX], gpu_backend=True)
    assert partial.warnings == ("partial offload: only 20 of 33 layers are on the GPU, the rest run on the CPU (slower)",)

    off = describe_placement(32, 0, (8, 16), devices=[CUDA0, CPU], present=[RTX], gpu_backend=True)
    assert off.backend == "cpu" and off.warnings == ("GPU offload is off (--n-gpu-layers 0): the model runs on the CPU",)

    cpu_machine = describe_placement(32, 1 << 30, (2, 2), devices=[CPU], present=[], gpu_backend=False)
    assert cpu_machine.warnings == ()


def test_a_gpu_that_disappears_becomes_a_warning() -> None:
    listed: list[PresentGpu] | NoAnswer = [RTX, RTX]
    monitor = PlacementMonitor(describe_placement(32, 1 << 30, (8, 16), devices=[CUDA0, CPU], present=[RTX, RTX], gpu_backend=True), probe=lambda: listed)
    monitor.refresh()  # what the background re-check does every 30 s
    assert monitor.current().warnings == ()

    listed = [RTX]  # one of the two identical GPUs fell off the bus
    monitor.refresh()
    assert monitor.current().warnings == (GONE,)

    listed = NoAnswer("nvidia-smi -L did not answer within 10 s")  # a busy driver: unknown, not "gone" or "back"
    monitor.refresh()
    assert monitor.current().warnings == (GONE,)

    listed = [RTX, RTX]
    monitor.refresh()
    assert monitor.current().warnings == ()


def test_a_vendor_tool_that_does_not_answer_is_not_a_lost_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "VENDOR_TOOL_SECONDS", 0.2)
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("nvidia-smi", "rocminfo"):
        (folder / tool).write_text("#!/bin/sh\nexec sleep 30\n")
        (folder / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")

    assert devices.gpus_listed() == NoAnswer("nvidia-smi -L did not answer within 0.2 s")
    assert devices.gpus_present() == []  # at start-up (doctor, the first placement) it still lists nothing

    (folder / "nvidia-smi").write_text('#!/bin/sh\necho "No devices were found"; exit 6\n')
    (folder / "rocminfo").unlink()
    assert devices.gpus_listed() == []  # the driver's answer: no GPU


async def test_the_placement_watch_never_waits_for_the_vendor_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "RECHECK_SECONDS", 0.0)
    answer, asked = threading.Event(), threading.Event()

    def hanging_probe() -> list[PresentGpu]:
        asked.set()
        answer.wait(30)
        return []  # the GPU is gone by the time the tool answers

    monitor = PlacementMonitor(describe_placement(32, 1 << 30, (8, 16), devices=[CUDA0, CPU], present=[RTX], gpu_backend=True), probe=hanging_probe)
    ticks = iter([False, False, True])  # two ticks, then the stop

    async def wait(seconds: float) -> bool:
        return next(ticks)

    await asyncio.wait_for(report.watch_placement(monitor, wait), 10)  # returns at the stop although the probe still hangs
    assert asked.wait(10) and monitor.current().warnings == ()
    answer.set()


def fake_nvidia_smi(folder: Path) -> dict[str, str]:
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = -L ] && echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1)"\nexit 0\n')
    smi.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_serving_on_the_cpu_beside_a_gpu_is_reported_everywhere(tmp_path: Path) -> None:
    env = fake_nvidia_smi(tmp_path / "bin")
    with LivePlatform() as platform, AgentProcess(
        "--model", str(TINY_MODEL), "--port", "0", "--split-mode", "none", "--main-gpu", "0", "--tensor-split", "1",
        env={**env, "VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": platform.api_key, "VRAM_SUPPLY_ENDPOINT_URL": "http://127.0.0.1:9"},
    ) as agent:  # fmt: skip
        agent.wait_ready()
        # Printed after the ready line: read from the agent's output by a thread of the test, maybe later.
        agent.wait_for(lambda: agent.printed("layers on the GPU: 0/6; threads: "), "the placement lines", timeout=10)
        assert agent.printed("running on CPU")
        # The log (stderr) is read by another thread than the printed lines (stdout): it may come later.
        warned = "GPU present (NVIDIA GeForce RTX 4090) but this llama.cpp build has no GPU backend"
        agent.wait_for(lambda: warned in agent.log, "the warning in the log", timeout=10)

        health = http_get(agent.base_url.removesuffix("/v1") + "/health")[1]
        assert health["status"] == "ok"
        assert health["placement"]["backend"] == "cpu" and health["placement"]["layers_total"] == 6
        assert health["warnings"][0].startswith("GPU present (NVIDIA GeForce RTX 4090)")

        port = agent.base_url.split(":")[-1].split("/")[0]
        status = run_cli("status", env={**env, "VRAM_SUPPLY_PORT": port, "COLUMNS": "250"})
        assert "WARNING" in status.stdout and "GPU present (NVIDIA GeForce RTX 4090)" in status.stdout
        assert "0/6 layers on the GPU" in status.stdout

        agent.wait_for(lambda: bool(platform.providers), "registration")
        hardware = platform.providers[0].offer.hardware
        assert hardware is not None and hardware["backend"] == "cpu"
        assert hardware["warnings"] == health["warnings"]
        assert agent.stop() == 0


def test_gpu_options_that_cannot_work_fail_in_one_line() -> None:
    no_device = run_cli("serve", "--model", str(TINY_MODEL), "--devices", "CUDA7", "--no-register", "--port", "0")
    assert no_device.returncode == 1
    assert no_device.stderr.strip() == "error: no device 'CUDA7' in this llama.cpp build; it has: CPU (vramsupply doctor lists them)"

    v_without_fa = run_cli("serve", "--model", str(TINY_MODEL), "--cache-type-v", "q8_0", "--flash-attention", "off", "--no-register")
    assert v_without_fa.returncode == 2  # two settings that do not go together (README: exit 2)
    assert "a q8_0 V cache needs flash attention" in v_without_fa.stderr

    small_heads = run_cli("plan", "--model", str(TINY_MODEL), "--json", env={"VRAM_SUPPLY_CACHE_TYPE_K": "q4_0"})
    assert small_heads.returncode == 2  # a setting to change, as the V cache's above (it was 1)
    assert small_heads.stderr.strip() == "error: a q4_0 KV cache needs a head size that is a multiple of 32; this model's is 8: use --cache-type-k (VRAM_SUPPLY_CACHE_TYPE_K) f16"
    served = run_cli("serve", "--model", str(TINY_MODEL), "--cache-type-k", "q4_0", "--no-register", "--port", "0")
    assert (served.returncode, served.stderr) == (2, small_heads.stderr)

    bad_type = run_cli("serve", "--model", str(TINY_MODEL), "--cache-type-k", "q5_k", "--no-register")
    assert bad_type.returncode == 2 and "cache_type_k" in bad_type.stderr
