"""Flash attention: llama.cpp's `auto` is kept on a GPU and means off for a model on the CPU alone,
where llama.cpp's CPU kernel made every decode row pay for the whole context."""

from __future__ import annotations

import logging

import llama_cpp
import pytest

from conftest import TINY_MODEL
from vramsupply.config import Settings as AgentSettings
from vramsupply.engine import Engine, EngineOptions
from vramsupply.gpu.estimate import ModelShape, compute_bytes
from vramsupply.gpu.options import GpuOptions
from vramsupply.gpu.planning import estimate_settings

BENCH = ModelShape(architecture="llama", n_layer=12, n_embd=768, n_head=12, kv_heads=(3,) * 12, head_dim_k=64,
                   head_dim_v=64, n_vocab=32000, n_ctx_train=4096, header_bytes=0, input_bytes=0)


def test_auto_is_off_on_the_cpu_and_left_to_llama_cpp_on_a_gpu() -> None:
    plain = GpuOptions()
    assert plain.flash_attention("auto", on_gpu=False) == "off"
    assert plain.flash_attention("auto", on_gpu=True) == "auto"
    assert plain.flash_attention("on", on_gpu=False) == "on", "asked for: kept"
    assert GpuOptions(cache_type_v="q8_0").flash_attention("auto", on_gpu=False) == "on", "a quantized V cache needs it"


def test_the_memory_plan_sizes_the_cpu_attention_buffer_without_flash_attention() -> None:
    settings = AgentSettings(model="m.gguf")
    on_cpu, on_gpu = estimate_settings(settings, on_gpu=False), estimate_settings(settings, on_gpu=True)
    assert not on_cpu.flash_attention and on_gpu.flash_attention
    # Without it llama.cpp materializes the attention scores: a bigger compute buffer on the CPU.
    assert compute_bytes(BENCH, on_cpu) > compute_bytes(BENCH, on_gpu)


@pytest.mark.parametrize("n_gpu_layers", [0, -1, 5], ids=["no-layers", "all-layers", "some-layers"])
def test_a_model_on_the_cpu_is_served_without_flash_attention(caplog: pytest.LogCaptureFixture, n_gpu_layers: int) -> None:
    """Also when layers are asked for and the build cannot offload them (as the plan sees it)."""
    if n_gpu_layers and llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads those layers: the model is not on the CPU alone")
    with caplog.at_level(logging.DEBUG, logger="vramsupply.llama"):
        with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, threads=1, n_gpu_layers=n_gpu_layers)):
            pass
    settings = [r.getMessage() for r in caplog.records if "flash_attn" in r.getMessage()]
    assert settings and all("disabled" in line for line in settings), settings
