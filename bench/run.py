#!/usr/bin/env python3
"""Benchmark vramsupply's OpenAI endpoint against llama.cpp's llama-server and llama-cpp-python's server.

Every server serves the same GGUF with the same slots, per-slot context and threads. The load is
streaming POST /v1/completions (temperature 0, ignore_eos, max_tokens 128, a short prompt) at
concurrency 1, 4 and 16 with 2×c requests per level and a new connection per request.

Absolute numbers differ between machines and runs, so the targets are checked as ratios of numbers
taken in this one run. To keep a busy machine from deciding a ratio, all servers of a model run
side by side (idle ones cost nothing) and are measured in turn, level by level, in a rotated order;
the sweep is repeated for several rounds and each (server, level, metric) reports its best round,
the one least slowed by other processes. Every round's numbers, and the CPU other processes used
during each measurement, are kept in the JSON.

Prepare with `bench/build_anchors.sh`, then run with the bench venv it creates:
    bench/.cache/venv-llamacpp-server/bin/python bench/run.py            # full run, writes bench/results/
    bench/.cache/venv-llamacpp-server/bin/python bench/run.py --quick    # smoke run, writes bench/.cache/quick/
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from gguf import GGUFReader

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"
LLAMA_CPP_VERSION = importlib.metadata.version("llama-cpp-python")
LLAMA_CPP_DIR = CACHE / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
LLAMA_BIN = LLAMA_CPP_DIR / "build" / "bin"
BENCH_MODEL = CACHE / "bench-llama-768x12-q8_0.gguf"
TINY_MODEL = REPO / "vramsupply" / "assets" / "stories260K.gguf"
PROMPTS = ("Once upon a time", "The little dog", "In a small town", "She opened the door")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class BenchConfig:
    """One run's knobs: the same values go to every server."""

    models: tuple[Path, ...]
    servers: tuple[str, ...]
    concurrency: tuple[int, ...]
    requests_per_slot: int
    max_tokens: int
    rounds: int
    parallel: int
    context_per_slot: int
    threads: int
    vramsupply_bin: Path
    defaults: bool = False  # start every server with no tuning flags at all (what a new user runs)
    pin_threads: bool = False  # with defaults: still give every server --threads (a shared, oversubscribed machine)


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server under test, and what it understands."""

    name: str
    mode: str
    ready_path: str
    accepts_ignore_eos: bool
    command: Callable[[BenchConfig, Path, int], list[str]]


def vramsupply_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
    if cfg.defaults:
        tuned = ["--threads", str(cfg.threads)] if cfg.pin_threads else []
        return [str(cfg.vramsupply_bin), "serve", "--model", str(model), "--no-register", "--host", HOST, "--port", str(port), *tuned]
    return [
        # One KV cache of parallel x context_per_slot tokens shared by the slots, as llama-server's -c.
        str(cfg.vramsupply_bin), "serve", "--model", str(model), "--parallel", str(cfg.parallel),
        "--context-length", str(cfg.parallel * cfg.context_per_slot), "--threads", str(cfg.threads),
        "--no-register", "--host", HOST, "--port", str(port),
    ]


def llama_server_command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
    if cfg.defaults:
        tuned = ["-t", str(cfg.threads), "-tb", str(cfg.threads)] if cfg.pin_threads else []
        return [str(LLAMA_BIN / "llama-server"), "-m", str(model), "--host", HOST, "--port", str(port), *tuned]
    return [
        str(LLAMA_BIN / "llama-server"), "-m", str(model), "-np", str(cfg.parallel),
        "-c", str(cfg.parallel * cfg.context_per_slot), "-t", str(cfg.threads), "-tb", str(cfg.threads),
        "--host", HOST, "--port", str(port),
    ]


def llama_cpp_server_command(interrupt: bool) -> Callable[[BenchConfig, Path, int], list[str]]:
    def command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        if cfg.defaults:
            tuned = ["--n_threads", str(cfg.threads), "--n_threads_batch", str(cfg.threads)] if cfg.pin_threads else []
            return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--interrupt_requests", str(interrupt),
                    "--host", HOST, "--port", str(port), *tuned]
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--n_ctx", str(cfg.context_per_slot), "--n_threads", str(cfg.threads),
            "--n_threads_batch", str(cfg.threads), "--interrupt_requests", str(interrupt),
            "--host", HOST, "--port", str(port),
        ]

    return command


SERVERS = {
    spec.name: spec
    for spec in (
        ServerSpec("vramsupply", "continuous batching, --parallel slots", "/health", True, vramsupply_command),
        ServerSpec("llama-server", "continuous batching, -np slots", "/health", True, llama_server_command),
        ServerSpec(
            "llama_cpp.server", "--interrupt_requests False: one request at a time, others queue",
            "/v1/models", False, llama_cpp_server_command(interrupt=False),
        ),
        ServerSpec(
            "llama_cpp.server-interrupt", "default: a new request cuts off the running one",
            "/v1/models", False, llama_cpp_server_command(interrupt=True),
        ),
    )
}


@dataclass
class RequestResult:
    ttft_s: float | None = None
    completion_tokens: int = 0
    tokens_counted_by: str = "chunks"
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class LevelResult:
    """One measurement: one server at one concurrency in one round."""

    round: int
    concurrency: int
    requests: int
    completed: int
    cut_off: int
    errors: int
    completion_tokens: int
    wall_s: float
    tok_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    peak_rss_mb: float
    server_cpu_s: float
    client_cpu_s: float
    other_cpu_cores: float
    tokens_counted_by: str
    first_error: str | None = None


class ProcessTreeMonitor:
    """Samples the RSS and CPU time of a process and all its descendants on a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self._root = psutil.Process(pid)
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._peak_total = 0
        self._peak_window = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sample_rss(self) -> int:
        total = 0
        for proc in self._tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self._tree():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._record(self._sample_rss())

    def _record(self, rss: int) -> None:
        with self._lock:
            self._peak_total = max(self._peak_total, rss)
            self._peak_window = max(self._peak_window, rss)

    def start_window(self) -> None:
        """Start a new measuring window; sampled at both ends so even a very short window has a value."""
        with self._lock:
            self._peak_window = 0
        self._record(self._sample_rss())

    def window_peak_mb(self) -> float:
        self._record(self._sample_rss())
        with self._lock:
            return self._peak_window / 2**20

    def total_peak_mb(self) -> float:
        with self._lock:
            return self._peak_total / 2**20

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class RunningServer:
    spec: ServerSpec
    proc: subprocess.Popen
    url: str
    command: list[str]
    log_path: Path
    monitor: ProcessTreeMonitor
    load_s: float = 0.0
    levels: list[LevelResult] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(spec: ServerSpec, cfg: BenchConfig, model: Path) -> Iterator[RunningServer]:
    """Start a server in its own session (so Ctrl-C reaches only the bench) and always stop it."""
    port = free_port()
    command = spec.command(cfg, model, port)
    log_path = CACHE / "logs" / f"{model.stem}-{spec.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    monitor = ProcessTreeMonitor(proc.pid)
    try:
        yield RunningServer(spec, proc, f"http://{HOST}:{port}", command, log_path, monitor)
    finally:
        monitor.stop()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_ready(server: RunningServer, timeout_s: float = 300) -> None:
    url = server.url + server.spec.ready_path
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                tail = server.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{server.spec.name} exited with {server.proc.returncode} before it was ready:\n{tail}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s (log: {server.log_path})")


