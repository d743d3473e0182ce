"""GPU placement options, turned into llama.cpp's model and context parameters.

- `split_mode` (none, layer, row), `main_gpu`, `tensor_split` (proportions per GPU) and `devices`
  (ggml device names such as CUDA0,CUDA1) decide where the weights go, as llama-server's
  `--split-mode/--main-gpu/--tensor-split/--device` do;
- `cache_type_k/v` (f16, q8_0, q4_0) quantize the KV cache. llama.cpp can only use a quantized V
  cache inside flash attention, so `auto` flash attention is switched on for it and `off` refused.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from vramsupply.config.settings import setting_flag
from vramsupply.errors import ConfigError

CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
SPLIT_MODES = {"none": llama_cpp.LLAMA_SPLIT_MODE_NONE, "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER, "row": llama_cpp.LLAMA_SPLIT_MODE_ROW}
QUANT_BLOCK = 32
CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def cpu_attention_prefers_plain(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU runs attention faster without llama.cpp's flash attention kernel: an Intel
    CPU with AMX (Sapphire Rapids and later), the one kind where that was measured.

    On the 2-core Intel Xeon VM (AVX-512 and AMX), the kernel made every decode row pay for the
    whole context: a stream at depth 1000 decoded at 63 tok/s with it and 94 without
    (``llama-batched-bench``, bench model), and the marketplace bench's goodput at 0.4 conv/s
    went from 11 to 38 tok/s with it off. On the 2-core AMD EPYC VM (Zen 4, AVX-512) it was the
    other way: 4 streams at depth 1000 prefilled at 459-696 tok/s with it and 323-391 without,
    and the marketplace goodput at 0.2 and 0.4 conv/s was 17.9 and 23.7 tok/s with it, 9.6 and
    12.7 without. Elsewhere llama.cpp's own choice (on) is kept.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    first_cpu = text.split("\n\n", 1)[0]
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu.splitlines())}
    return fields.get("vendor_id") == "GenuineIntel" and "amx_tile" in fields.get("flags", "").split()


class GpuOptionError(ConfigError, ValueError):
    """A GPU option this build or model cannot honour; the message names the option and the fix.

    A ``ConfigError`` (exit 2, one line) wherever it escapes: the settings refuse what they can
    alone (``config.Settings``), and what only this build or model can tell ends here."""


@dataclass(frozen=True)
class GpuOptions:
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()
    devices: tuple[str, ...] = ()
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"

    def __post_init__(self) -> None:
        if self.split_mode not in SPLIT_MODES:
            raise GpuOptionError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, got {self.split_mode!r}")
        for name in ("cache_type_k", "cache_type_v"):
            if getattr(self, name) not in CACHE_TYPES:
                raise GpuOptionError(f"{name} must be one of {', '.join(CACHE_TYPES)}, got {getattr(self, name)!r}")
        if self.tensor_split and not (all(math.isfinite(s) and s >= 0 for s in self.tensor_split) and any(self.tensor_split)):
            raise GpuOptionError(f"tensor_split needs finite, non-negative shares, not all zero, got {','.join(map(str, self.tensor_split))}")

    @property
    def quantized_v(self) -> bool:
        return self.cache_type_v != "f16"

    def flash_attention(self, mode: str, on_gpu: bool = True) -> str:
        """The flash attention mode to use: a quantized V cache needs it on, and ``auto`` is off for
        a model that runs on the CPU alone of a CPU whose attention is faster without it
        (``cpu_attention_prefers_plain``). Otherwise ``auto`` is llama.cpp's: on wherever a backend
        supports it, the CPU included."""
        if not self.quantized_v:
            plain_cpu = mode == "auto" and not on_gpu and cpu_attention_prefers_plain()
            return "off" if plain_cpu else mode
        if mode == "off":
            raise GpuOptionError(f"a {self.cache_type_v} V cache needs flash attention: use {setting_flag('flash_attention')} auto or on, or {setting_flag('cache_type_v')} f16")
        return "on"

    def check_head_size(self, head_dim_k: int, head_dim_v: int) -> None:
        """Quantized cache rows are whole 32-value blocks, so the head size must be a multiple of 32."""
        for name, kind, head in (("cache_type_k", self.cache_type_k, head_dim_k), ("cache_type_v", self.cache_type_v, head_dim_v)):
            if kind != "f16" and head % QUANT_BLOCK:
                raise GpuOptionError(f"a {kind} KV cache needs a head size that is a multiple of {QUANT_BLOCK}; this model's is {head}: use {setting_flag(name)} f16")

    def apply_to_model(self, params: llama_cpp.llama_model_params) -> list[Any]:
        """Set the placement fields; returns the ctypes arrays that must outlive the model load."""
        params.split_mode = SPLIT_MODES[self.split_mode]
        params.main_gpu = self.main_gpu
        keep: list[Any] = []
        if self.tensor_split:
            limit = llama_cpp.llama_max_devices()
            if len(self.tensor_split) > limit:
                raise GpuOptionError(f"tensor_split has {len(self.tensor_split)} shares; this build supports at most {limit} devices")
            shares = (ctypes.c_float * limit)(*self.tensor_split)
            params.tensor_split = shares
            keep.append(shares)
        if self.devices:
            handles = (ctypes.c_void_p * (len(self.devices) + 1))(*[device_handle(name) for name in self.devices], None)
            params.devices = ctypes.cast(handles, ctypes.c_void_p).value
            keep.append(handles)
        return keep

    def apply_to_context(self, params: llama_cpp.llama_context_params) -> None:
        params.type_k = CACHE_TYPES[self.cache_type_k]
        params.type_v = CACHE_TYPES[self.cache_type_v]

    @classmethod
    def of(cls, settings: Any) -> GpuOptions:
        """The placement and KV cache options of ``settings`` (a ``config.Settings``)."""
        return cls(
            split_mode=settings.split_mode,
            main_gpu=settings.main_gpu,
            tensor_split=tuple(settings.tensor_split or ()),
            devices=tuple(settings.devices or ()),
            cache_type_k=settings.cache_type_k,
            cache_type_v=settings.cache_type_v,
        )

    def placement_problem(self) -> str | None:
        """Why this build cannot place a model as asked (a device it lacks, too many
        ``tensor_split`` shares), before any model is read; None when it can. ``doctor`` and
        ``service install`` ask it: ``serve`` fails on it at load, so a service would restart forever."""
        try:
            self.apply_to_model(llama_cpp.llama_model_default_params())
        except GpuOptionError as exc:
            return str(exc)
        return None


def device_handle(name: str) -> int:
    """The ggml device called `name` (case-insensitive), or an error listing the ones there are."""
    from vramsupply.gpu.devices import device_handles

    handles = device_handles()
    for known, handle in handles.items():
        if known.lower() == name.lower():
            return handle
    raise GpuOptionError(f"no device {name!r} in this llama.cpp build; it has: {', '.join(handles) or 'none'} (vramsupply doctor lists them)")
