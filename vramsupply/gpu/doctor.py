"""`vramsupply doctor`: one screen of checks, each passed or failed with the fix; here, this
machine's: the llama.cpp build against its GPUs, the driver, one real decode, memory, CPU, disk and
the port serve will listen on.

The frame they run in is ``checkup.py``; the marketplace's checks (platform, API key, endpoint,
reachability, clock) are ``doctor_platform.py``, imported at the end of this module so that they
run after these. Adding a check is one function decorated with ``@check("name")``.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx2

from vramsupply.gpu.checkup import PROBE_TIMEOUT, CheckResult, Context, Result, check, doctor_text, run_checks
from vramsupply.gpu.devices import NoAnswer
from vramsupply.gpu.plan import GIB, gib
from vramsupply.listen import bind_sockets

__all__ = ["CheckResult", "doctor_text", "run_checks"]

MIN_FREE_GPU = 1 * GIB
MIN_FREE_DISK = 10 * GIB


@check("backend")
def backend_matches_devices(ctx: Context) -> Result:
    gpus = [d for d in ctx.devices if d.is_gpu]
    if ctx.present and not ctx.gpu_backend:
        names = ", ".join(g.label for g in ctx.present)
        return Result(False, f"GPU present ({names}) but this llama.cpp build is CPU-only", reinstall_for(ctx.present[0].vendor))
    if ctx.gpu_backend and not gpus:
        return Result(False, "this llama.cpp build has a GPU backend but sees no GPU", "check the driver: nvidia-smi (or rocminfo) must list the GPU")
    if gpus:
        return Result(True, f"GPU build using {', '.join(d.label for d in gpus)}")
    if isinstance(ctx.listing, NoAnswer):  # not "lists none": whether a GPU is there is unknown
        return Result(False, f"CPU build; whether a GPU is present is unknown: {ctx.listing.reason}", "check the GPU driver: nvidia-smi (or rocminfo) must answer")
    return Result(True, f"CPU build; no GPU found ({vendor_tools_asked()})")


INSTALLER = "curl -fsSL https://vram.supply/install.sh | sh -s --"
"""The installer as README gives it: installed that way, there is no install.sh to run (a fix that
said ``sh install.sh`` assumed a checkout, where that form installs the checkout, not the release)."""
BACKENDS = {"NVIDIA": "cuda", "AMD": "hip"}


def reinstall_for(vendor: str) -> str:
    """Reinstall for the GPU found; ``--strict`` makes a GPU build that fails again say why
    instead of installing the CPU build once more."""
    backend = BACKENDS.get(vendor)
    options = f"--backend {backend} --strict" if backend else "--strict"
    return f"reinstall for the GPU: {INSTALLER} {options} (in a checkout: sh install.sh {options}); add --dry-run to see the plan first"


VENDOR_TOOLS = (("nvidia-smi", "nvidia-smi -L"), ("rocminfo", "rocminfo"))
"""What ``devices.gpus_present`` asks: "no GPU" means only that these listed none (an Intel GPU,
say, is not looked for)."""


def vendor_tools_asked() -> str:
    """What "no GPU found" rests on: the vendor tools that are installed listed none."""
    asked = [command for tool, command in VENDOR_TOOLS if shutil.which(tool)]
    absent = [tool for tool, _ in VENDOR_TOOLS if not shutil.which(tool)]
    if not asked:
        return f"neither {' nor '.join(absent)} is installed"
    if not absent:
        return f"{' and '.join(asked)} list none"
    return f"{asked[0]} lists none; {absent[0]} is not installed"


def _nvidia_versions() -> tuple[str | None, str | None, str | None]:
    """(driver version, CUDA version, error) from nvidia-smi's header."""
    path = shutil.which("nvidia-smi")
    if path is None:
        return None, None, None
    try:
        result = subprocess.run([path], capture_output=True, text=True, errors="replace", timeout=PROBE_TIMEOUT)
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
    listing = ctx.listing
    if isinstance(listing, NoAnswer) and listing.reason.startswith("nvidia-smi "):  # asked again, it hung again: 5 s more
        return Result(False, f"nvidia-smi fails: {listing.reason}", "reinstall or reload the NVIDIA driver until nvidia-smi lists the GPU")
    driver, cuda, error = _nvidia_versions()
    if error:
        return Result(False, f"nvidia-smi fails: {error}", "reinstall or reload the NVIDIA driver until nvidia-smi lists the GPU")
    if driver and cuda is not None and not cuda.split(".")[0].isdigit():  # "N/A": a container without libcuda
        return Result(False, f"NVIDIA driver {driver}, but nvidia-smi shows CUDA {cuda}: the CUDA driver library (libcuda) is not visible here",
                      "in a container, run it with the NVIDIA container toolkit (--gpus all); otherwise reinstall the NVIDIA driver")  # fmt: skip
    if driver:
        if cuda and int(cuda.split(".")[0]) < 12:
            return Result(False, f"NVIDIA driver {driver} supports CUDA {cuda}; llama.cpp needs CUDA 12 or newer", "update the NVIDIA driver (525 or newer)")
        return Result(True, f"NVIDIA driver {driver}, CUDA {cuda or 'unknown'}")
    if any(g.vendor == "AMD" for g in ctx.present):
        return Result(True, "AMD ROCm driver answers (rocminfo)")
    nvidia = "gives no driver version" if shutil.which("nvidia-smi") else "is not installed"
    return Result(True, f"no NVIDIA driver (nvidia-smi {nvidia}) and no AMD GPU listed (rocminfo); none is needed for the CPU build")


