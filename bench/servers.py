"""The servers under test and the machine they run on, shared by bench/run.py and the benches beside it.

Every server gets the same GGUF with the same slots, per-slot context and threads, or with
``defaults`` none of those flags (what a new user runs). Each is started in its own session, so
Ctrl-C reaches only the bench, and a monitor samples the RSS and CPU time of its whole process
tree. The anchors (llama-server and llama-batched-bench from the llama.cpp commit that
llama-cpp-python vendors, and llama-cpp-python's own server) and the bench model are in
bench/.cache, built by bench/build_anchors.sh.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
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
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import psutil

if TYPE_CHECKING:
    from client import LevelResult

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache"
LLAMA_CPP_VERSION = importlib.metadata.version("llama-cpp-python")
LLAMA_CPP_DIR = CACHE / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
LLAMA_BIN = LLAMA_CPP_DIR / "build" / "bin"
BENCH_MODEL = CACHE / "bench-llama-768x12-q8_0.gguf"
TINY_MODEL = REPO / "vramsupply" / "assets" / "stories260K.gguf"
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


def defaults_config(model: Path, vramsupply_bin: Path) -> BenchConfig:
    """For a bench that starts every server at its own defaults on one model: the knobs that only
    tuned runs read are left empty."""
    return BenchConfig(models=(model,), servers=(), concurrency=(1,), requests_per_slot=1, max_tokens=0, rounds=1,
                       parallel=0, context_per_slot=0, threads=0, vramsupply_bin=vramsupply_bin, defaults=True)


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server under test, and what it understands."""

    name: str
    mode: str
    ready_path: str
    accepts_ignore_eos: bool
    command: Callable[[BenchConfig, Path, int], list[str]]


def with_args(spec: ServerSpec, extra: list[str], name: str) -> ServerSpec:
    """``spec`` with ``extra`` arguments after its own, reported as ``name``: one setting against its
    default in the same run (``pairs.py --against-args``, ``marketplace.py --against-args``)."""
    return replace(spec, name=name, command=lambda cfg, model, port: [*spec.command(cfg, model, port), *extra])


def at_ref(spec: ServerSpec, ref: str) -> ServerSpec:
    """vramsupply's ``spec`` running the code of git ``ref`` instead of the working tree, reported as
    "vramsupply-at-<commit>": a change against the code before it, on the same traces in the same minutes
    (``marketplace.py --against-ref``). The code comes from a worktree of ``ref`` in
    bench/.cache/worktrees, first on the server's ``sys.path``; the project venv's packages (its
    llama-cpp-python build among them) serve both.

    Not ``PYTHONPATH=tree python -m vramsupply``: ``-m`` puts the working directory before
    PYTHONPATH, so a bench started from the checkout's root (as the README's commands are) ran
    the working tree's code under the other name. Until wave 2's 31st session it did, and both
    of that session's first A/Bs compared the new code with itself."""
    commit, tree = worktree(ref)
    start = f"import runpy, sys; sys.path.insert(0, {str(tree)!r}); runpy.run_module('vramsupply', run_name='__main__', alter_sys=True)"

    def command(cfg: BenchConfig, model: Path, port: int) -> list[str]:
        python = cfg.vramsupply_bin.parent / "python"
        return [str(python), "-c", start, *spec.command(cfg, model, port)[1:]]

    return replace(spec, name=f"vramsupply-at-{commit}", command=command)


def worktree(ref: str) -> tuple[str, Path]:
    """``ref``'s short commit, and a checkout of it in bench/.cache/worktrees (made once per commit)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True, text=True).stdout.strip()
    tree = CACHE / "worktrees" / commit
    if not (tree / "vramsupply").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--force", "--detach", str(tree), commit], check=True, capture_output=True)
    return commit, tree


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


def decode_threads() -> int:
    """The decode threads vramsupply picks by default on this machine (``engine/threads.py``),
    that module loaded alone: the bench venv has none of the package's other dependencies."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # for the light modules it imports (vramsupply.host)
    spec = importlib.util.spec_from_file_location("vramsupply_engine_threads", REPO / "vramsupply" / "engine" / "threads.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.cpu_counts(module.allowed_cpus())[0]


def status_mb(pid: int, field: str) -> float:
    """A size field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in MB; 0 once the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")), 0) / 1024


def write_results(report: dict, out: Path) -> None:
    """A bench's results JSON, written the one way every script writes it (its folder made)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


class ProcessTreeMonitor:
    """Samples the RSS and CPU time of a process and all its descendants on a background thread.

    The RSS is read every ``interval_s`` from the processes last found in the tree, and the tree is
    looked up anew every ``tree_interval_s``: finding a process's descendants reads every process
    on the machine (about 1.4 ms here), and doing that at every 20 ms sample made two monitors take
    about 17 % of a core of this 2-core VM from the servers they measured. A descendant that lives
    less than ``tree_interval_s`` may be missed; the servers benched start none mid-run."""

    def __init__(self, pid: int, interval_s: float = 0.02, tree_interval_s: float = 1.0) -> None:
        self._root = psutil.Process(pid)
        self._interval_s = interval_s
        self._tree_interval_s = tree_interval_s
        self._procs: list[psutil.Process] = [self._root]
        self._procs_at = 0.0
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

    def _known_tree(self) -> list[psutil.Process]:
        """The tree as last looked up, looked up again once it is ``tree_interval_s`` old."""
        if time.monotonic() - self._procs_at >= self._tree_interval_s:
            self._procs, self._procs_at = self._tree(), time.monotonic()
        return self._procs

    def _sample_rss(self) -> int:
        total = 0
        for proc in self._known_tree():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def high_water_mb(self) -> float:
        """The kernel's own peak RSS (``VmHWM``) of each process in the tree, summed: what the 20 ms
        samples could miss, such as a buffer committed and handed back within one interval."""
        return sum(status_mb(proc.pid, "VmHWM") for proc in self._tree())

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
    # A data dir of its own (XDG_DATA_HOME): two vramsupply agents side by side (``at_ref``,
    # ``with_args``) must not share one; the second refuses to start.
    env = {**os.environ, "XDG_DATA_HOME": str(CACHE / "data" / spec.name)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far, all processes together."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


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
