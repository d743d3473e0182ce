"""`vramsupply status`, `demand`, `earnings` and `devplatform` when what they show is hostile or odd.

A provider runs these commands in a terminal. Model names, messages and ids come from the
platform, from the registration record (an older or broken agent may have written it), from
whatever answers at the agent's address, and from the ledger. None of it may restyle the output,
stop the command with a traceback, or reach the terminal as an escape sequence it obeys; and a
price band that is no band must not turn into advice.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import run_cli
from live_platform import API_KEY, free_port
from test_platform_cli import OneAnswerPlatform, write_raw_state

from vramsupply.ledger import Entry, LedgerStore, default_ledger_path, earned_nanocents, gross_nanocents
from vramsupply.platform import default_state_path
from vramsupply.throughput import Capacity, default_bench_path, save

TITLE_AND_CLEAR = "\x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[31mRED"
TITLE_AND_CLEAR_SHOWN = "\\x1b]0;PWNED-TITLE\\x07\\x1b[2J\\x1b[31mRED"
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]")
"""Anything a terminal would obey (a newline ends a line and is fine)."""


def no_agent() -> dict[str, str]:
    """Where `status` looks for an agent when the record names no address: a port nothing listens on."""
    return {"VRAM_SUPPLY_PORT": str(free_port())}


def on_the_platform(url: str, **extra: str) -> dict[str, str]:
    return {"VRAM_SUPPLY_PLATFORM_URL": url, "VRAM_SUPPLY_API_KEY": API_KEY, **extra}


def market(*models: dict[str, Any]) -> bytes:
    return json.dumps({"models": [{"requests_24h": 1, "online_providers": 1, **model} for model in models]}).encode()


def assert_plain(stdout: str) -> None:
    assert not RAW_CONTROL.search(stdout), f"a control character reaches the terminal: {RAW_CONTROL.findall(stdout)!r}"


# status: the registration record


def test_status_shows_a_rejection_message_with_brackets_as_the_platform_wrote_it() -> None:
    write_raw_state(
        phase="rejected", message="endpoint taken; see [/docs] or [bold]x", provider_id="prov_[/x]",
        platform_url="https://vram.supply/[red]", endpoint_url="https://gpu.example.com/[/]",
    )
    result = run_cli("status", env=no_agent())

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    for written in ("endpoint taken; see [/docs] or [bold]x", "prov_[/x]", "https://vram.supply/[red]", "https://gpu.example.com/[/]"):
        assert written in result.stdout


def test_status_shows_escape_sequences_in_the_record_escaped() -> None:
    write_raw_state(phase="rejected", message=f"bad {TITLE_AND_CLEAR}\nsecond line\x9b31m", provider_id=f"prov_{TITLE_AND_CLEAR}")
    table = run_cli("status", env=no_agent())
    as_json = run_cli("status", "--json", env=no_agent())

    assert table.returncode == 1 and "Traceback" not in table.stderr, table.stderr
    assert_plain(table.stdout)
    assert f"bad {TITLE_AND_CLEAR_SHOWN}\\x0asecond line\\x9b31m" in table.stdout
    assert f"prov_{TITLE_AND_CLEAR_SHOWN}" in table.stdout
    assert_plain(as_json.stdout)
    assert json.loads(as_json.stdout)["registration"]["message"] == f"bad {TITLE_AND_CLEAR}\nsecond line\x9b31m"


def test_status_cuts_a_huge_message_to_a_readable_length() -> None:
    write_raw_state(phase="rejected", message="x" * 1_000_000)
    result = run_cli("status", env=no_agent())

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "(999,500 more characters)" in result.stdout  # rich may wrap the line before it
    assert len(result.stdout) < 10_000


@pytest.mark.parametrize(
    "record",
    [
        {"state": "online", "provider": "prov_1"},  # another version's fields
        {"phase": "registered", "provider_id": 5, "platform_url": ["https://vram.supply"]},  # wrong types
        {"phase": "paused"},  # a phase this version does not know
    ],
    ids=["other-fields", "wrong-types", "unknown-phase"],
)
def test_status_says_a_record_it_cannot_read_is_there(record: dict[str, object]) -> None:
    if "state" in record:
        default_state_path().parent.mkdir(parents=True, exist_ok=True)
        default_state_path().write_text(json.dumps(record))
    else:
        write_raw_state(**record)
    result = run_cli("status", env=no_agent())

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "none recorded:" in result.stdout and "holds no record this version can read" in result.stdout
    assert "has not tried to register" not in result.stdout


@pytest.mark.parametrize(
    ("heartbeat", "shown"),
    [(time.time() + 86400, "recorded as in the future"), (1.0, "over a year ago"), (-1e300, "over a year ago"), (time.time() - 30, "s ago")],
    ids=["future", "1970", "absurd", "recent"],
)
def test_status_reads_an_odd_heartbeat_time_sensibly(heartbeat: float, shown: str) -> None:
    write_raw_state(last_heartbeat_at=heartbeat)
    result = run_cli("status", env=no_agent())

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [row] = [line for line in result.stdout.splitlines() if "last heartbeat" in line]
    assert shown in row and len(row) < 250


# status: what answers at the agent's address


def test_status_shows_a_hostile_health_answer_as_plain_text() -> None:
    health = {
        "status": "ok", "model": f"[/x]{TITLE_AND_CLEAR}", "slots_busy": "[bold]9",
        "placement": {"devices": [{"name": "gpu\x1b[2J"}, "[/cpu]"], "layers_on_gpu": "\x9b1", "layers_total": 7},
        "warnings": [f"[/w] low VRAM {TITLE_AND_CLEAR}"],
    }
    with OneAnswerPlatform(200, json.dumps(health).encode()) as agent:
        write_raw_state(local_url=agent.url)
        table = run_cli("status", env=no_agent())
        as_json = run_cli("status", "--json", env=no_agent())

    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert_plain(table.stdout)
    assert f"[/x]{TITLE_AND_CLEAR_SHOWN}" in table.stdout and "[bold]9" in table.stdout
    assert "gpu\\x1b[2J, [/cpu]; \\x9b1/7 layers on the GPU" in table.stdout
    assert f"[/w] low VRAM {TITLE_AND_CLEAR_SHOWN}" in table.stdout
    assert as_json.returncode == 0
    assert_plain(as_json.stdout)
    assert json.loads(as_json.stdout)["agent"]["health"] == health


def test_status_survives_a_health_answer_of_odd_shapes() -> None:
    health = {"status": "ok", "model": ["a", "b"], "placement": {"devices": 5}, "warnings": "disk almost full", "queue": float("nan")}
    with OneAnswerPlatform(200, json.dumps(health).encode()) as agent:
        write_raw_state(local_url=agent.url)
        table = run_cli("status", env=no_agent())
        as_json = run_cli("status", "--json", env=no_agent())

    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert table.stdout.count("disk almost full") == 1 and "5; None/None layers on the GPU" in table.stdout
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))["agent"]["health"]["queue"] is None


def test_status_lists_a_few_warnings_and_counts_the_rest() -> None:
    health = {"status": "ok", "warnings": [f"warning {i}" for i in range(50)]}
    with OneAnswerPlatform(200, json.dumps(health).encode()) as agent:
        write_raw_state(local_url=agent.url)
        result = run_cli("status", env=no_agent())

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("WARNING") == 10 and "warning 9 " in result.stdout and "warning 10 " not in result.stdout
    assert "… and 40 more warnings (`vramsupply status --json` lists them)" in result.stdout


# demand


def test_demand_shows_model_names_with_escape_sequences_and_brackets_as_text() -> None:
    answer = market({"model": f"evil{TITLE_AND_CLEAR}"}, {"model": "acme/x[/docs]"}, {"model": "[bold]loud"})
    with OneAnswerPlatform(200, answer) as platform:
        result = run_cli("demand", env=on_the_platform(platform.url, VRAM_SUPPLY_MODEL="acme/x[/docs]"))

    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert_plain(result.stdout)
    assert f"evil{TITLE_AND_CLEAR_SHOWN}" in result.stdout and "[bold]loud" in result.stdout
    assert "★ acme/x[/docs]" in result.stdout and "Pricing advice for acme/x[/docs] (output price" in result.stdout


def test_demand_json_keeps_names_exact_and_escapes_what_a_terminal_obeys() -> None:
    name = f"c1\x9b31m del\x7f rtl\u202eevil {TITLE_AND_CLEAR}"
    with OneAnswerPlatform(200, market({"model": name})) as platform:
        result = run_cli("demand", "--json", env=on_the_platform(platform.url))

    assert result.returncode == 0, result.stderr
    assert_plain(result.stdout)
    assert json.loads(result.stdout)["models"][0]["model"] == name


def test_demand_lists_a_model_you_serve_first_whatever_its_case() -> None:
    answer = market({"model": "other/model", "requests_24h": 100}, {"model": "STORIES260K", "requests_24h": 1})
    with OneAnswerPlatform(200, answer) as platform:
        result = run_cli("demand", env=on_the_platform(platform.url, VRAM_SUPPLY_MODEL="stories260k"))

    assert result.returncode == 0, result.stderr
    rows = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.startswith("│")]
    assert rows == ["★ STORIES260K", "other/model"]


def test_demand_shows_counts_no_market_has_as_a_bound() -> None:
    with OneAnswerPlatform(200, market({"model": "m", "requests_24h": 10**30, "online_providers": -3})) as platform:
        result = run_cli("demand", env=on_the_platform(platform.url))

    assert result.returncode == 0, result.stderr
    [row] = [line for line in result.stdout.splitlines() if "│   m " in line]
    assert "over 1,000,000,000,000" in row and "below 0" in row


@pytest.mark.parametrize(
    ("band", "sent"),
    [
        ({"min": 500, "max": 100, "median": 1000}, "low $5.00, median $10.00, high $1.00"),
        ({"min": 100, "max": 500, "median": 1000}, "low $1.00, median $10.00, high $5.00"),
        ({"min": 500, "max": 100}, "low $5.00, high $1.00"),
    ],
    ids=["low-above-high", "median-above-high", "no-median"],
)
def test_an_inconsistent_price_band_gives_no_advice(band: dict[str, int], sent: str) -> None:
    save(default_bench_path(), Capacity(
        model="stories260k", quant=None, parallel=4, single_stream_tokens_per_second=900.0, all_slots_tokens_per_second=2000.0,
        measured_at=time.time(), seconds=12.0, agent_version="test",
    ))
    with OneAnswerPlatform(200, market({"model": "stories260k", "output_price_per_million": band})) as platform:
        env = on_the_platform(platform.url, VRAM_SUPPLY_MODEL="stories260k")
        table = run_cli("demand", env=env)
        as_json = run_cli("demand", "--json", env=env)

    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if "★ stories260k" in line]
    assert "inconsistent" in row and "$5.00–$1.00" not in row
    assert f"  market band: not used, the platform sent {sent}, which is no band (low ≤ median ≤ high does not hold)" in table.stdout
    assert "below the band" not in table.stdout and "you would earn" not in table.stdout
    assert "buyers are quoted 2 unit(s)/token = $2.00/M for your $2.00/M" in table.stdout  # what depends on your own price only
    [advice] = json.loads(as_json.stdout)["advice"]
    assert advice["band"] is None and advice["position"] is None and advice["earned_cents_per_hour"] is None
    assert advice["inconsistent_band"] == {"median": None, **band}


# earnings


def test_earnings_shows_model_names_with_brackets_as_recorded() -> None:
    default_ledger_path().parent.mkdir(parents=True, exist_ok=True)
    store = LedgerStore(default_ledger_path())
    gross = gross_nanocents(100, 50, 100, 200)
    store.add([Entry(time.time() - 5, f"req-{i}", model, "platform", True, 1, 100, 0, 50, 100, 200, gross, earned_nanocents(gross))
               for i, model in enumerate(("acme/x[/docs]", "[bold]y"))])
    store.close()
    result = run_cli("earnings")

    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "acme/x[/docs]" in result.stdout and "[bold]y" in result.stdout



# devplatform: the user's own key


def test_devplatform_prints_a_key_with_brackets_as_given() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "vramsupply", "devplatform", "--port", "0", "--api-key", "sk-[/x]-[bold]"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        listening, key_line, use_line = (process.stdout.readline() for _ in range(3))
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert listening.startswith("reference platform listening on http://127.0.0.1:"), errors
    assert key_line.strip() == "API key: sk-[/x]-[bold]"
    assert use_line.strip().endswith("VRAM_SUPPLY_API_KEY='sk-[/x]-[bold]'"), "quoted for the shell it is pasted into"
    assert process.returncode == 0 and "Traceback" not in errors
