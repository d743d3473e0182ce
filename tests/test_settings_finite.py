"""Numbers a setting can hold but the code using it cannot: refused on loading, in one line, exit 2.

``--stall-timeout inf`` passed validation (only ``> 0`` was checked), showed in ``config show``, went
into a service's env file, and then crashed ``serve`` with a traceback from the engine, which needs
a finite number; ``1e308`` seconds of download timeout overflowed the socket's timeval the same way.
Every float setting now has a finite upper limit, documented in the README's settings table. A
platform URL ending in /v1 had the agent call /v1/v1/... and be refused with 404s forever.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MODEL, run_cli
from live_platform import API_KEY, LivePlatform

from vramsupply.config import Settings, env_name

# Each float setting and the largest value it takes (README's settings table says the same).
LIMITS = {
    "stall_timeout": 86400,
    "engine_start_timeout": 86400,
    "download_timeout": 3600,
    "drain_timeout": 3600,
    "heartbeat_interval": 120,
    "stream_interval_ms": 1000,
}


def refused(result_stderr: str, returncode: int) -> str:
    """The one line a refused setting gets; no traceback."""
    assert returncode == 2, result_stderr
    assert "Traceback" not in result_stderr
    lines = result_stderr.strip().splitlines()
    assert len(lines) == 1, result_stderr
    return lines[0]


@pytest.mark.parametrize("value", ["inf", "1e308", "nan", "-inf", "0"])
def test_serve_refuses_a_stall_timeout_it_could_not_run_with_in_one_line(value: str) -> None:
    result = run_cli("serve", "--model", str(TINY_MODEL), "--no-register", "--port", "0", "--stall-timeout", value)
    line = refused(result.stderr, result.returncode)
    assert line.startswith("error: invalid stall_timeout = ") and "(from flag --stall-timeout)" in line


@pytest.mark.parametrize("source", ["flag", "env"])
def test_serve_refuses_more_threads_than_llama_cpp_can_run_in_one_line(source: str) -> None:
    """``--threads 100000`` passed validation and crashed the process (a segfault, or libgomp's
    "Thread creation failed") with no error line."""
    flag, env = (["--threads", "100000"], {}) if source == "flag" else ([], {"VRAM_SUPPLY_THREADS": "100000"})
    result = run_cli("serve", "--model", str(TINY_MODEL), "--no-register", "--port", "0", *flag, env=env)
    line = refused(result.stderr, result.returncode)
    origin = "flag --threads" if source == "flag" else "env VRAM_SUPPLY_THREADS"
    assert line.startswith("error: invalid threads = ") and f"(from {origin})" in line and "less than or equal to 512" in line


def test_bench_refuses_an_infinite_stall_timeout_from_the_environment_before_loading_anything() -> None:
    result = run_cli("bench", "--model", str(TINY_MODEL), "--seconds", "3", env={"VRAM_SUPPLY_STALL_TIMEOUT": "inf"})
    line = refused(result.stderr, result.returncode)
    assert line == "error: invalid stall_timeout = 'inf' (from env VRAM_SUPPLY_STALL_TIMEOUT): Input should be a finite number"


@pytest.mark.parametrize("value", ["inf", "1e308"])
@pytest.mark.parametrize("field", sorted(LIMITS))
def test_config_show_refuses_an_endless_number_of_seconds_for_every_float_setting(field: str, value: str) -> None:
    result = run_cli("config", "show", env={env_name(field): value})
    line = refused(result.stderr, result.returncode)
    limit = "a finite number" if value == "inf" else f"less than or equal to {LIMITS[field]}"
    assert line == f"error: invalid {field} = '{value}' (from env {env_name(field)}): Input should be {limit}"


@pytest.mark.parametrize("field", sorted(LIMITS))
def test_nan_is_refused_as_not_a_finite_number_not_as_over_the_limit(field: str) -> None:
    result = run_cli("config", "show", env={env_name(field): "nan"})
    line = refused(result.stderr, result.returncode)
    assert line == f"error: invalid {field} = 'nan' (from env {env_name(field)}): Input should be a finite number"


def test_each_float_setting_takes_its_documented_limit() -> None:
    env = {env_name(field): str(limit) for field, limit in LIMITS.items()}
    result = run_cli("config", "show", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert {field: float(shown[field]["value"]) for field in LIMITS} == LIMITS
    assert {shown[field]["source"] for field in LIMITS} == {f"env {env_name(field)}" for field in LIMITS}


def test_every_float_setting_has_a_finite_upper_limit() -> None:
    """A float setting added later without one would let inf through again."""
    floats = {name for name, field in Settings.model_fields.items() if field.annotation is float}
    assert floats == set(LIMITS)
    for name in floats:
        bounds = [getattr(item, "le", None) or getattr(item, "lt", None) for item in Settings.model_fields[name].metadata]
        assert [bound for bound in bounds if bound is not None] == [LIMITS[name]], name


@pytest.mark.parametrize("shares", ["1e308,1", "1e39,1", "1e-300,1e-300"])
def test_gpu_shares_a_32_bit_float_cannot_hold_are_refused(shares: str) -> None:
    result = run_cli("config", "show", env={"VRAM_SUPPLY_TENSOR_SPLIT": shares})
    line = refused(result.stderr, result.returncode)
    assert line.startswith(f"error: invalid tensor_split = '{shares}' (from env VRAM_SUPPLY_TENSOR_SPLIT): llama.cpp keeps the shares as 32-bit floats")


def test_service_install_writes_no_env_file_for_an_infinite_stall_timeout(tmp_path: Path) -> None:
    env_file = tmp_path / "service.env"
    result = run_cli(
        "service", "install", "--user", "--unit-dir", str(tmp_path / "units"), "--env-file", str(env_file),
        env={"VRAM_SUPPLY_STALL_TIMEOUT": "inf", "VRAM_SUPPLY_MODEL": str(TINY_MODEL), "PATH": str(tmp_path)},
    )
    line = refused(result.stderr, result.returncode)
    assert line.startswith("error: invalid stall_timeout = 'inf' (from env VRAM_SUPPLY_STALL_TIMEOUT)")
    assert not env_file.exists() and not (tmp_path / "units").exists()
    assert "start the service" not in result.stdout


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "/V1"])
def test_a_platform_url_ending_in_v1_is_refused_with_the_base_url_to_use(suffix: str) -> None:
    with LivePlatform() as platform:
        result = run_cli("demand", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url + suffix, "VRAM_SUPPLY_API_KEY": API_KEY})
        line = refused(result.stderr, result.returncode)
        assert line == (
            f"error: invalid platform_url = '{platform.url + suffix}' (from env VRAM_SUPPLY_PLATFORM_URL): must be the platform's "
            f"base URL, without /v1 (the agent adds /v1/... to it): drop the /v1 and use {platform.url}"
        )
        works = run_cli("demand", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY})
        assert works.returncode == 0, works.stderr


def test_a_platform_url_with_a_query_is_refused() -> None:
    result = run_cli("config", "show", env={"VRAM_SUPPLY_PLATFORM_URL": "https://vram.supply/?region=eu"})
    line = refused(result.stderr, result.returncode)
    assert line.endswith("must be the platform's base URL, without ?query or #fragment (the agent adds /v1/... to it)")
