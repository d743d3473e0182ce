"""`vramsupply doctor`: one screen of checks, each passed or failed with the fix.

Every check is a function registered with `@check("name")`, taking the shared Context and returning
`Result(ok, detail, fix)`; they run in registration order. Adding a check is one decorated
function (in this module or any module imported before `run_checks`). A check that raises is
reported as failed with the exception, so one broken probe never hides the others.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import errno
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx2

from vramsupply.config import Settings
from vramsupply.gpu.devices import Device, PresentGpu, build_has_gpu_backend, gpus_present, list_devices
from vramsupply.gpu.plan import GIB, gib

MIN_FREE_GPU = 1 * GIB
MIN_FREE_DISK = 10 * GIB
MAX_CLOCK_SKEW = 60.0
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class PlatformProbe:
    """One authenticated GET to the platform, shared by the reachability, key and clock checks."""

    status: int | None
    date: str | None
    error: str | None
    seconds: float


@dataclass
class Context:
    settings: Settings
    _cache: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def devices(self) -> list[Device]:
        return list_devices()

    @cached_property
    def present(self) -> list[PresentGpu]:
        return gpus_present()

    @cached_property
    def gpu_backend(self) -> bool:
        return build_has_gpu_backend()

    @cached_property
    def platform(self) -> PlatformProbe:
        from vramsupply.platform import api

        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        started = time.monotonic()
        try:
            response = httpx2.get(self.settings.platform_url + api.RAILS_PATH, headers={"Authorization": f"Bearer {key}"}, timeout=PROBE_TIMEOUT)
        except httpx2.HTTPError as exc:
            return PlatformProbe(None, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, time.monotonic() - started)
        return PlatformProbe(response.status_code, response.headers.get("Date"), None, time.monotonic() - started)


Check = Callable[[Context], Result]
CHECKS: list[tuple[str, Check]] = []


def check(name: str) -> Callable[[Check], Check]:
    def register(function: Check) -> Check:
        CHECKS.append((name, function))
        return function

    return register


def run_checks(settings: Settings) -> list[CheckResult]:
    context = Context(settings)
    results = []
    for name, function in CHECKS:
        try:
            result = function(context)
        except Exception as exc:  # a broken probe is a failed check, never a traceback
            result = Result(False, f"the check itself failed: {type(exc).__name__}: {exc}", "report this as a vramsupply bug")
        results.append(CheckResult(name, result.ok, result.detail, "" if result.ok else result.fix))
    return results


@check("backend")
def backend_matches_devices(ctx: Context) -> Result:
    gpus = [d for d in ctx.devices if d.is_gpu]
    if ctx.present and not ctx.gpu_backend:
        names = ", ".join(g.label for g in ctx.present)
        return Result(False, f"GPU present ({names}) but this llama.cpp build is CPU-only", "reinstall: sh install.sh (it builds for the GPU it finds; --dry-run shows the plan)")
    if ctx.gpu_backend and not gpus:
        return Result(False, "this llama.cpp build has a GPU backend but sees no GPU", "check the driver: nvidia-smi (or rocminfo) must list the GPU")
    if gpus:
        return Result(True, f"GPU build using {', '.join(d.label for d in gpus)}")
    return Result(True, "CPU build, and no GPU on this machine")


def _nvidia_versions() -> tuple[str | None, str | None, str | None]:
    """(driver version, CUDA version, error) from nvidia-smi's header."""
    path = shutil.which("nvidia-smi")
    if path is None:
        return None, None, None
    try:
        result = subprocess.run([path], capture_output=True, text=True, timeout=PROBE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, None, str(exc)
    if result.returncode != 0:
        return None, None, (result.stdout + result.stderr).strip().splitlines()[0] if (result.stdout + result.stderr).strip() else f"exit {result.returncode}"
    driver = cuda = None
    for token, after in zip(result.stdout.split(), result.stdout.split()[1:] + [""]):
        if token == "Version:" and driver is None:
            driver = after
        elif token == "Version:":
            cuda = after
    return driver, cuda, None


@check("driver")
def driver_and_cuda_versions(ctx: Context) -> Result:
    driver, cuda, error = _nvidia_versions()
    if error:
        return Result(False, f"nvidia-smi fails: {error}", "reinstall or reload the NVIDIA driver until nvidia-smi lists the GPU")
    if driver:
        if cuda and int(cuda.split(".")[0]) < 12:
            return Result(False, f"NVIDIA driver {driver} supports CUDA {cuda}; llama.cpp needs CUDA 12 or newer", "update the NVIDIA driver (525 or newer)")
        return Result(True, f"NVIDIA driver {driver}, CUDA {cuda or 'unknown'}")
    if any(g.vendor == "AMD" for g in ctx.present):
        return Result(True, "AMD ROCm driver answers (rocminfo)")
    return Result(True, "no GPU driver installed; none is needed for the CPU build")


@check("decode")
def one_token_decode(ctx: Context) -> Result:
    """Load the bundled tiny model with every layer offloaded and decode one token."""
    from vramsupply.engine.model import Model, create_context
    from vramsupply.engine.types import EngineOptions
    from vramsupply.gpu.report import describe_placement

    import llama_cpp

    tiny = Path(__file__).resolve().parent.parent / "assets" / "stories260K.gguf"
    started = time.monotonic()
    model = Model.load(tiny, -1)
    try:
        context = create_context(model, EngineOptions(model_path=tiny, n_ctx=64, parallel=1, threads=1))
        try:
            batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(model.llama_model.token_bos()), 1)
            status = llama_cpp.llama_decode(context.ctx, batch)
        finally:
            context.close()
    finally:
        model.close()
    placement = describe_placement(5, -1, (1, 1), devices=ctx.devices, present=ctx.present, gpu_backend=ctx.gpu_backend)
    where = ", ".join(d.label for d in placement.devices)
    if status != 0:
        return Result(False, f"llama_decode returned {status} on {where}", "run vramsupply serve --log-level DEBUG to see llama.cpp's error")
    return Result(True, f"decoded 1 token on {where} in {(time.monotonic() - started) * 1000:.0f} ms (load included)")


