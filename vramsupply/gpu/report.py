"""Where the model runs: devices, their memory, layers on the GPU, threads, and every reason the GPU
is not (fully) used, said out loud.

A silent fall back to the CPU is what GPU owners hit most with Ollama, so three situations become
warnings shown in the terminal, the log, `/health`, `vramsupply status` and the registration:

- a GPU is present (nvidia-smi/rocminfo list it) but this llama.cpp build has no GPU backend;
- only part of the model is offloaded (`--n-gpu-layers` below the layer count, or 0);
- a GPU the model was placed on has disappeared since start (checked again at most every 30 s).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vramsupply.gpu.devices import Device, PresentGpu, build_has_gpu_backend, gpus_present, list_devices
from vramsupply.gpu.plan import gib
from vramsupply.output import say

RECHECK_SECONDS = 30.0
ALL_LAYERS = 1 << 30
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    backend: str  # "gpu" or "cpu": where the layers run
    devices: tuple[Device, ...]  # the devices the model is placed on
    layers_on_gpu: int
    layers_total: int  # repeating layers plus the output layer, as llama.cpp counts offload
    threads: int
    threads_batch: int
    present: tuple[PresentGpu, ...]  # GPUs the vendor tools listed at start
    warnings: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        where = ", ".join(f"{d.label} ({gib(d.free_bytes)} free of {gib(d.total_bytes)})" for d in self.devices)
        lines = [
            f"running on {where}",
            f"layers on the GPU: {self.layers_on_gpu}/{self.layers_total}; threads: {self.threads} decode, {self.threads_batch} prompt",
        ]
        return lines + [f"WARNING: {w}" for w in self.warnings]

    def as_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "devices": [d.as_json() for d in self.devices],
            "layers_on_gpu": self.layers_on_gpu,
            "layers_total": self.layers_total,
            "threads": self.threads,
            "threads_batch": self.threads_batch,
            "warnings": list(self.warnings),
        }


def describe_placement(
    n_layer: int,
    n_gpu_layers: int,
    threads: tuple[int, int],
    *,
    devices: list[Device] | None = None,
    present: list[PresentGpu] | None = None,
    gpu_backend: bool | None = None,
) -> Placement:
    """What llama.cpp did with the model: it offloads min(n_gpu_layers, n_layer + 1) layers
    (the +1 is the output layer) when the build has a GPU backend and a GPU is registered."""
    devices = list_devices() if devices is None else devices
    present = gpus_present() if present is None else present
    gpu_backend = build_has_gpu_backend() if gpu_backend is None else gpu_backend
    gpus = tuple(d for d in devices if d.is_gpu)
    total = n_layer + 1
    on_gpu = min(max(n_gpu_layers, 0), total) if gpu_backend and gpus else 0
    warnings = []
    if present and not gpu_backend:
        names = ", ".join(g.label for g in present)
        warnings.append(f"GPU present ({names}) but this llama.cpp build has no GPU backend: the model runs on the CPU; reinstall with install.sh (it builds for the GPU it finds)")
    elif gpu_backend and gpus and on_gpu == 0:
        warnings.append("GPU offload is off (--n-gpu-layers 0): the model runs on the CPU")
    elif 0 < on_gpu < total:
        warnings.append(f"partial offload: only {on_gpu} of {total} layers are on the GPU, the rest run on the CPU (slower)")
    host = next((d for d in devices if d.kind == "cpu"), Device("CPU", "", "cpu", 0, 0))
    placed = gpus if on_gpu else (host,)
    return Placement("gpu" if on_gpu else "cpu", placed, on_gpu, total, threads[0], threads[1], tuple(present), tuple(warnings))


class PlacementMonitor:
    """The start-up placement, plus a warning once a GPU it used is no longer listed."""

    def __init__(self, placement: Placement, probe: Callable[[], list[PresentGpu]] = gpus_present) -> None:
        self.placement = placement
        self._probe = probe
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._missing: tuple[str, ...] = ()

    def current(self) -> Placement:
        """Re-probes the vendor tools at most every RECHECK_SECONDS (call it off the event loop)."""
        with self._lock:
            if self.placement.present and time.monotonic() - self._checked >= RECHECK_SECONDS:
                self._checked = time.monotonic()
                gone = Counter(self.placement.present) - Counter(self._probe())
                self._missing = tuple(g.label for g in gone.elements())
            if not self._missing:
                return self.placement
            gone = f"GPU disappeared since start ({', '.join(self._missing)} no longer listed by the driver): requests may fail or run on the CPU"
            return replace(self.placement, warnings=(*self.placement.warnings, gone))


def placement_of(engine: Any, n_gpu_layers: int) -> Placement:
    """Where the loaded engine runs. Blocking: it asks ggml and the vendor tools."""
    return describe_placement(engine.n_layer, ALL_LAYERS if n_gpu_layers == -1 else n_gpu_layers, engine.threads)


def announce(placement: Placement) -> None:
    """Print where the model runs (after the ready line) and log every warning."""
    for line in placement.lines():
        if line.startswith("WARNING: "):
            log.warning("%s", line.removeprefix("WARNING: "))
        else:
            say(line)


async def watch_placement(monitor: PlacementMonitor, wait: Callable[[float], Awaitable[bool]]) -> None:
    """Log a warning the moment a GPU the model uses is no longer listed (checked every 30 s)."""
    known = set(monitor.placement.warnings)
    while not await wait(RECHECK_SECONDS):
        current = await asyncio.to_thread(monitor.current)
        for warning in current.warnings:
            if warning not in known:
                log.warning("%s", warning)
                known.add(warning)
