"""`/health` is what the platform polls, with a 5 s timeout, to decide whether this provider is
online: every minute it wrongly says "down" costs the provider. So /health answers from the last
known GPU placement at once, whatever the vendor tool (nvidia-smi) or the request work is doing.

The GPU is faked: a placement "on an RTX 4090" and an `nvidia-smi` on PATH written by each test,
which hangs until the test lets it answer, then lists the GPU, or nothing (the GPU fell off the bus).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

import vramsupply.gpu.devices as devices
import vramsupply.gpu.report as report
from live_server import LiveServer
from vramsupply.gpu.devices import Device, PresentGpu
from vramsupply.gpu.report import PlacementMonitor, describe_placement

PLATFORM_TIMEOUT = aiohttp.ClientTimeout(total=5.0)  # what the marketplace gives /health
CPU = Device("CPU", "AMD EPYC", "cpu", 64 << 30, 60 << 30)
CUDA0 = Device("CUDA0", "NVIDIA GeForce RTX 4090", "gpu", 24 << 30, 23 << 30)
RTX = PresentGpu("NVIDIA", "NVIDIA GeForce RTX 4090")
GONE = "GPU disappeared since start (NVIDIA GeForce RTX 4090 no longer listed by the driver): requests may fail or run on the CPU"


class FakeNvidiaSmi:
    """`nvidia-smi -L` that hangs (up to a minute) until told what to answer: "gpu" or "none"."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        folder.mkdir()
        self.asked, self.answer = folder / "asked", folder / "answer"
        script = folder / "nvidia-smi"
        script.write_text(
            "#!/bin/sh\n"
            f'touch "{self.asked}"\n'
            f'i=0; while [ ! -e "{self.answer}" ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n'
            f'if [ "$(cat "{self.answer}" 2>/dev/null)" = none ]; then echo "No devices were found"; exit 6; fi\n'
            'echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-1)"\n'
        )
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")

    def answers(self, what: str) -> None:
        self.answer.write_text(what)


@pytest.fixture
def smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvidiaSmi:
    return FakeNvidiaSmi(tmp_path / "bin", monkeypatch)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=PLATFORM_TIMEOUT) as session:
        yield session


def on_the_gpu() -> PlacementMonitor:
    """Where `vramsupply serve` found the model at start: all its layers on the RTX 4090."""
    return PlacementMonitor(describe_placement(32, 1 << 30, (8, 16), devices=[CUDA0, CPU], present=[RTX], gpu_backend=True))


async def health(http: aiohttp.ClientSession, server: LiveServer) -> dict:
    """What the platform's health check sees; a check slower than 5 s fails the test as it fails the provider."""
    async with http.get(server.url + "/health") as response:
        assert response.status == 200
        return await response.json()


async def until(condition: Callable[[], object], what: str, timeout: float = 30.0, poke: Callable[[], Awaitable[object]] | None = None) -> None:
    """Until ``condition``; ``poke``: what keeps it coming meanwhile (a health check, which starts
    the next GPU re-check as the platform's polls do)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        if poke is not None:
            await poke()
        await asyncio.sleep(0.05)


async def test_health_answers_while_nvidia_smi_hangs(smi: FakeNvidiaSmi, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "RECHECK_SECONDS", 0.0)  # every /health finds the re-check due
    async with LiveServer(parallel=1) as server:
        server.state.placement = on_the_gpu()
        try:
            first = await health(http, server)
            await until(smi.asked.exists, "the re-check to ask nvidia-smi")
            during = await health(http, server)  # nvidia-smi still has not answered
        finally:
            smi.answers("gpu")

    for seen in (first, during):
        assert seen["status"] == "ok"
        assert seen["placement"]["backend"] == "gpu" and seen["placement"]["devices"][0]["name"] == "CUDA0 (NVIDIA GeForce RTX 4090)"
        assert GONE not in seen["warnings"]


async def test_health_answers_while_request_work_fills_the_thread_pool(smi: FakeNvidiaSmi, http: aiohttp.ClientSession) -> None:
    """Tokenizing, big-body parsing and grammar building run in the loop's default executor: a
    burst of oversized prompts fills it. /health must not queue behind them."""
    smi.answers("gpu")
    work_done = threading.Event()
    async with LiveServer(parallel=1) as server:
        server.state.placement = on_the_gpu()

        async def burst() -> None:
            loop = asyncio.get_running_loop()
            for _ in range(64):  # more than the pool's workers (at most 32): all busy, the rest queued
                loop.run_in_executor(None, work_done.wait, 60)

        try:
            await server.acall(burst)
            seen = await health(http, server)
            models = await asyncio.gather(*(health(http, server) for _ in range(3)))
        finally:
            work_done.set()

    assert seen["status"] == "ok" and seen["placement"]["backend"] == "gpu"
    assert all(m["status"] == "ok" for m in models)


async def test_a_probe_that_times_out_keeps_the_gpu_and_a_real_loss_is_still_noticed(
    smi: FakeNvidiaSmi, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(report, "RECHECK_SECONDS", 0.0)
    monkeypatch.setattr(devices, "VENDOR_TOOL_SECONDS", 0.5)  # nvidia-smi gets half a second, not 10
    caplog.set_level(logging.DEBUG, logger="vramsupply.gpu.report")
    async with LiveServer(parallel=1) as server:
        server.state.placement = on_the_gpu()
        try:
            await health(http, server)
            await until(lambda: "nvidia-smi -L did not answer within 0.5 s" in caplog.text, "the re-check to time out")
            after_timeout = await health(http, server)

            checked = functools.partial(health, http, server)  # each starts a re-check, once the last has ended
            smi.answers("none")  # now the driver promptly lists no GPU at all
            await until(lambda: GONE in caplog.text, "the loss to be logged", poke=checked)
            after_loss = await health(http, server)

            smi.answers("gpu")  # back on the bus
            await until(lambda: "listed by the driver again" in caplog.text, "the GPU to be listed again", poke=checked)
            after_return = await health(http, server)
        finally:
            smi.answers("gpu")

    assert after_timeout["placement"]["backend"] == "gpu" and GONE not in after_timeout["warnings"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "could not re-check the GPUs" in r.getMessage()]
    assert len(warned) == 1 and "keeping the last known placement" in warned[0].getMessage()  # said once, not every 30 s
    assert after_loss["status"] == "ok" and GONE in after_loss["warnings"]
    assert GONE not in after_return["warnings"]