@check("gpu memory")
def free_gpu_memory(ctx: Context) -> Result:
    gpus = [d for d in ctx.devices if d.is_gpu]
    if not gpus:
        host = next((d for d in ctx.devices if d.kind == "cpu"), None)
        ram = f": {gib(host.free_bytes)} of {gib(host.total_bytes)} RAM available for the model{_limited()}" if host else ""
        return Result(True, f"no GPU in use{ram}")
    low = [d for d in gpus if d.free_bytes < MIN_FREE_GPU]
    detail = "; ".join(f"{d.label}: {gib(d.free_bytes)} free of {gib(d.total_bytes)}" for d in gpus)
    if low:
        return Result(False, detail, "stop what else uses the GPU (nvidia-smi lists the processes), then run vramsupply plan")
    return Result(True, detail)


def _limited() -> str:
    """Where a cgroup memory limit leaves less than the host has free, say so: the host's total is not what this process may use."""
    from vramsupply.host.cgroups import memory_room
    from vramsupply.host.memory import host_available_bytes

    room, host = memory_room(), host_available_bytes()
    return " (held to that by a cgroup memory limit)" if room is not None and (host is None or room < host) else ""


@check("cpu")
def cpu_threads(ctx: Context) -> Result:
    """The CPU threads serve will use, and whether ``--threads`` asks for more than the CPU time this process may have."""
    from vramsupply.engine.threads import allowed_cpus, cpu_counts, threads_within
    from vramsupply.host.cgroups import cpu_limit

    physical, logical = cpu_counts(allowed_cpus())
    quota = cpu_limit()
    within = f"; a cgroup CPU quota of {quota:.2f} CPUs" if quota is not None else ""
    machine = f"{physical} cores, {logical} CPUs{within}"
    if ctx.settings.threads is None:
        return Result(True, f"{threads_within(physical, quota)} threads by default ({machine}), fewer while other programs keep the cores busy")
    room = min(logical, quota) if quota is not None else logical
    detail = f"{ctx.settings.threads} threads pinned by --threads / VRAM_SUPPLY_THREADS ({machine})"
    if ctx.settings.threads > room + 0.5:
        fix = "unset VRAM_SUPPLY_THREADS and --threads: the default follows the cores and the quota (llama.cpp's threads wait for the slowest at every step)"
        return Result(False, f"{detail}: more threads than this process has CPU time for", fix)
    return Result(True, detail)


