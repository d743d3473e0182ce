"""Flash attention: llama.cpp's `auto` (on) is kept, except for a model on the CPU alone of an Intel
CPU with AMX, where llama.cpp's CPU kernel made every decode row pay for the whole context."""

from __future__ import annotations

import logging
from pathlib import Path

import llama_cpp
import pytest

from conftest import TINY_MODEL
from vramsupply.config import Settings as AgentSettings
from vramsupply.engine import Engine, EngineOptions
from vramsupply.gpu.estimate import ModelShape, compute_bytes
from vramsupply.gpu import options as gpu_options
from vramsupply.gpu.options import GpuOptions, cpu_attention_prefers_plain
from vramsupply.gpu.planning import estimate_settings

BENCH = ModelShape(architecture="llama", n_layer=12, n_embd=768, n_head=12, kv_heads=(3,) * 12, head_dim_k=64,
                   head_dim_v=64, n_vocab=32000, n_ctx_train=4096, header_bytes=0, input_bytes=0)


XEON = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n\nprocessor\t: 1\n"
EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
DESKTOP = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Core(TM) i7\nflags\t\t: fpu avx2\n"


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend to run on a CPU whose attention is (True) or is not (False) faster without flash attention."""

    def pretend(prefers_plain: bool) -> None:
        monkeypatch.setattr(gpu_options, "cpu_attention_prefers_plain", lambda: prefers_plain)

    return pretend


@pytest.mark.parametrize(("cpuinfo", "plain"), [(XEON, True), (EPYC, False), (DESKTOP, False), (None, False)],
                         ids=["xeon-amx", "amd-epyc", "intel-without-amx", "unreadable"])
def test_only_an_intel_cpu_with_amx_is_known_to_run_attention_faster_without_it(tmp_path: Path, cpuinfo: str | None, plain: bool) -> None:
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert cpu_attention_prefers_plain(path) is plain


def test_auto_is_off_on_such_a_cpu_and_left_to_llama_cpp_elsewhere(cpu) -> None:
    plain = GpuOptions()
    cpu(True)
    assert plain.flash_attention("auto", on_gpu=False) == "off"
    assert plain.flash_attention("auto", on_gpu=True) == "auto"
    assert plain.flash_attention("on", on_gpu=False) == "on", "asked for: kept"
    assert GpuOptions(cache_type_v="q8_0").flash_attention("auto", on_gpu=False) == "on", "a quantized V cache needs it"
    cpu(False)
    assert plain.flash_attention("auto", on_gpu=False) == "auto"
    assert plain.flash_attention("off", on_gpu=False) == "off", "asked for: kept"


def test_the_memory_plan_sizes_the_cpu_attention_buffer_without_flash_attention(cpu) -> None:
    cpu(True)
    settings = AgentSettings(model="m.gguf")
    on_cpu, on_gpu = estimate_settings(settings, on_gpu=False), estimate_settings(settings, on_gpu=True)
    assert not on_cpu.flash_attention and on_gpu.flash_attention
    # Without it llama.cpp materializes the attention scores: a bigger compute buffer on the CPU.
    assert compute_bytes(BENCH, on_cpu) > compute_bytes(BENCH, on_gpu)
    cpu(False)
    assert estimate_settings(settings, on_gpu=False).flash_attention


@pytest.mark.parametrize("n_gpu_layers", [0, -1, 5], ids=["no-layers", "all-layers", "some-layers"])
def test_a_model_on_such_a_cpu_is_served_without_flash_attention(caplog: pytest.LogCaptureFixture, cpu, n_gpu_layers: int) -> None:
    """Also when layers are asked for and the build cannot offload them (as the plan sees it)."""
    cpu(True)
    if n_gpu_layers and llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads those layers: the model is not on the CPU alone")
    with caplog.at_level(logging.DEBUG, logger="vramsupply.llama"):
        with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, threads=1, n_gpu_layers=n_gpu_layers)):
            pass
    settings = [r.getMessage() for r in caplog.records if "flash_attn" in r.getMessage()]
    assert settings and all("disabled" in line for line in settings), settings


def test_elsewhere_a_model_on_the_cpu_gets_llama_cpps_flash_attention(caplog: pytest.LogCaptureFixture, cpu) -> None:
    cpu(False)
    with caplog.at_level(logging.DEBUG, logger="vramsupply.llama"):
        with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, threads=1)):
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert any("flash_attn" in line and "auto" in line for line in lines)
    assert any("Flash Attention enabled" in line for line in lines)
