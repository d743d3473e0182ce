#!/usr/bin/env python3
"""Where vramsupply's time goes at one stream (or several): the profile behind the README's account of c=1 and c=16.

Starts ``vramsupply serve`` at its defaults on the bench model, streams one 128-token completion
after another on each of ``--concurrency`` connections (as bench/run.py's levels do), and measures
while the load runs:

1. **CPU per token, per thread**, from ``/proc/PID/task/*/stat``: the decode threads, the event
   loop (the HTTP side), and the rest.
2. **Who holds the GIL** (``py-spy record --gil``): per thread, the share of the time it held the
   interpreter lock and the functions it held it in. The scheduler thread needs the GIL between two
   decodes; whatever the event loop does per token while holding it can delay the next decode.
3. **The scheduler thread's own time** (``py-spy record``): the share spent inside
   ``llama_decode`` against sampling, text and handing tokens over.

    bench/.cache/venv-llamacpp-server/bin/python bench/profile.py      # ~1 min; bench/results/<date>-profile-c1.json
    bench/.cache/venv-llamacpp-server/bin/python bench/profile.py --concurrency 16   # <date>-profile-c16.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_process import free_port, wait_healthy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BENCH_MODEL = REPO / "bench" / ".cache" / "bench-llama-768x12-q8_0.gguf"


class Load:
    """``concurrency`` streams of completions, one after another on each, on a background thread,
    counting streamed chunks."""

    def __init__(self, url: str, model: str, concurrency: int = 1) -> None:
        self.url, self.model, self.chunks, self._stop = url, model, 0, threading.Event()
        self.concurrency = concurrency
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await asyncio.gather(*(self._stream(http) for _ in range(self.concurrency)))

    async def _stream(self, http: aiohttp.ClientSession) -> None:
        body = {"model": self.model, "prompt": "Once upon a time", "max_tokens": 128, "temperature": 0, "stream": True, "ignore_eos": True}
        while not self._stop.is_set():
            async with http.post(self.url + "/v1/completions", json=body) as response:
                async for line in response.content:
                    self.chunks += line.startswith(b"data: {")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread, keyed by thread id and name."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{tid} {stat[stat.index('(') + 1 : stat.rindex(')')]}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def cpu_per_token(pid: int, load: Load, seconds: float) -> dict:
    before, chunks, started = thread_cpu(pid), load.chunks, time.perf_counter()
    time.sleep(seconds)
    after, tokens, elapsed = thread_cpu(pid), load.chunks - chunks, time.perf_counter() - started
    per_thread = {k: round(1000 * (after[k] - before.get(k, 0)) / max(tokens, 1), 3) for k in after}
    busy = {k: v for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1]) if v > 0}
    return {"tok_s": round(tokens / elapsed, 1), "wall_ms_per_token": round(1000 * elapsed / max(tokens, 1), 3), "cpu_ms_per_token": busy}


def py_spy(pid: int, seconds: float, gil: bool) -> dict:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        command = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f", "raw", "-o", str(raw), "--threads"]
        subprocess.run(command + (["--gil"] if gil else []), check=True, capture_output=True)
        return summarize(raw.read_text(), seconds * 250)


def summarize(raw: str, possible: float) -> dict:
    """Per thread: its share of all sample times, its top functions as leaf frames (where the time
    is spent) and inclusively (under which call: each function counted once per sample)."""
    totals: collections.Counter[str] = collections.Counter()
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    under: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        name = frames[0].split("): ", 1)[-1]  # "thread (TID): NAME"
        thread = "scheduler" if any("Scheduler._run" in f for f in frames) else {"MainThread": "event loop"}.get(name, name)
        totals[thread] += int(count)
        leaves[thread][frames[-1]] += int(count)
        for function in {f.split(" (")[0] for f in frames[1:]}:
            under[thread][function] += int(count)
    return {
        thread: {
            "share_of_time": round(n / possible, 3),
            "top": {f: round(c / n, 3) for f, c in leaves[thread].most_common(10)},
            "inclusive": {f: round(c / n, 3) for f, c in under[thread].most_common(16)},
        }
        for thread, n in totals.most_common(6)
    }


async def start(model: Path, port: int, vramsupply: Path) -> subprocess.Popen[bytes]:
    command = [str(vramsupply), "serve", "--model", str(model), "--no-register", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    async with aiohttp.ClientSession() as http:
        await wait_healthy(http, f"http://127.0.0.1:{port}", process)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BENCH_MODEL)
    parser.add_argument("--seconds", type=float, default=15, help="length of each of the three measurements")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply")
    parser.add_argument("--concurrency", type=int, default=1, help="streams at once (default 1)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>-profile-c<concurrency>.json)")
    args = parser.parse_args()
    port = free_port()
    process = asyncio.run(start(args.model, port, args.vramsupply))
    report = {"date": dt.date.today().isoformat(), "model": args.model.name, "load_avg_at_start": os.getloadavg(),
              "settings": "vramsupply serve defaults", "concurrency": args.concurrency, "cpus": os.cpu_count()}
    try:
        with Load(f"http://127.0.0.1:{port}", args.model.stem, args.concurrency) as load:
            time.sleep(3)  # warm up
            report["cpu"] = cpu_per_token(process.pid, load, args.seconds)
            report["gil"] = py_spy(process.pid, args.seconds, gil=True)
            report["threads"] = py_spy(process.pid, args.seconds, gil=False)
    finally:
        process.terminate()
        process.wait(30)
    report["load_avg_at_end"] = os.getloadavg()
    out = args.out or REPO / "bench" / "results" / f"{report['date']}-profile-c{args.concurrency}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