@check("disk")
def free_disk_in_model_cache(ctx: Context) -> Result:
    from vramsupply.hub import default_cache_dir

    cache = ctx.settings.cache_dir or default_cache_dir()
    existing = cache
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = "point VRAM_SUPPLY_CACHE_DIR at a folder this user can write"
    if not existing.is_dir():  # a file where a folder should be: nothing can be made below it
        return Result(False, f"models would go to {cache}, but {existing} is a file", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        return Result(False, f"models would go to {cache}, but this user cannot write in {existing}", fix)
    free = shutil.disk_usage(existing).free
    detail = f"{gib(free)} free for models in {cache}"
    if free < MIN_FREE_DISK:
        return Result(False, detail, "free disk space or point VRAM_SUPPLY_CACHE_DIR at a larger disk")
    return Result(True, detail)


# Why a bind fails, beyond "in use": each needs another fix.
_BIND_FAILURES = {
    errno.EADDRNOTAVAIL: ("{host} is not an address of this machine", "set VRAM_SUPPLY_HOST to one of this machine's addresses (0.0.0.0: all of them)"),
    errno.EACCES: ("port {port} is a privileged port this user may not listen on", "serve on a port above 1023 (--port, VRAM_SUPPLY_PORT)"),
}


def _bind_error(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be listened on, or None when it can."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


@check("port")
def port_free_or_ours(ctx: Context) -> Result:
    host, port = ctx.settings.host, ctx.settings.port
    error = _bind_error(host, port)
    if error is None:
        return Result(True, f"{host}:{port} is free")
    if isinstance(error, socket.gaierror):
        return Result(False, f"the host name {host} does not resolve ({error.strerror})", "set VRAM_SUPPLY_HOST to an address of this machine (0.0.0.0: all of them)")
    if error.errno in _BIND_FAILURES:
        detail, fix = _BIND_FAILURES[error.errno]
        return Result(False, detail.format(host=host, port=port), fix)
    if error.errno != errno.EADDRINUSE:
        return Result(False, f"cannot listen on {host}:{port}: {error.strerror or error}", "set VRAM_SUPPLY_HOST and VRAM_SUPPLY_PORT to an address and port this machine can listen on")
    from vramsupply.platform.offer import local_base_url

    try:
        answer = httpx2.get(local_base_url(host, port) + "/health", timeout=PROBE_TIMEOUT).json()
    except (httpx2.HTTPError, ValueError):
        answer = None
    if isinstance(answer, dict) and "model" in answer:
        return Result(True, f"{host}:{port} is served by a running vramsupply ({answer.get('model')})")
    return Result(False, f"{host}:{port} is taken by another program", "stop it or serve on another port (--port, VRAM_SUPPLY_PORT)")


@check("platform")
def platform_reachable(ctx: Context) -> Result:
    probe = ctx.platform
    if probe.status is None:
        return Result(False, f"{ctx.settings.platform_url} cannot be reached: {probe.error}", "check the network, a proxy (HTTPS_PROXY) or VRAM_SUPPLY_PLATFORM_URL")
    return Result(True, f"{ctx.settings.platform_url} answered in {probe.seconds * 1000:.0f} ms")


@check("api key")
def api_key_accepted(ctx: Context) -> Result:
    if ctx.settings.api_key is None:
        return Result(False, "no API key configured", "run vramsupply login (or set VRAM_SUPPLY_API_KEY)")
    status = ctx.platform.status
    if status is None:
        return Result(False, "cannot check: the platform is unreachable", "fix the platform check first")
    if status in (401, 403):
        return Result(False, f"the platform rejected the API key (HTTP {status})", "run vramsupply login with a current key")
    if status >= 400:
        return Result(False, f"the platform answered HTTP {status}", "try again later; if it persists, contact vram.supply")
    return Result(True, "the platform accepts the API key")


@check("endpoint url")
def endpoint_url_set(ctx: Context) -> Result:
    if ctx.settings.no_register:
        return Result(True, "not needed: serving locally only (no_register)")
    if ctx.settings.tunnel and not ctx.settings.endpoint_url:
        return Result(True, f"made by the {ctx.settings.tunnel} tunnel when serve starts")
    if not ctx.settings.endpoint_url:
        return Result(False, "no public endpoint URL: the agent cannot register", "pass --endpoint-url https://your.host (or set VRAM_SUPPLY_ENDPOINT_URL)")
    from vramsupply.platform.offer import OfferError, check_endpoint_url

    try:
        warnings = check_endpoint_url(ctx.settings.endpoint_url)
    except OfferError as exc:
        return Result(False, str(exc), "set VRAM_SUPPLY_ENDPOINT_URL to the public http(s) base URL")
    if warnings:
        return Result(False, warnings[0], "use the public address buyers reach this machine at")
    return Result(True, ctx.settings.endpoint_url)


@check("reachability")
def platform_can_reach_agent(ctx: Context) -> Result:
    """Retrace the platform's path to {endpoint_url}/health hop by hop; the first failing hop is named."""
    from vramsupply.platform.offer import local_base_url
    from vramsupply.platform.reachability import check_configured
    from vramsupply.serve.options import market_options

    settings = ctx.settings
    options = None if settings.no_register else market_options(settings)
    probe = asyncio.run(check_configured(options, local_base_url(settings.host, settings.port)))
    if probe.ok:
        return Result(True, probe.message)
    return Result(False, f"{probe.hop}: {probe.message}", "see the detail: it names the hop and what to do")


@check("clock")
def clock_in_sync(ctx: Context) -> Result:
    date = ctx.platform.date
    if not date:
        return Result(False, "cannot compare: no answer with a Date header from the platform", "fix the platform check first; keep NTP on (timedatectl set-ntp true)")
    platform_time = _http_date(date)
    if platform_time is None:
        return Result(False, f"cannot compare: the platform's Date header {date[:64]!r} is not a date", "keep NTP on (timedatectl set-ntp true); if the platform keeps sending it, contact vram.supply")
    skew = time.time() - platform_time
    detail = f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the platform's clock"
    if abs(skew) > MAX_CLOCK_SKEW:
        return Result(False, detail, "turn on time synchronisation: timedatectl set-ntp true")
    return Result(True, detail)


def _http_date(text: str) -> float | None:
    """An HTTP Date header as a Unix time, or None if it is not one. HTTP dates are UTC: a zone
    given as -0000 makes Python return a naive datetime, which is UTC too, not local time."""
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)).timestamp()


def doctor_text(results: list[CheckResult]) -> list[Any]:
    """One line per check, ✓ or ✗ with the detail, and the fix under each failure."""
    from rich.text import Text

    width = max(len(r.name) for r in results)
    lines: list[Any] = []
    for r in results:
        mark = Text("✓", style="green") if r.ok else Text("✗", style="bold red")
        lines.append(Text.assemble(mark, " ", (r.name.ljust(width), "bold"), "  ", r.detail))
        if not r.ok and r.fix:
            lines.append(Text.assemble(" " * (width + 4), ("fix: ", "yellow"), r.fix))
    failed = sum(not r.ok for r in results)
    lines.append(Text(f"{failed} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed", style="bold red" if failed else "bold green"))
    return lines