@check("decode")
def one_token_decode(ctx: Context) -> Result:
    """Load the bundled tiny model with every layer offloaded, placed as the settings say (their
    devices), and decode one token."""
    from vramsupply.engine.model import Model, create_context
    from vramsupply.engine.types import EngineOptions
    from vramsupply.gpu.report import describe_placement

    import llama_cpp

    from vramsupply.gpu.options import GpuOptions

    placement = GpuOptions.of(ctx.settings)
    problem = placement.placement_problem()
    if problem is not None:  # serve would fail on it at every start
        return Result(False, problem, "set VRAM_SUPPLY_DEVICES to devices this build has (or leave it unset), and VRAM_SUPPLY_TENSOR_SPLIT to one share each")
    tiny = Path(__file__).resolve().parent.parent / "assets" / "stories260K.gguf"
    started = time.monotonic()
    model = Model.load(tiny, -1, placement)
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


# Below this port only root (or CAP_NET_BIND_SERVICE) may listen: a sysctl of each network namespace.
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


def _privileged_port(port: int) -> Result | None:
    """EACCES below this machine's unprivileged start (1024 unless set otherwise, and the fix must
    name a port that works here); at or above it EACCES is a security policy's (SELinux, AppArmor)."""
    try:
        start = int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        start = 1024
    if port >= start:
        return None
    detail = f"port {port} is a privileged port: only root may listen below {start} on this machine, and this user is not root"
    return Result(False, detail, f"serve on port {start} or above (--port, VRAM_SUPPLY_PORT); a reverse proxy can still answer buyers on port {port}")


def _bind_error(host: str, port: int) -> OSError | None:
    """Why `host:port` cannot be listened on, or None when it can: bound as serve binds it (every
    address of the name, IPv6 ones IPv6-only), so that the verdict is serve's."""
    try:
        sockets = bind_sockets(host, port)
    except OSError as exc:  # socket.gaierror too: a name that does not resolve
        return exc
    for sock in sockets:
        sock.close()
    return None


def _host_port(host: str, port: int) -> str:
    """``[::]:47377`` for an IPv6 literal: ``:::47377`` reads as nothing."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@check("port")
def port_free_or_ours(ctx: Context) -> Result:
    """Whether serve can listen on host:port; if not, why, beyond "in use": each reason has its own fix."""
    host, port = ctx.settings.host, ctx.settings.port
    error = _bind_error(host, port)
    where = _host_port(host, port)
    if error is None:
        return Result(True, f"{where} is free")
    if isinstance(error, socket.gaierror):
        return Result(False, f"the host name {host} does not resolve ({error.strerror})", "set VRAM_SUPPLY_HOST to an address of this machine (0.0.0.0: all of them)")
    if error.errno == errno.EADDRNOTAVAIL:
        return Result(False, f"{host} is not an address of this machine", "set VRAM_SUPPLY_HOST to one of this machine's addresses (0.0.0.0: all of them)")
    if error.errno == errno.EACCES and (privileged := _privileged_port(port)) is not None:
        return privileged
    if error.errno != errno.EADDRINUSE:
        return Result(False, f"cannot listen on {where}: {error.strerror or error}", "set VRAM_SUPPLY_HOST and VRAM_SUPPLY_PORT to an address and port this machine can listen on")
    from vramsupply.platform.offer import local_base_url

    try:
        answer = httpx2.get(local_base_url(host, port) + "/health", timeout=PROBE_TIMEOUT).json()
    except (httpx2.HTTPError, ValueError):
        answer = None
    if isinstance(answer, dict) and "model" in answer:
        return Result(True, f"{where} is served by a running vramsupply ({answer.get('model')})")
    return Result(False, f"{where} is taken by another program", "stop it or serve on another port (--port, VRAM_SUPPLY_PORT)")


from vramsupply.gpu import doctor_platform  # noqa: E402,F401  the marketplace's checks, registered after this machine's
