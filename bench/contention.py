#!/usr/bin/env python3
"""Both servers at their defaults on a machine that is busy with something else.

A provider's CPU box may run other work. Each server is started at its defaults on the bench
model, then measured at c = 1 and 4 (2 x c requests of 64 tokens) alone and beside busy
processes in a session of their own (``while True: pass``; the kernel groups threads by session,
so on a 2-core VM one busy program leaves each server about one core and a half, two about one).
``vramsupply-pinned`` is vramsupply with ``--threads`` set to the physical cores: the default
threads, without the tuner that lowers them while the CPUs are busy (``engine/thread_tuner.py``).
Prints the tok/s, and writes them with vramsupply's ``vramsupply_cpu_threads`` after each level.

``--quota CPUS`` starts every server inside a cgroup v1 CPU group limited to that many CPUs' time
(as ``docker run --cpus``; needs root and a writable ``/sys/fs/cgroup/cpu``). There
``vramsupply-pinned`` is vramsupply's default before it read the quota: a thread per core.

    bench/.cache/venv-llamacpp-server/bin/python bench/contention.py --out bench/results/DATE-contention.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client import eos_token_id, request_bodies, run_level  # noqa: E402
from servers import BENCH_MODEL, REPO, SERVERS, decode_threads, defaults_config, machine_info, running_server, wait_ready  # noqa: E402

LEVELS = (1, 4)
NAMES = ("vramsupply", "llama-server", "vramsupply-pinned")
V1_CPU = Path("/sys/fs/cgroup/cpu")


@contextlib.contextmanager
def quota_group(cpus: float | None) -> Iterator[Path | None]:
    """A cgroup v1 CPU group with a quota of ``cpus`` CPUs per 100 ms period, removed afterwards."""
    if cpus is None:
        yield None
        return
    group = V1_CPU / f"vramsupply-bench-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_quota_us").write_text(str(round(cpus * int((group / "cpu.cfs_period_us").read_text()))))
        yield group
    finally:
        time.sleep(0.5)  # the server's processes have left it
        group.rmdir()


def in_group(spec, group: Path | None):
    """``spec`` whose command first moves its shell into ``group`` (its children inherit it)."""
    if group is None:
        return spec
    inner = spec.command
    shell = f'echo $$ > {group}/cgroup.procs && exec "$@"'
    return dataclasses.replace(spec, command=lambda cfg, model, port: ["sh", "-c", shell, "sh", *inner(cfg, model, port)])


def hogs(count: int) -> list[subprocess.Popen]:
    """Busy programs in a session of their own (so the kernel schedules them as a group apart)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(count)]


async def tok_s(server, concurrency: int, eos_id: int) -> float:
    bodies = request_bodies(server.spec, 2 * concurrency, 64, eos_id)
    results, wall_s = await run_level(server.url, bodies, concurrency)
    return round(sum(r.completion_tokens for r in results) / wall_s, 1)


async def cpu_threads(server) -> int | None:
    """vramsupply's decode threads now, from /metrics (None for other servers)."""
    if server.spec.name != "vramsupply":
        return None
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith("vramsupply_cpu_threads "):
                return int(float(line.split()[1]))
    return None


async def measure(name: str, eos_id: int, threads: int | None, busy_counts: tuple[int, ...], group: Path | None) -> dict[str, dict]:
    """One server at its defaults (but ``threads``, if given): every level alone, then every level
    beside each count of busy programs."""
    cfg = defaults_config(BENCH_MODEL, REPO / ".venv" / "bin" / "vramsupply")
    if name == "vramsupply-pinned":
        threads = threads or decode_threads()
    if threads:
        cfg = dataclasses.replace(cfg, threads=threads, pin_threads=True)
    results = {}
    with running_server(in_group(SERVERS[name.removesuffix("-pinned")], group), cfg, BENCH_MODEL) as server:
        await wait_ready(server)
        await tok_s(server, 1, eos_id)  # warm-up
        for count in busy_counts:
            busy = hogs(count)
            time.sleep(0.5)
            try:
                level = {c: await tok_s(server, c, eos_id) for c in LEVELS}
                level["cpu_threads_after"] = await cpu_threads(server)
            finally:
                for process in busy:
                    process.kill()
            results[f"{name} hogs={count}"] = level
            print(f"{name:18} beside {count} busy programs: {level}", flush=True)
    return results


async def main(args: argparse.Namespace) -> None:
    eos_id = eos_token_id(BENCH_MODEL)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "model": BENCH_MODEL.name,
        "load": "every server at its defaults (vramsupply-pinned: --threads = the physical cores); c=1 and c=4, 2 x c requests of 64 tokens",
        "threads": args.threads,
        "cgroup_cpu_quota": args.quota,
        "tok_s": {},
    }
    busy_counts = tuple(int(n) for n in args.busy.split(","))
    for name in args.servers.split(","):
        with quota_group(args.quota) as group:
            report["tok_s"].update(await measure(name, eos_id, args.threads, busy_counts, group))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["tok_s"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="give every server this many threads (default: their own defaults)")
    parser.add_argument("--servers", default=",".join(NAMES), help=f"comma-separated, of {', '.join(NAMES)}")
    parser.add_argument("--busy", default="0,1,2", help="counts of busy programs to measure beside (default 0,1,2)")
    parser.add_argument("--quota", type=float, help="run every server in a cgroup v1 CPU group limited to this many CPUs")
    parser.add_argument("--out", help="write the results here as JSON")
    asyncio.run(main(parser.parse_args()))
