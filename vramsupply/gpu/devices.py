"""The devices this llama.cpp build can run on, with their free and total memory.

Asked of ggml itself (its backend device registry), not of nvidia-smi: a GPU that the installed
build cannot use is not a device the model can be placed on. `gpus_present()` asks the vendor
tools separately, so a GPU the build cannot use is noticed and reported (no silent CPU fallback).
`gpus_listed()` asks them again while serving, and tells "the tool did not answer" (a busy driver
makes nvidia-smi hang for seconds) apart from "the tool lists no GPU".
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp._ctypes_extensions import load_shared_library

from vramsupply.host.memory import available_bytes

CPU, GPU, IGPU, ACCEL = 0, 1, 2, 3  # enum ggml_backend_dev_type
_KINDS = {CPU: "cpu", GPU: "gpu", IGPU: "igpu", ACCEL: "accel"}
_LIB_DIR = Path(llama_cpp.__file__).parent / "lib"


@dataclass(frozen=True)
class Device:
    name: str  # ggml's device name: CUDA0, Vulkan0, Metal, CPU
    description: str  # what the vendor calls it: NVIDIA GeForce RTX 4090
    kind: str  # cpu, gpu, igpu, accel
    total_bytes: int
    free_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("gpu", "igpu")

    def as_json(self) -> dict[str, Any]:
        return {"name": self.label, "total_bytes": self.total_bytes, "free_bytes": self.free_bytes}

    @property
    def label(self) -> str:
        return f"{self.name} ({self.description})" if self.description and self.description != self.name else self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=1)
def _ggml() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    base = load_shared_library("ggml-base", _LIB_DIR)
    reg = load_shared_library("ggml", _LIB_DIR)
    reg.ggml_backend_dev_count.restype = ctypes.c_size_t
    reg.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    reg.ggml_backend_dev_get.restype = ctypes.c_void_p
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, name).argtypes = [ctypes.c_void_p]
        getattr(base, name).restype = ctypes.c_char_p
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    base.ggml_backend_dev_memory.restype = None
    return base, reg


def list_devices() -> list[Device]:
    """Every device ggml registered (GPUs first as ggml orders them, the CPU last), memory now."""
    llama_cpp.llama_backend_init()
    base, reg = _ggml()
    devices = []
    for index in range(reg.ggml_backend_dev_count()):
        handle = reg.ggml_backend_dev_get(index)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
        devices.append(
            Device(
                name=(base.ggml_backend_dev_name(handle) or b"?").decode(errors="replace"),
                description=(base.ggml_backend_dev_description(handle) or b"").decode(errors="replace").strip(),
                kind=_KINDS.get(base.ggml_backend_dev_type(handle), "other"),
                total_bytes=total.value,
                free_bytes=free.value,
            )
        )
    return [_with_available_ram(d) if d.kind == "cpu" else d for d in devices]


def _with_available_ram(device: Device) -> Device:
    """ggml reports the CPU's free memory as its total; the kernel's MemAvailable, within the
    process's cgroup memory limit (``host/memory.py``), is the truth."""
    available = available_bytes()
    if available is None:
        return device
    return Device(device.name, device.description, device.kind, device.total_bytes, min(available, device.total_bytes))


def device_handles() -> dict[str, int]:
    """ggml device name -> handle (ggml_backend_dev_t), for `--devices`."""
    llama_cpp.llama_backend_init()
    base, reg = _ggml()
    handles = {}
    for index in range(reg.ggml_backend_dev_count()):
        handle = reg.ggml_backend_dev_get(index)
        handles[(base.ggml_backend_dev_name(handle) or b"?").decode(errors="replace")] = handle
    return handles


def gpu_devices(devices: list[Device]) -> list[Device]:
    return [d for d in devices if d.is_gpu]


def host_device(devices: list[Device]) -> Device:
    """The CPU and its RAM (ggml always registers it)."""
    for device in devices:
        if device.kind == "cpu":
            return device
    return Device("CPU", "", "cpu", 0, 0)


def build_has_gpu_backend() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass(frozen=True)
class PresentGpu:
    """A GPU the vendor's tool lists, whatever this build can do with it."""

    vendor: str
    name: str

    @property
    def label(self) -> str:
        return self.name if self.name.upper().startswith(self.vendor) else f"{self.vendor} {self.name}"


VENDOR_TOOL_SECONDS = 10.0
_VENDOR_TOOLS = (("nvidia-smi", "NVIDIA", ("-L",)), ("rocminfo", "AMD", ()))


@dataclass(frozen=True)
class NoAnswer:
    """A vendor tool that could not say which GPUs it sees: unknown this time, not "no GPU"."""

    reason: str  # one line: "nvidia-smi -L did not answer within 10 s"


def gpus_present(timeout: float | None = None) -> list[PresentGpu]:
    """GPUs that `nvidia-smi -L` or `rocminfo` list, to catch a GPU the build does not use
    (a tool that does not answer lists nothing here)."""
    found: list[PresentGpu] = []
    for tool, vendor, args in _VENDOR_TOOLS:
        listed = _ask(tool, vendor, args, timeout)
        found += [] if listed is None or isinstance(listed, NoAnswer) else listed
    return found


def gpus_listed(timeout: float | None = None) -> list[PresentGpu] | NoAnswer:
    """What the installed vendor tools list now, or `NoAnswer` when one of them timed out, could
    not run or was killed: the caller keeps what it knew instead of reading that as "GPU gone".

    A tool that answers with an error status (nvidia-smi's "No devices were found", "GPU has fallen
    off the bus", a driver it cannot reach) is the driver's answer: it lists nothing."""
    found: list[PresentGpu] = []
    for tool, vendor, args in _VENDOR_TOOLS:
        listed = _ask(tool, vendor, args, timeout)
        if isinstance(listed, NoAnswer):
            return listed
        found += listed or []
    return found


def _ask(tool: str, vendor: str, args: tuple[str, ...], timeout: float | None) -> list[PresentGpu] | NoAnswer | None:
    """The GPUs one tool lists (given ``timeout``, else VENDOR_TOOL_SECONDS); None when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        return None
    timeout = VENDOR_TOOL_SECONDS if timeout is None else timeout
    command = " ".join((tool, *args))
    try:
        # errors="replace": bytes that are no UTF-8 (a broken driver) crashed serve after its load
        result = subprocess.run([path, *args], capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return NoAnswer(f"{command} did not answer within {timeout:g} s")
    except OSError as exc:
        return NoAnswer(f"{command} could not run: {exc.strerror or exc}")
    if result.returncode < 0:
        return NoAnswer(f"{command} was killed by signal {-result.returncode}")
    if result.returncode != 0:
        return []
    parse = _nvidia_names if vendor == "NVIDIA" else _rocm_names
    return [PresentGpu(vendor, name) for name in parse(result.stdout)]


def _nvidia_names(text: str) -> list[str]:
    # "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-...)"
    return [line.split(":", 1)[1].split("(UUID")[0].strip() for line in text.splitlines() if line.startswith("GPU ") and ":" in line]


def _rocm_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key.strip() == "Name" and value.strip().startswith("gfx"):
            names.append(value.strip())
    return names