def eos_token_id(model: Path) -> int:
    eos = GGUFReader(model).fields["tokenizer.ggml.eos_token_id"]
    return int(eos.parts[eos.data[0]][0])


def request_bodies(spec: ServerSpec, count: int, max_tokens: int, eos_id: int) -> list[dict]:
    """Distinct short prompts; where a server lacks ignore_eos, ban EOS by logit bias (what ignore_eos does)."""
    bodies = []
    for i in range(count):
        body = {
            "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}",
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if spec.accepts_ignore_eos:
            body["ignore_eos"] = True
        else:
            body["logit_bias"] = {str(eos_id): -100}
        bodies.append(body)
    return bodies


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    """One streaming completion; TTFT is the time to the first chunk carrying text.

    Tokens come from the usage chunk when the server sends one. Otherwise a request that ended
    with finish_reason "length" produced exactly max_tokens, and a cut-off one is counted by its
    text chunks (a server may merge tokens into one chunk, so that count can be low).
    """
    result = RequestResult()
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:"):].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"in-stream error: {json.dumps(chunk['error'])[:200]}"
                    break
                if chunk.get("usage"):
                    result.completion_tokens = chunk["usage"]["completion_tokens"]
                    result.tokens_counted_by = "usage"
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - start
                        if result.tokens_counted_by == "chunks":
                            result.completion_tokens += 1
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if result.tokens_counted_by == "chunks" and result.finish_reason == "length":
        result.completion_tokens = body["max_tokens"]
        result.tokens_counted_by = "finish_reason"
    return result


async def run_level(url: str, bodies: list[dict], concurrency: int) -> tuple[list[RequestResult], float]:
    """Keep `concurrency` requests in flight until every body is sent; a new connection per request."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:

        async def worker() -> None:
            while not queue.empty():
                results.append(await stream_completion(session, url, queue.get_nowait()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - start
    return results, wall_s


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far, all processes together."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


async def measure(server: RunningServer, cfg: BenchConfig, round_index: int, concurrency: int, eos_id: int) -> LevelResult:
    """One level against one server, with the CPU that the server, this client and everything else used."""
    bodies = request_bodies(server.spec, cfg.requests_per_slot * concurrency, cfg.max_tokens, eos_id)
    client = psutil.Process()
    server.monitor.start_window()
    server_cpu, client_cpu, machine_cpu = server.monitor.cpu_seconds(), client.cpu_times(), busy_cpu_seconds()
    results, wall_s = await run_level(server.url, bodies, concurrency)
    server_cpu = server.monitor.cpu_seconds() - server_cpu
    client_now = client.cpu_times()
    client_cpu = (client_now.user + client_now.system) - (client_cpu.user + client_cpu.system)
    other_cpu = max(0.0, busy_cpu_seconds() - machine_cpu - server_cpu - client_cpu)

    ok = [r for r in results if r.error is None]
    completed = [r for r in ok if r.finish_reason == "length"]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return LevelResult(
        round=round_index,
        concurrency=concurrency,
        requests=len(results),
        completed=len(completed),
        cut_off=len(ok) - len(completed),
        errors=len(errors),
        completion_tokens=tokens,
        wall_s=round(wall_s, 3),
        tok_s=round(tokens / wall_s, 1),
        ttft_p50_ms=percentile_ms(ttfts, 50),
        ttft_p95_ms=percentile_ms(ttfts, 95),
        peak_rss_mb=round(server.monitor.window_peak_mb(), 1),
        server_cpu_s=round(server_cpu, 2),
        client_cpu_s=round(client_cpu, 2),
        other_cpu_cores=round(other_cpu / wall_s, 2),
        tokens_counted_by=",".join(sorted({r.tokens_counted_by for r in ok})) or "-",
        first_error=errors[0] if errors else None,
    )


async def prepare(servers: list[RunningServer], cfg: BenchConfig, eos_id: int) -> None:
    """Wait until every server is ready, then warm each up alone and at full width
    (the first decodes of a new batch shape are slow everywhere)."""
    for server in servers:
        started = time.perf_counter()
        await wait_ready(server)
        server.load_s = round(time.perf_counter() - started, 2)
    for server in servers:
        await run_level(server.url, request_bodies(server.spec, 1, 16, eos_id), 1)
        await run_level(server.url, request_bodies(server.spec, max(cfg.concurrency), 8, eos_id), max(cfg.concurrency))


def raw_decode_limit(cfg: BenchConfig, model: Path, shared_kv: bool = False) -> dict[int, float]:
    """llama-batched-bench on the same build: decode speed with no server in the way.

    By default each sequence gets its own stream of the KV cache, and attends only to its own
    cells: the stretch target's reference. With ``shared_kv`` (``-kvu``) the sequences share one
    cache, the layout of both servers at their defaults (so that one request may use the whole
    context): every token then scans every used cell of all of them, masked."""
    command = [
        str(LLAMA_BIN / "llama-batched-bench"), "-m", str(model), "-c", str(cfg.parallel * cfg.context_per_slot),
        "-b", "2048", "-ub", "512", "-npp", "8", "-ntg", str(cfg.max_tokens),
        "-npl", ",".join(str(c) for c in cfg.concurrency), "-t", str(cfg.threads), "-tb", str(cfg.threads),
        "--output-format", "jsonl", *(["-kvu"] if shared_kv else []),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["pl"]: round(row["speed_tg"], 1) for row in rows}


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 1) if values else None


def best_of_rounds(levels: list[dict]) -> dict:
    """A (server, level) over all rounds. Other processes only ever slow a server down, so each
    metric's best round is the closest to what the server can do: the highest tok/s, the lowest
    TTFTs. Memory is the other way round: the largest RSS seen. Medians and every round's values
    stay alongside."""
    tok_s = [lvl["tok_s"] for lvl in levels]
    ttft_p50 = [lvl["ttft_p50_ms"] for lvl in levels if lvl["ttft_p50_ms"] is not None]
    ttft_p95 = [lvl["ttft_p95_ms"] for lvl in levels if lvl["ttft_p95_ms"] is not None]
    return {
        "concurrency": levels[0]["concurrency"],
        "tok_s": max(tok_s),
        "ttft_p50_ms": min(ttft_p50, default=None),
        "ttft_p95_ms": min(ttft_p95, default=None),
        "peak_rss_mb": max(lvl["peak_rss_mb"] for lvl in levels),
        "requests": sum(lvl["requests"] for lvl in levels),
        "completed": sum(lvl["completed"] for lvl in levels),
        "cut_off": sum(lvl["cut_off"] for lvl in levels),
        "errors": sum(lvl["errors"] for lvl in levels),
        "tok_s_median": median(tok_s),
        "ttft_p50_ms_median": median(ttft_p50),
        "tok_s_rounds": tok_s,
        "ttft_p50_ms_rounds": [lvl["ttft_p50_ms"] for lvl in levels],
        "other_cpu_cores_max": max(lvl["other_cpu_cores"] for lvl in levels),
    }


def summarize(model_report: dict, concurrency: list[int]) -> None:
    """Fill in the best-of-rounds numbers and the targets from the rounds a model's report holds."""
    for key in ("raw_decode", "raw_decode_shared_kv"):
        raw_rounds = model_report.get(f"{key}_rounds") or []
        model_report[key] = [{"concurrency": c, "tok_s": max(r[str(c)] for r in raw_rounds)} for c in concurrency] if raw_rounds else []
    for server in model_report["servers"].values():
        server["levels"] = [best_of_rounds([lvl for lvl in server["rounds"] if lvl["concurrency"] == c]) for c in concurrency]
    model_report["targets"] = check_targets(model_report["servers"], concurrency) + stretch_target(model_report)


def stretch_target(model_report: dict) -> list[dict]:
    """Stretch: c=16 tok/s at least 0.95x the raw decode limit (llama-batched-bench) of the same run;
    the ratio to the raw decode with the servers' own KV layout (one shared cache) alongside."""
    ours = level_of(model_report["servers"].get("vramsupply"), 16)
    raw = next((r["tok_s"] for r in model_report["raw_decode"] if r["concurrency"] == 16), None)
    if not ours or not raw:
        return []
    ratio = round(ours["tok_s"] / raw, 3)
    shared = next((r["tok_s"] for r in model_report.get("raw_decode_shared_kv", []) if r["concurrency"] == 16), None)
    return [{"target": "c=16 tok_s >= 0.95x raw decode (stretch)", "vramsupply": ours["tok_s"], "raw decode": raw,
             "ratio": ratio, "met": ratio >= 0.95, "ratio_of_medians": None, "raw decode, shared KV": shared,
             "ratio_to_shared_kv": round(ours["tok_s"] / shared, 3) if shared else None}]


def level_of(server: dict | None, concurrency: int) -> dict | None:
    if server is None:
        return None
    return next((lvl for lvl in server["levels"] if lvl["concurrency"] == concurrency), None)


def check_targets(servers: dict[str, dict], concurrency: list[int]) -> list[dict]:
    """The engine issue's targets as ratios vramsupply/reference from this run's best rounds (the
    ratio of medians alongside); skipped where a side is missing."""
    wanted = [("tok_s", c, "llama-server", ">=", 1.0) for c in concurrency]
    wanted += [("tok_s", 16, "llama_cpp.server", ">=", 4.0)]
    wanted += [("ttft_p50_ms", c, "llama-server", "<=", 1.1) for c in concurrency]
    targets = []
    for metric, c, reference, op, bound in wanted:
        ours, theirs = level_of(servers.get("vramsupply"), c), level_of(servers.get(reference), c)
        if not ours or not theirs or not ours[metric] or not theirs[metric]:
            continue
        ratio = round(ours[metric] / theirs[metric], 3)
        ours_median, theirs_median = ours[f"{metric}_median"], theirs[f"{metric}_median"]
        targets.append({
            "target": f"c={c} {metric} {op} {bound}x {reference}",
            "vramsupply": ours[metric], reference: theirs[metric], "ratio": ratio,
            "met": ratio >= bound if op == ">=" else ratio <= bound,
            "ratio_of_medians": round(ours_median / theirs_median, 3) if ours_median and theirs_median else None,
        })
    return targets


async def bench_model(cfg: BenchConfig, model: Path) -> dict:
    eos_id = eos_token_id(model)
    raw_rounds: list[dict[int, float]] = []
    shared_rounds: list[dict[int, float]] = []
    with ExitStack() as stack:
        servers = [stack.enter_context(running_server(SERVERS[name], cfg, model)) for name in cfg.servers]
        await prepare(servers, cfg, eos_id)
        for round_index in range(cfg.rounds):
            print(f"{model.name}, round {round_index + 1} of {cfg.rounds}, load average {os.getloadavg()[0]:.2f}", flush=True)
            raw_rounds.append(await asyncio.to_thread(raw_decode_limit, cfg, model))
            shared_rounds.append(await asyncio.to_thread(raw_decode_limit, cfg, model, True))
            print("  raw decode limit: " + ", ".join(f"c={c} {v} tok/s" for c, v in raw_rounds[-1].items())
                  + "; one shared KV cache: " + ", ".join(f"c={c} {v}" for c, v in shared_rounds[-1].items()), flush=True)
            shift = round_index % len(servers)
            for concurrency in cfg.concurrency:
                for server in servers[shift:] + servers[:shift]:
                    level = await measure(server, cfg, round_index, concurrency, eos_id)
                    server.levels.append(level)
                    print(f"  {server.spec.name:28} c={concurrency:<3} {level.tok_s:8.1f} tok/s  "
                          f"TTFT p50 {level.ttft_p50_ms} ms  p95 {level.ttft_p95_ms} ms  RSS {level.peak_rss_mb:.0f} MB  "
                          f"done {level.completed}/{level.requests}  others {level.other_cpu_cores} cores", flush=True)
        servers_report = {
            server.spec.name: {
                "mode": server.spec.mode,
                "command": server.command,
                "load_s": server.load_s,
                "peak_rss_mb": round(server.monitor.total_peak_mb(), 1),
                "rounds": [asdict(lvl) for lvl in server.levels],
            }
            for server in servers
        }
    report = {
        "path": str(model),
        "size_mb": round(model.stat().st_size / 2**20, 1),
        "raw_decode_rounds": [{str(c): v for c, v in r.items()} for r in raw_rounds],
        "raw_decode_shared_kv_rounds": [{str(c): v for c, v in r.items()} for r in shared_rounds],
        "servers": servers_report,
    }
    summarize(report, list(cfg.concurrency))
    return report


def run_text(command: list[str]) -> str:
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    except OSError as exc:
        return f"unavailable: {exc}"
    return (done.stdout + done.stderr).strip()


def machine_info() -> dict:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def versions(cfg: BenchConfig) -> dict:
    return {
        "vramsupply": run_text([str(cfg.vramsupply_bin), "--version"]),
        "vramsupply_git": run_text(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "llama-cpp-python": LLAMA_CPP_VERSION,
        "llama.cpp_commit": run_text(["git", "-C", str(LLAMA_CPP_DIR), "rev-parse", "HEAD"]),
        "llama-server": run_text([str(LLAMA_BIN / "llama-server"), "--version"]).splitlines()[-2:],
        "aiohttp_client": aiohttp.__version__,
    }


def markdown_table(report: dict) -> str:
    heading = (f"Best of {report['config']['rounds']} round(s) per server, level and metric "
               "(highest tok/s, lowest TTFT, largest RSS); completed counts all rounds.")
    lines = [heading, ""]
    for model, data in report["models"].items():
        lines += [f"**{model}** ({data['size_mb']} MB)", "",
                  "| server | c | tok/s | TTFT p50 | TTFT p95 | peak RSS | completed |", "|---|---|---|---|---|---|---|"]
        for row in data["raw_decode"]:
            lines.append(f"| raw decode (llama-batched-bench) | {row['concurrency']} | {row['tok_s']} | – | – | – | – |")
        for row in data.get("raw_decode_shared_kv", []):
            lines.append(f"| raw decode, one shared KV cache (`-kvu`) | {row['concurrency']} | {row['tok_s']} | – | – | – | – |")
        for name, server in data["servers"].items():
            for lvl in server["levels"]:
                lines.append(f"| {name} | {lvl['concurrency']} | {lvl['tok_s']} | {lvl['ttft_p50_ms']} ms | "
                             f"{lvl['ttft_p95_ms']} ms | {lvl['peak_rss_mb']:.0f} MB | {lvl['completed']}/{lvl['requests']} |")
        if data["targets"]:
            lines += ["", "| target | ratio (best rounds) | | ratio of medians |", "|---|---|---|---|"]
            lines += [f"| {t['target']} | {t['ratio']} | {'met' if t['met'] else 'MISSED'} | {t['ratio_of_medians']} |"
                      for t in data["targets"]]
            lines += [f"| (c=16 against the raw decode with one shared KV cache, both servers' layout) | {t['ratio_to_shared_kv']} | – | – |"
                      for t in data["targets"] if t.get("ratio_to_shared_kv")]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    concurrency = report["config"]["concurrency"]
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        data = report["models"][model]
        for name, server in data["servers"].items():
            if name == "llama_cpp.server-interrupt":
                continue  # its streams are cut off, so its numbers do not describe served requests
            cs = [lvl["concurrency"] for lvl in server["levels"]]
            row[0].plot(cs, [lvl["tok_s"] for lvl in server["levels"]], marker="o", label=name)
            row[1].plot(cs, [lvl["ttft_p50_ms"] for lvl in server["levels"]], marker="o", label=name)
            row[2].plot(cs, [lvl["peak_rss_mb"] for lvl in server["levels"]], marker="o", label=name)
        row[0].plot([r["concurrency"] for r in data["raw_decode"]], [r["tok_s"] for r in data["raw_decode"]],
                    linestyle="--", color="grey", label="raw decode limit")
        if data.get("raw_decode_shared_kv"):
            row[0].plot([r["concurrency"] for r in data["raw_decode_shared_kv"]], [r["tok_s"] for r in data["raw_decode_shared_kv"]],
                        linestyle=":", color="grey", label="raw decode, one shared KV cache")
        for ax, title in zip(row, ("aggregate completion tok/s", "TTFT p50 (ms, log)", "peak RSS (MB)")):
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.set_xlabel("concurrent requests")
            ax.set_xscale("log", base=2)
            ax.set_xticks(concurrency, [str(c) for c in concurrency])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        row[1].set_yscale("log")
        row[2].set_ylim(bottom=0)
    fig.suptitle(f"vramsupply bench {report['date']} — {report['machine']['cpu']}, {report['config']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> tuple[BenchConfig, Path] | Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: stories260K only, one round, c requests per level, 32 tokens, output to bench/.cache/quick")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of: " + ", ".join(SERVERS))
    parser.add_argument("--models", help="comma-separated GGUF paths (default: the bench model and stories260K)")
    parser.add_argument("--rounds", type=int, help="repeat the sweep this many times and report the best of them (default 4; --quick: 1)")
    parser.add_argument("--defaults", action="store_true",
                        help="start every server with its own defaults (slots, context, threads); the raw limit keeps --threads")
    parser.add_argument("--threads", type=int, help="threads for every server (default: all CPUs; with --defaults: each server's own)")
    parser.add_argument("--parallel", type=int, default=16, help="slots on the batching servers (default 16)")
    parser.add_argument("--context-per-slot", type=int, default=512, help="context per slot (default 512)")
    parser.add_argument("--vramsupply", type=Path, default=REPO / ".venv" / "bin" / "vramsupply",
                        help="the vramsupply command to bench (default: the project venv's)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default bench/results)")
    parser.add_argument("--rereport", type=Path, metavar="JSON",
                        help="measure nothing: recompute the summary, targets, table and chart from the rounds in a results JSON")
    args = parser.parse_args()
    if args.rereport:
        return args.rereport

    servers = tuple(name.strip() for name in args.servers.split(",") if name.strip())
    unknown = [name for name in servers if name not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    if args.models:
        models = tuple(Path(m).resolve() for m in args.models.split(","))
    else:
        models = (TINY_MODEL,) if args.quick else (BENCH_MODEL, TINY_MODEL)
    needed = list(models) + [LLAMA_BIN / "llama-server", LLAMA_BIN / "llama-batched-bench"]
    if "vramsupply" in servers:
        needed.append(args.vramsupply)
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        parser.error(f"missing {', '.join(missing)}; run bench/build_anchors.sh first")
    cfg = BenchConfig(
        models=models,
        servers=servers,
        concurrency=(1, 4, 16),
        requests_per_slot=1 if args.quick else 2,
        max_tokens=32 if args.quick else 128,
        rounds=args.rounds or (1 if args.quick else 4),
        parallel=args.parallel,
        context_per_slot=args.context_per_slot,
        threads=args.threads or os.cpu_count(),
        vramsupply_bin=args.vramsupply,
        defaults=args.defaults,
        pin_threads=args.threads is not None,
    )
    out_dir = args.out_dir or (CACHE / "quick" if args.quick else REPO / "bench" / "results")
    return cfg, out_dir


def write_outputs(report: dict, json_path: Path) -> None:
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = json_path.with_suffix(".png")
    plot(report, png_path)
    print()
    print(markdown_table(report))
    print(f"wrote {json_path} and {png_path.name}")


def rereport(json_path: Path) -> None:
    report = json.loads(json_path.read_text())
    for model_report in report["models"].values():
        summarize(model_report, report["config"]["concurrency"])
    write_outputs(report, json_path)


def main() -> None:
    parsed = parse_args()
    if isinstance(parsed, Path):
        rereport(parsed)
        return
    cfg, out_dir = parsed
    date = dt.date.today().isoformat()
    report: dict = {
        "date": date,
        "machine": machine_info(),
        "versions": versions(cfg),
        "config": {**asdict(cfg), "models": [str(m) for m in cfg.models], "vramsupply_bin": str(cfg.vramsupply_bin),
                   "prompt": "a short distinct prompt per request (~5 tokens)", "temperature": 0,
                   "stream": True, "new_connection_per_request": True},
        "models": {},
    }
    print(f"load average {report['machine']['load_avg_at_start']}, {cfg.threads} threads", flush=True)
    started = time.perf_counter()
    for model in cfg.models:
        report["models"][model.name] = asyncio.run(bench_model(cfg, model))
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    report["duration_s"] = round(time.perf_counter() - started, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(report, out_dir / f"{date}{'-defaults' if cfg.defaults else ''}.json")


if __name__ == "__main__":
    main()
