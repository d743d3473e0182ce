"""`vramsupply bench` measures this machine and `serve` reports the result to the platform as capacity."""

from __future__ import annotations

import json
import signal

from agent_process import AgentProcess
from conftest import TINY_MODEL, run_cli
from live_platform import API_KEY, LivePlatform

from vramsupply.platform import api
from vramsupply.throughput import default_bench_path, read_all


def test_bench_measures_one_stream_and_every_slot_and_serve_reports_it_as_capacity() -> None:
    # one decode thread, as the agents in tests use: on a busy shared machine two threads spin at ggml's barriers
    result = run_cli("bench", "--model", str(TINY_MODEL), "--parallel", "3", "--seconds", "3", "--json", env={"VRAM_SUPPLY_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["model"] == "stories260k" and printed["parallel"] == 3
    assert printed["seconds"] == 1.2  # each phase; it was 1.2000000000000002
    assert printed["single_stream_tokens_per_second"] > 0 and printed["all_slots_tokens_per_second"] > 0
    assert "bench: 1 stream for" in result.stderr and "bench: 3 streams for" in result.stderr
    [stored] = read_all(default_bench_path()).values()
    assert stored.model_dump() == printed

    env = {"VRAM_SUPPLY_PLATFORM_URL": "", "VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2"}
    with LivePlatform() as platform:
        env["VRAM_SUPPLY_PLATFORM_URL"] = platform.url
        with AgentProcess("--model", str(TINY_MODEL), "--port", "0", "--endpoint-url", "https://gpu.example.com", env=env) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            [provider] = platform.providers
            expected = api.Capacity(
                single_stream_tokens_per_second=stored.single_stream_tokens_per_second,
                all_slots_tokens_per_second=stored.all_slots_tokens_per_second,
                slots=3,
                measured_at=provider.offer.capacity.measured_at if provider.offer.capacity else "",
            )
            assert provider.offer.capacity == expected
            provider.capacity = None
            agent.wait_for(lambda: provider.capacity == expected, "a heartbeat carrying the capacity")
            demand = platform.platform.store.demand(0)
            assert agent.stop(signal.SIGTERM) == 0
    assert provider.offer.capacity.measured_at.endswith("+00:00")
    assert demand.models[0].capacity_tokens_per_second == stored.all_slots_tokens_per_second  # the platform shows it


def test_bench_errors_are_one_line() -> None:
    missing = run_cli("bench", "--model", "/nonexistent/model.gguf", "--seconds", "3")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "error:" in missing.stderr
    nothing = run_cli("bench")
    assert nothing.returncode == 2 and "no model to serve" in nothing.stderr  # a missing setting: exit 2, as every ConfigError


def test_bench_advice_names_the_variable_of_a_setting_it_has_no_flag_for() -> None:
    """bench has no --cache-type-k (it takes --model, --quant, --parallel, --threads and
    --decode-nice): a KV cache type set in the environment (or the config file) that the model
    cannot take is changed there, and the error says what to set."""
    refused = run_cli("bench", "--model", str(TINY_MODEL), "--seconds", "3", env={"VRAM_SUPPLY_CACHE_TYPE_K": "q4_0"})
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("use --cache-type-k (VRAM_SUPPLY_CACHE_TYPE_K) f16")  # before: "use --cache-type-k f16"


def test_a_result_measured_with_other_settings_than_serve_uses_is_said_at_start() -> None:
    """Measured with a KV cache per slot, offered by an agent whose slots share one: a third too
    high, and nothing said."""
    measured = run_cli("bench", "--model", str(TINY_MODEL), "--parallel", "2", "--seconds", "3", env={"VRAM_SUPPLY_THREADS": "1", "VRAM_SUPPLY_KV_PER_SLOT": "1"})
    assert measured.returncode == 0, measured.stderr
    [stored] = read_all(default_bench_path()).values()
    assert stored.settings is not None and stored.settings["kv_per_slot"] is True and stored.settings["parallel"] == 2

    env = {"VRAM_SUPPLY_API_KEY": API_KEY, "VRAM_SUPPLY_THREADS": "1"}
    with LivePlatform() as platform:
        env["VRAM_SUPPLY_PLATFORM_URL"] = platform.url
        with AgentProcess("--model", str(TINY_MODEL), "--parallel", "2", "--port", "0", "--endpoint-url", "https://gpu.example.com", env=env) as agent:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration")
            [provider] = platform.providers
            assert agent.stop(signal.SIGTERM) == 0
    warning = "the `vramsupply bench` result offered as this agent's capacity was measured with other settings: kv_per_slot true (serving with false)"
    assert agent.log.count(warning) == 1, agent.log
    assert provider.offer.capacity is not None  # still offered: measured here, on this model


def test_bench_takes_threads_as_serve_does_and_records_them() -> None:
    """A provider serving with --threads 1 measures with the same flag: bench had --decode-nice
    but no --threads, so the setting had to go through VRAM_SUPPLY_THREADS."""
    refused = run_cli("bench", "--model", str(TINY_MODEL), "--seconds", "3", "--threads", "0")
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: invalid threads = 0 (from flag --threads)"), refused.stderr
    measured = run_cli("bench", "--model", str(TINY_MODEL), "--parallel", "1", "--seconds", "3", "--threads", "1", "--json")
    assert measured.returncode == 0, measured.stderr
    assert json.loads(measured.stdout)["settings"]["threads"] == 1


def test_bench_says_how_to_give_it_a_longer_context() -> None:
    """bench has no --context-length: "set a context length of at least 73" did not say how."""
    refused = run_cli("bench", "--model", str(TINY_MODEL), "--parallel", "1", "--seconds", "3", env={"VRAM_SUPPLY_CONTEXT_LENGTH": "32"})
    assert refused.returncode == 1 and refused.stderr.strip().endswith("set a context length of at least 73 (VRAM_SUPPLY_CONTEXT_LENGTH)"), refused.stderr
