"""`vramsupply serve` follows the memory plan: it picks a quant that fits and refuses what cannot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from fakehub import FakeFile, FakeHub, FakeRepo
from gguf_shapes import LLAMA_8B, write_header_only


def test_explicit_settings_that_cannot_fit_are_refused_before_loading(tmp_path: Path) -> None:
    # Header-only: loading it would fail, so an answer about memory proves nothing was loaded.
    model = write_header_only(tmp_path / "llama-8b-Q4_K_M.gguf", LLAMA_8B)

    result = run_cli("serve", "--model", str(model), "--context-length", "131072", "--parallel", "256", "--kv-per-slot", "--no-register", "--port", "0")

    assert result.returncode == 1
    message = result.stderr.strip()
    assert message.startswith("error: the model does not fit: Q4_K_M needs ")
    assert "KV 4.00 TiB (256 slot(s) x 131072 tokens, 16.00 GiB each)" in message
    assert message.endswith("lower --context-length (VRAM_SUPPLY_CONTEXT_LENGTH) or --parallel (VRAM_SUPPLY_PARALLEL), or use a smaller quantization of this model (another .gguf file)")
    assert "loading" not in result.stderr


@pytest.fixture
def tiny_hub() -> Iterator[FakeHub]:
    tiny = FakeFile(TINY_MODEL.read_bytes())
    with FakeHub([FakeRepo("acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": tiny, "Tiny-Q8_0.gguf": tiny}, ["gguf"])]) as hub:
        yield hub


def test_without_a_quant_serve_takes_the_best_that_fits_and_says_why(tiny_hub: FakeHub, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": tiny_hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}
    with AgentProcess("--model", "acme/Tiny-GGUF", "--port", "0", "--no-register", "--log-level", "INFO", env=env) as agent:
        agent.wait_ready()
        agent.wait_for(lambda: "memory plan:" in agent.log, "the memory plan logged (stderr, read by a thread of its own)")
        assert "memory plan: Q8_0: the best quant that fits" in agent.log
        assert [r.path for r in tiny_hub.requests if r.method == "GET" and "/resolve/" in r.path and "Range" not in r.headers] == [
            "/acme/Tiny-GGUF/resolve/" + tiny_hub.repos["acme/tiny-gguf"].sha + "/Tiny-Q8_0.gguf"
        ], "only the chosen quant is downloaded"
        assert agent.stop() == 0
