"""Where the model runs: devices, their memory, layers on the GPU, threads, and every reason the GPU
is not (fully) used, said out loud.

A silent fall back to the CPU is what GPU owners hit most with Ollama, so three situations become
warnings shown in the terminal, the log, `/health`, `vramsupply status` and the registration:

- a GPU is present (nvidia-smi/rocminfo list it) but this llama.cpp build has no GPU backend;
- only part of the model is offloaded (`--n-gpu-layers` below the layer count, or 0);
- a GPU the model was placed on has disappeared since start (checked again at most every 30 s, in
  the background: `/health` never waits for a vendor tool).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vramsupply.gpu.devices import Device, NoAnswer, PresentGpu, build_has_gpu_backend, gpus_listed, gpus_present, list_devices
from vramsupply.gpu.plan import gib
from vramsupply.output import say

RECHECK_SECONDS = 30.0
STUCK_SECONDS = 60.0
"""Each vendor tool is given 10 s, so a re-probe returns within about 20 s; one still running after
this long is stuck (nvidia-smi in the driver, beyond a kill): said once, and no second one starts."""
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
    """The start-up placement, plus a warning once a GPU it used is no longer listed.

    `/health` is what the platform polls (with a 5 s timeout) to decide whether this agent is
    online, so `current()` never waits: it answers from the last known state at once and, at most
    every RECHECK_SECONDS, starts a re-probe in a thread of its own (never the shared default
    executor that tokenizing and big-body parsing also use), one at a time. A vendor tool that does
    not answer (nvidia-smi hangs for seconds when the driver is busy) is "unknown this time": the
    last known state stays, it is never read as "GPU disappeared".
    """

    def __init__(self, placement: Placement, probe: Callable[[], list[PresentGpu] | NoAnswer] = gpus_listed) -> None:
        self.placement = placement
        self._probe = probe
        self._lock = threading.Lock()  # guards only the bookkeeping below, never held while probing
        self._checked = time.monotonic()
        self._probing = False
        self._missing: tuple[str, ...] = ()
        self._unanswered = False

    def current(self) -> Placement:
        """The last known placement, at once (safe on the event loop); starts a re-probe when due."""
        self.refresh_in_background()
        missing = self._missing
        if not missing:
            return self.placement
        return replace(self.placement, warnings=(*self.placement.warnings, disappeared(missing)))

    def refresh_in_background(self) -> bool:
        """Start a re-probe in its own thread when RECHECK_SECONDS have passed and none is running."""
        with self._lock:
            if not self.placement.present or time.monotonic() - self._checked < RECHECK_SECONDS:
                return False
            if self._probing:
                if time.monotonic() - self._checked > STUCK_SECONDS:
                    self._no_answer(f"the re-probe started {time.monotonic() - self._checked:.0f} s ago has not returned")
                return False
            self._probing = True
            self._checked = time.monotonic()  # the period runs from each probe's start, as the watch's ticks do
        try:
            threading.Thread(target=self._refresh_then_done, name="vramsupply-gpu-probe", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had now: try again next period
            self._no_answer(f"no thread to run the vendor tools: {exc}")
            with self._lock:
                self._probing = False
            return False
        return True

    def _refresh_then_done(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # a probe that fails is unknown this time, like one that does not answer
            log.debug("the GPU re-probe failed", exc_info=True)
            self._no_answer(f"the probe failed: {exc!r}")
        finally:
            with self._lock:
                self._probing = False

    def refresh(self) -> None:
        """Ask the vendor tools now (blocking) and log what changed: a GPU gone, or back."""
        listed = self._probe()
        if isinstance(listed, NoAnswer):
            self._no_answer(listed.reason)
            return
        if self._unanswered:
            log.info("the GPU vendor tools answer again")
        self._unanswered = False
        gone = Counter(self.placement.present) - Counter(listed)
        missing, before = tuple(g.label for g in gone.elements()), self._missing
        self._missing = missing  # what /health shows from now on, before it is logged
        if missing and missing != before:
            log.warning("%s", disappeared(missing))
        elif before and not missing:
            log.info("the GPU(s) the model was placed on are listed by the driver again")

    def _no_answer(self, reason: str) -> None:
        """Said once at warning level (then at debug) until the tools answer again."""
        level = logging.DEBUG if self._unanswered else logging.WARNING
        log.log(level, "could not re-check the GPUs (%s): keeping the last known placement", reason)
        self._unanswered = True


def disappeared(missing: tuple[str, ...]) -> str:
    return f"GPU disappeared since start ({', '.join(missing)} no longer listed by the driver): requests may fail or run on the CPU"


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
    """Re-probe every 30 s even while nobody asks `/health`; the monitor logs a GPU that is no
    longer listed the moment its probe (in its own thread) finds it. Never waits for the probe."""
    while not await wait(RECHECK_SECONDS):
        monitor.refresh_in_background()
