#!/usr/bin/env python3
"""Soak: the platform flaps for ten minutes while buyers keep the agent busy.

The real agent (`vramsupply serve`, a child process) registers with the reference platform
(`vramsupply.devplatform`) through a flaky front that, at random, answers 5xx, answers only after
the agent's client has timed out, refuses connections (it stops listening for a while), and
forgets the agent (deletes its registration, so the next heartbeat gets 404). Meanwhile buyers
send a steady load straight to the agent, and bursts of streams are cut mid-way by their buyers.

Expected: 0 failed buyer requests (serving never depends on the platform), a fresh registration
after every time the platform forgot the agent, and, once the platform has calmed down, 1,000
streams cut mid-way by their buyers leaving every slot idle within 5 s and the agent's RSS grown
less than 5 %; SIGTERM then deregisters and exits 0.

usage: .venv/bin/python bench/soak.py [--minutes 10] [--model vramsupply/assets/stories260K.gguf]
Results: bench/results/soak-<date>.json, and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform as host_platform
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from agent_process import free_port, wait_healthy

from vramsupply.devplatform import DevPlatform, PlatformOptions
from vramsupply.platform import api

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "vramsupply" / "assets" / "stories260K.gguf"
API_KEY = "sk-soak-0123456789abcdef"
FAULTS = ("ok", "5xx", "timeout", "refuse", "forget")
FAULT_WEIGHTS = (0.55, 0.15, 0.1, 0.1, 0.1)
CLIENT_TIMEOUT = 10.0  # the agent's platform client gives up after this (PlatformClient's default)
CUT_STREAMS = 1000


class FlakyFront:
    """A reverse proxy to the reference platform that misbehaves in the ways real networks do."""

    def __init__(self, platform: DevPlatform, port: int, rng: random.Random) -> None:
        self.platform = platform
        self.port = port
        self.rng = rng
        self.faults: Counter[str] = Counter()
        self.forgotten_at: list[float] = []
        self.registered_at: list[float] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.refusing_until = 0.0
        self.calm = False
        """Once set (the soak is over), every request is forwarded untouched."""

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()

    async def refuse_for(self, seconds: float) -> None:
        """Stop listening (connection refused), then listen again on the same port."""
        assert self._runner is not None
        for site in list(self._runner.sites):
            await site.stop()
        self.refusing_until = time.monotonic() + seconds
        await asyncio.sleep(seconds)
        await self._listen()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        fault = "ok" if self.calm or request.method == "DELETE" else self.rng.choices(FAULTS, FAULT_WEIGHTS)[0]
        heartbeat = request.path.endswith("/heartbeat")
        if fault == "forget" and heartbeat:
            self.faults[fault] += 1
            self.forgotten_at.append(time.monotonic())
            self.platform.store.providers.clear()
        elif fault == "5xx":
            self.faults[fault] += 1
            return web.json_response({"error": {"message": "flaky front: injected 503"}}, status=503)
        elif fault == "timeout":
            self.faults[fault] += 1
            await asyncio.sleep(CLIENT_TIMEOUT + 1)
        elif fault == "refuse" and time.monotonic() > self.refusing_until:
            self.faults[fault] += 1
            self.refusing_until = float("inf")
            asyncio.get_running_loop().create_task(self.refuse_for(self.rng.uniform(2, 8)))
            return web.json_response({"error": {"message": "flaky front: going away"}}, status=502)
        assert self._http is not None
        async with self._http.request(request.method, self.platform.url + request.path_qs, headers=request.headers, data=await request.read()) as upstream:
            body = await upstream.read()
            if request.path == api.REGISTER_PATH and upstream.status < 300:
                self.registered_at.append(time.monotonic())
            return web.Response(body=body, status=upstream.status, content_type=upstream.content_type)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def buyer(http: aiohttp.ClientSession, url: str, token: str, until: float, outcomes: Counter[str], rng: random.Random) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < until:
        body = {"prompt": rng.choice(["Once upon a time", "The dog", "Tim had a ball"]), "max_tokens": rng.randint(4, 48), "stream": rng.random() < 0.5}
        try:
            async with http.post(url + "/v1/completions", json=body, headers=headers) as response:
                await response.read()
                outcomes["ok" if response.status == 200 else f"http {response.status}"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            outcomes[f"{type(exc).__name__}"] += 1


async def cut_stream(http: aiohttp.ClientSession, url: str, token: str) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with http.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}) as response:
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"data: {")
            if seen >= 3:
                return


async def cut_streams(http: aiohttp.ClientSession, url: str, token: str, count: int, pid: int) -> dict[str, Any]:
    """``count`` streams, 16 at a time, each cut by its buyer after 3 chunks."""
    rss_before = rss_bytes(pid)
    semaphore = asyncio.Semaphore(16)

    async def one() -> None:
        async with semaphore:
            await cut_stream(http, url, token)

    await asyncio.gather(*(one() for _ in range(count)))
    cut_at = time.monotonic()
    idle_after = None
    while time.monotonic() - cut_at < 30:
        async with http.get(url + "/health") as response:
            health = await response.json()
        if health.get("slots_busy") == 0 and health.get("queue") == 0:
            idle_after = time.monotonic() - cut_at
            break
        await asyncio.sleep(0.05)
    rss_after = rss_bytes(pid)
    return {
        "streams": count,
        "all_slots_idle_after_s": None if idle_after is None else round(idle_after, 3),
        "rss_before_mb": round(rss_before / 1e6, 1),
        "rss_after_mb": round(rss_after / 1e6, 1),
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
    }


async def soak(minutes: float, model: Path, seed: int, cut_count: int = CUT_STREAMS) -> dict[str, Any]:
    rng = random.Random(seed)
    platform = DevPlatform(api_key=API_KEY, options=PlatformOptions(health_interval=3600))
    await platform.start()
    front = FlakyFront(platform, free_port(), rng)
    await front.start()
    agent_port = free_port()
    agent_url = f"http://127.0.0.1:{agent_port}"
    log_path = REPO / "bench" / ".cache" / "soak-agent.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_ENDPOINT_TOKEN": "soak-token"}
    command = [
        sys.executable, "-m", "vramsupply", "serve", "--model", str(model), "--port", str(agent_port),
        "--platform-url", f"http://127.0.0.1:{front.port}", "--endpoint-url", agent_url, "--heartbeat-interval", "1",
    ]
    with log_path.open("wb") as log:
        agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    outcomes: Counter[str] = Counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            await wait_healthy(http, agent_url, agent, what=f"the agent (log: {log_path})")
            started = time.monotonic()
            until = started + minutes * 60
            buyers = [asyncio.create_task(buyer(http, agent_url, "soak-token", until, outcomes, random.Random(seed + i))) for i in range(4)]
            await asyncio.gather(*buyers)
            elapsed = time.monotonic() - started
            # The platform calms down: the agent must be registered again within its backoff cap.
            front.calm = True
            settle_until = time.monotonic() + 90
            while time.monotonic() < settle_until and not platform.store.providers:
                await asyncio.sleep(0.5)
            registered_at_end = bool(platform.store.providers)
            cut = await cut_streams(http, agent_url, "soak-token", cut_count, agent.pid)
    finally:
        agent.terminate()
        code = agent.wait(60)
        deregistered = not platform.store.providers
        await front.stop()
        await platform.stop()
    forgets, registrations = front.forgotten_at, front.registered_at
    re_registered = [min((r - f for r in registrations if r > f), default=None) for f in forgets]
    delays = sorted(d for d in re_registered if d is not None)
    failed = sum(n for outcome, n in outcomes.items() if outcome != "ok")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": host_platform.platform(), "load_average": os.getloadavg()},
        "model": model.name,
        "minutes": round(elapsed / 60, 2),
        "seed": seed,
        "buyer_requests": sum(outcomes.values()),
        "buyer_outcomes": dict(outcomes),
        "failed_buyer_requests": failed,
        "platform_faults": dict(front.faults),
        "forgotten": len(forgets),
        "registrations": len(registrations),
        "every_forget_followed_by_a_registration": all(delay is not None for delay in re_registered),
        "re_registration_delay_s": {"median": round(delays[len(delays) // 2], 2) if delays else None, "max": round(delays[-1], 2) if delays else None},
        "registered_at_the_end": registered_at_end,
        "cut_streams": cut,
        "agent_exit_code": code,
        "deregistered_on_sigterm": deregistered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", type=Path, default=TINY_MODEL)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--cut-streams", type=int, default=CUT_STREAMS)
    args = parser.parse_args()
    report = asyncio.run(soak(args.minutes, args.model, args.seed, args.cut_streams))
    out = REPO / "bench" / "results" / f"soak-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
