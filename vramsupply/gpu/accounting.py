"""llama.cpp's own memory accounting of a model, without allocating it (`no_alloc`).

With `no_alloc` llama.cpp reads only the header, places every tensor and reserves the compute graph
as if for real, and logs the buffer sizes it would allocate. The C++ breakdown behind those lines
(`llama_get_memory_breakdown`) is not part of the C API, so the sizes are read from the log lines;
the weights come from `llama_model_size`. The tests check the header-only estimate against it.
"""

from __future__ import annotations

import ctypes
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from vramsupply.engine.model import route_llama_logs
from vramsupply.gpu.estimate import Settings

MIB = 1024 * 1024
_FLASH = {True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
_KV = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")
_STATE = re.compile(r"llama_memory_recurrent: size = +([\d.]+) MiB")
_COMPUTE = re.compile(r"compute buffer size = +([\d.]+) MiB")
_OUTPUT = re.compile(r"output buffer size = +([\d.]+) MiB")
_lock = threading.Lock()


class AccountingError(Exception):
    """llama.cpp could not even simulate loading the model."""


@dataclass(frozen=True)
class Accounting:
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int  # compute buffers plus the logits output buffer
    state_bytes: int = 0  # recurrent states

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.state_bytes + self.compute_bytes


def _mib(pattern: re.Pattern[str], text: str) -> int:
    return int(sum(float(value) for value in pattern.findall(text)) * MIB)


def measure(path: Path, settings: Settings, n_gpu_layers: int = 0) -> Accounting:
    """Simulate loading `path` with these settings; nothing is allocated or read past the header."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    with _lock:
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            model_params = llama_cpp.llama_model_default_params()
            model_params.no_alloc = True
            model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
            model_params.n_gpu_layers = n_gpu_layers
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
            if not model:
                raise AccountingError(f"llama.cpp could not read {path}")
            try:
                weights = llama_cpp.llama_model_size(model)
                context = llama_cpp.llama_init_from_model(model, _context_params(settings))
                if not context:
                    raise AccountingError(f"llama.cpp could not plan a context for {path}")
                llama_cpp.llama_free(context)
            finally:
                llama_cpp.llama_model_free(model)
        finally:
            route_llama_logs()
    text = "".join(lines)
    return Accounting(weights, _mib(_KV, text), _mib(_COMPUTE, text) + _mib(_OUTPUT, text), _mib(_STATE, text))


def _context_params(settings: Settings) -> llama_cpp.llama_context_params:
    """The same context `engine.model.create_context` builds for serving."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = settings.context_length * settings.kv_contexts
    params.n_seq_max = settings.parallel
    params.kv_unified = not settings.kv_per_slot
    params.n_batch = settings.n_batch
    params.n_ubatch = min(settings.n_ubatch, settings.n_batch)
    params.flash_attn_type = _FLASH[settings.flash_attention]
    params.type_k = _CACHE_TYPES[settings.cache_type_k]
    params.type_v = _CACHE_TYPES[settings.cache_type_v]
    return params
