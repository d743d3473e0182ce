"""A provider's `vramsupply bench` on a machine that is not tidy: a hand-edited or broken bench.json,
a data dir that cannot be written, a context too short for the slots, one slot, odd --seconds.

Each runs the real CLI on the tiny model in a fresh HOME (conftest's isolated_env), and checks what
the provider sees (one line, an exit code) and what stays in bench.json.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_MODEL, run_cli

from vramsupply.engine import EngineError
from vramsupply.throughput import default_bench_path, measured_speeds
from vramsupply.throughput.measure import _first_tokens

ONE_THREAD = {"VRAM_SUPPLY_THREADS": "1"}  # as test_bench.py: two threads spin at ggml's barriers on a busy machine


def measurement(model: str, **changes: Any) -> dict[str, Any]:
    entry = {
        "model": model,
        "quant": "Q4_K_M",
        "parallel": 4,
        "single_stream_tokens_per_second": 41.5,
        "all_slots_tokens_per_second": 120.0,
        "measured_at": 1_700_000_000.0,
        "seconds": 12.0,
        "agent_version": "0.1.0",
    }
    return {**entry, **changes}


HAND_EDITED = (
    "{\n"
    + '  "results": {\n'
    + f'    "other|Q4_K_M": {json.dumps(measurement("other"))},\n'
    + '    "bad|": null,\n'
    + f'    "nan|Q4_K_M": {json.dumps(measurement("nan", single_stream_tokens_per_second=float("nan")))},\n'
    + f'    "minf|Q4_K_M": {json.dumps(measurement("minf", all_slots_tokens_per_second=float("-inf")))},\n'
    + f'    "negative|Q4_K_M": {json.dumps(measurement("negative", parallel=-3))},\n'
    + f'    "future|Q4_K_M": {json.dumps(measurement("future", measured_at=1e300))}\n'
    + "  }\n}\n"
)


def bench(*args: str, env: dict[str, str] | None = None) -> Any:
    return run_cli("bench", "--model", str(TINY_MODEL), "--seconds", "3", *args, env={**ONE_THREAD, **(env or {})})


def strict_json(text: str) -> Any:
    """JSON as any other program reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_bad_entries_in_bench_json_are_skipped_and_every_other_models_result_is_kept() -> None:
    path = default_bench_path()
    path.parent.mkdir(parents=True)
    path.write_text(HAND_EDITED)

    result = bench("--parallel", "2")

    assert result.returncode == 0, result.stderr
    stored = strict_json(path.read_text())["results"]
    assert sorted(stored) == ["other|Q4_K_M", "stories260k|"]
    assert stored["other|Q4_K_M"] == measurement("other")
    [warning] = [line for line in result.stderr.splitlines() if "no measurement" in line]
    for key in ("'bad|'", "'nan|Q4_K_M'", "'minf|Q4_K_M'"):
        assert key in warning
    assert "and 2 more" in warning and "validation error" not in result.stderr
    [kept] = path.parent.glob("bench.json.bad-*")
    assert kept.read_text() == HAND_EDITED and str(kept) in warning  # what was dropped is not lost


def test_impossible_measurements_are_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    path = default_bench_path()
    path.parent.mkdir(parents=True)
    path.write_text(HAND_EDITED)

    with caplog.at_level(logging.WARNING):
        speeds = measured_speeds()

    assert speeds == {"other": (120.0, 4)}
    [record] = caplog.records
    assert "\n" not in record.getMessage() and "5 entries" in record.getMessage()


def test_a_bench_json_that_is_not_json_is_kept_aside_not_overwritten() -> None:
    path = default_bench_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"results": {"other|Q4_K_M": {"model": "other", "quant": "Q4_K_')  # cut short

    result = bench("--parallel", "1")

    assert result.returncode == 0, result.stderr
    assert list(strict_json(path.read_text())["results"]) == ["stories260k|"]
    [kept] = path.parent.glob("bench.json.bad-*")
    assert kept.read_text().endswith('"Q4_K_')
    assert f"is kept in {kept}" in result.stderr


def test_a_stream_that_fails_before_its_first_token_is_one_error_line() -> None:
    result = bench("--parallel", "1", env={"VRAM_SUPPLY_CONTEXT_LENGTH": "16"})

    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr
    [line] = error_lines(result.stderr)
    assert result.stderr.strip().endswith(line) and "context length of at least" in line
    assert not default_bench_path().exists()


def test_waiting_for_first_tokens_leaves_nothing_unretrieved_when_a_stream_fails() -> None:
    unretrieved: list[dict[str, Any]] = []
    errors: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0)  # after the wait for first tokens has begun, as the engine answers
        raise EngineError("the prompt does not fit")

    async def a_stream_fails() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unretrieved.append(context))
        tasks = [asyncio.create_task(fails())]
        try:
            await _first_tokens([asyncio.Event()], tasks)
        except EngineError as exc:
            errors.append(str(exc))
        await asyncio.gather(*tasks, return_exceptions=True)
        del tasks  # the stream's error, raised again in _first_tokens, holds its frame
        for _ in range(3):
            await asyncio.sleep(0)
        gc.collect()  # what nobody retrieved is reported when it is collected
        await asyncio.sleep(0)

    asyncio.run(a_stream_fails())
    assert errors == ["the prompt does not fit"]
    assert [context["message"] for context in unretrieved] == []


def test_too_many_slots_for_the_kv_cache_are_refused_before_measuring() -> None:
    result = bench("--parallel", "16", env={"VRAM_SUPPLY_CONTEXT_LENGTH": "256"})

    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "16 slots" in line and "--parallel 3 or fewer" in line and "prompt processing" in line
    assert "bench: 1 stream for" not in result.stderr  # nothing measured, nothing saved
    assert not default_bench_path().exists()


def test_one_slot_is_said_in_the_singular_and_measured_once() -> None:
    result = bench("--parallel", "1")

    assert result.returncode == 0, result.stderr
    assert "with 1 slot busy" in result.stdout and "(1 slot)" in result.stderr
    assert "1 streams" not in result.stderr and "1 slots" not in result.stderr + result.stdout


def test_a_data_dir_that_cannot_be_written_is_said_before_measuring(isolated_env: Path) -> None:
    share = isolated_env / ".local" / "share"  # a file where the data dir's parent should be: fails for root too
    share.parent.mkdir(parents=True, exist_ok=True)
    share.write_text("not a directory\n")

    result = bench()

    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert str(default_bench_path()) in line and f"{share} is a file" in line
    assert "bench: 1 stream for" not in result.stderr and "loading" not in result.stderr


def test_a_bench_json_that_is_a_directory_is_named_before_measuring() -> None:
    path = default_bench_path()
    path.mkdir(parents=True)

    result = bench()

    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert str(path) in line and ".bench-" not in line and "not a regular file" in line
    assert "bench: 1 stream for" not in result.stderr


@pytest.mark.parametrize("seconds", ["nan", "inf", "2", "601"])
def test_seconds_outside_3_to_600_is_one_clear_line(seconds: str) -> None:
    result = run_cli("bench", "--model", str(TINY_MODEL), "--seconds", seconds)

    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "from 3 to 600" in line and seconds in line
