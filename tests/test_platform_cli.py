"""`vramsupply demand`, `rails`, `login` and `devplatform` as a provider runs them, against the reference platform
(`status`: tests/test_platform_status.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
from conftest import TINY_MODEL, run_cli
from fakehub import FakeHub, standard_repos
from live_platform import API_KEY, LivePlatform, free_port

from vramsupply.hub import prepare_model
from vramsupply.platform import PlatformClient, default_state_path
from vramsupply.platform.api import RegisterRequest
from vramsupply.throughput import Capacity, default_bench_path, save


def platform_env(platform: LivePlatform, **extra: str) -> dict[str, str]:
    return {"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY, **extra}


async def register(platform: LivePlatform, model: str, endpoint: str, input_price: int, output_price: int) -> None:
    offer = RegisterRequest(
        endpoint_url=endpoint, model=model, input_price_per_million=input_price, output_price_per_million=output_price, context_length_offered=2048
    )
    async with PlatformClient(platform.url, API_KEY) as client:
        await client.register(offer)


async def buyer_asks_for(platform: LivePlatform, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{platform.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            return response.status


async def test_demand_lists_models_and_stars_the_one_you_serve() -> None:
    with LivePlatform() as platform:
        await register(platform, "stories260k", "http://10.0.0.1:8080", 100, 200)
        await register(platform, "stories260k", "http://10.0.0.2:8080", 150, 300)
        assert [await buyer_asks_for(platform, "qwen/qwen3.5-9b") for _ in range(3)] == [404, 404, 404]

        table = run_cli("demand", env=platform_env(platform, VRAM_SUPPLY_MODEL="stories260k"))
        as_json = run_cli("demand", "--json", env=platform_env(platform))

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    [mine] = [line for line in lines if "stories260k" in line and "│" in line]
    assert "★ stories260k" in mine and "$1.00–$1.50" in mine and "$2.00–$3.00" in mine
    [wanted] = [line for line in lines if "qwen/qwen3.5-9b" in line]
    assert "★" not in wanted and " 3 " in wanted
    assert lines.index(mine) < lines.index(wanted), "models you could serve come first"
    assert json.loads(as_json.stdout) == {
        "models": [
            {
                "model": "qwen/qwen3.5-9b",
                "requests_24h": 3,
                "online_providers": 0,
                "input_price_per_million": None,
                "output_price_per_million": None,
                "capacity_tokens_per_second": None,
            },
            {
                "model": "stories260k",
                "requests_24h": 0,
                "online_providers": 2,
                "input_price_per_million": {"min": 100, "max": 150, "median": 100},
                "output_price_per_million": {"min": 200, "max": 300, "median": 200},
                "capacity_tokens_per_second": None,
            },
        ],
        "advice": [],
    }


async def test_demand_also_stars_models_already_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf-cache"
    with FakeHub(standard_repos()) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        cached = prepare_model("acme/Gizmo-1B", "Q4_K_M", cache_dir=cache, progress=False)
    with LivePlatform() as platform:
        await register(platform, cached.model_id, "http://10.0.0.1:8080", 100, 200)
        await register(platform, "other/model", "http://10.0.0.2:8080", 100, 200)
        table = run_cli("demand", env=platform_env(platform, VRAM_SUPPLY_CACHE_DIR=str(cache)))

    assert table.returncode == 0, table.stderr
    assert [line.split("│")[1].strip() for line in table.stdout.splitlines() if "/" in line and "│" in line] == ["★ acme/gizmo-1b", "other/model"]


async def test_demand_stars_a_local_split_model_under_the_id_serve_registers(tmp_path: Path) -> None:
    first_part = tmp_path / "Gizmo-Q4_K_M-00001-of-00002.gguf"
    first_part.write_bytes(TINY_MODEL.read_bytes())
    served_as = prepare_model(str(first_part), "Q4_K_M").model_id
    with LivePlatform() as platform:
        await register(platform, served_as, "http://10.0.0.1:8080", 100, 200)
        table = run_cli("demand", env=platform_env(platform, VRAM_SUPPLY_MODEL=str(first_part)))

    assert table.returncode == 0, table.stderr
    assert f"★ {served_as}" in table.stdout


async def test_one_absurd_offer_does_not_break_demand_for_everyone() -> None:
    save(default_bench_path(), Capacity(
        model="stories260k", quant=None, parallel=4, single_stream_tokens_per_second=900.0, all_slots_tokens_per_second=2000.0,
        measured_at=time.time(), seconds=12.0, agent_version="test",
    ))
    with LivePlatform() as platform:
        await register(platform, "stories260k", "http://10.0.0.1:8080", 100, 200)
        await register(platform, "stories260k", "http://10.0.0.2:8080", 10**400, 10**26)  # a troll
        env = platform_env(platform, VRAM_SUPPLY_MODEL="stories260k")
        table = run_cli("demand", env=env)
        as_json = run_cli("demand", "--json", env=env)

    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    [row] = [line for line in table.stdout.splitlines() if "★ stories260k" in line]
    assert "$1.00–over $10,000.00" in row and "$2.00–over $10,000.00" in row
    assert "high $10,000.00 (2 online)" in table.stdout and "(capped: an offer outside $0.00–$10,000.00" in table.stdout
    assert as_json.returncode == 0 and "Traceback" not in as_json.stderr, as_json.stderr
    [advice] = json.loads(as_json.stdout)["advice"]
    assert advice["band"] == {"low": 200, "median": 200, "high": 1_000_000, "median_estimated": False, "capped": True}
    # 2000 tok/s = 7.2 M tokens/h × $10,000/M × 0.95 = $68,400/h
    assert advice["earned_cents_per_hour"]["high"] == "6840000.00"


def test_rails_shows_and_toggles_each_rail() -> None:
    with LivePlatform() as platform:
        shown = run_cli("rails", env=platform_env(platform))
        stripe_off = run_cli("rails", "--no-stripe", env=platform_env(platform))
        account = platform.platform.account
        after_stripe_off = (account.accepts_stripe, account.accepts_tempo)
        tempo_off_too = run_cli("rails", "--no-tempo", env=platform_env(platform))
        both_on = run_cli("rails", "--stripe", "--tempo", env=platform_env(platform))
        final = (account.accepts_stripe, account.accepts_tempo)

    assert shown.returncode == 0
    assert rails_shown(shown.stdout) == {"Stripe": "yes", "Tempo (MPP)": "yes"}
    assert after_stripe_off == (False, True)
    assert rails_shown(stripe_off.stdout) == {"Stripe": "no", "Tempo (MPP)": "yes"}
    assert tempo_off_too.returncode == 1
    assert "at least one payment rail must remain enabled" in tempo_off_too.stderr
    assert both_on.returncode == 0 and final == (True, True)


def rails_shown(stdout: str) -> dict[str, str]:
    """The rail → enabled column of the rails table as printed."""
    rows = [[cell.strip() for cell in line.split("│")[1:3]] for line in stdout.splitlines() if line.startswith("│")]
    return {rail: enabled for rail, enabled in rows if rail}


def test_rails_refuses_both_off_before_calling_the_platform() -> None:
    nothing_listening = f"http://127.0.0.1:{free_port()}"
    result = run_cli("rails", "--no-stripe", "--no-tempo", env={"VRAM_SUPPLY_PLATFORM_URL": nothing_listening, "VRAM_SUPPLY_API_KEY": API_KEY})

    assert result.returncode == 2, "a pair of flags that do not go together"
    assert result.stderr.strip() == (
        "error: refusing to disable both payment rails: at least one of Stripe and Tempo must stay enabled, or no buyer can reach you"
    )


def test_a_bad_api_key_is_one_line_with_the_fix_for_where_it_came_from() -> None:
    with LivePlatform() as platform:
        saved = run_cli("login", "--api-key", "sk-not-mine-either")
        from_file = run_cli("demand", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url})
        from_env = run_cli("rails", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": "sk-not-mine"})
        relogged = run_cli("login", "--api-key", API_KEY, env={"VRAM_SUPPLY_API_KEY": "sk-not-mine"})

    assert saved.returncode == 0 and saved.stderr == ""
    assert from_file.returncode == 1
    assert from_file.stderr.strip() == "error: API key rejected — run `vramsupply login`"
    # Before, the same advice, which cannot help: the environment beats the key login saves.
    assert from_env.returncode == 1
    assert from_env.stderr.strip() == (
        "error: API key rejected — it comes from VRAM_SUPPLY_API_KEY in the environment, which beats the key `vramsupply login` saves: "
        "set a valid key there, or unset it"
    )
    assert relogged.returncode == 0
    assert relogged.stderr.strip() == (
        "warning: VRAM_SUPPLY_API_KEY is set in this environment and is used instead of the saved key: unset it to use this one"
    )


def test_missing_key_and_bad_platform_url_are_refused_before_any_call() -> None:
    no_key = run_cli("demand", env={"VRAM_SUPPLY_PLATFORM_URL": f"http://127.0.0.1:{free_port()}"})
    bad_url = run_cli("demand", env={"VRAM_SUPPLY_PLATFORM_URL": "ftp://vram.supply", "VRAM_SUPPLY_API_KEY": API_KEY})

    assert no_key.returncode == 2  # a missing setting, as every other
    assert no_key.stderr.strip() == "error: no API key: run `vramsupply login` or set VRAM_SUPPLY_API_KEY"
    assert bad_url.returncode == 2
    assert bad_url.stderr.startswith("error: invalid platform_url = 'ftp://vram.supply' (from env VRAM_SUPPLY_PLATFORM_URL)")


class OneAnswerPlatform:
    """A platform that answers every request with one status and body, as a broken proxy might."""

    def __init__(self, status: int, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PATCH = do_POST = answer

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OneAnswerPlatform:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.parametrize(("status", "body"), [(204, b""), (200, b"{}"), (200, b'{"ok": true}')])
def test_a_rails_change_the_platform_took_is_said_to_be_done_whatever_its_answer_holds(status: int, body: bytes) -> None:
    """The public docs say how to change the rails, not what the answer holds. Before, an answer
    without both rails was "unexpected answer to PATCH …", exit 1, for a change that was made."""
    with OneAnswerPlatform(status, body) as platform:
        result = run_cli("rails", "--no-tempo", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY})

    assert result.returncode == 0, result.stderr
    assert rails_shown(result.stdout) == {"Stripe": "unchanged (not shown)", "Tempo (MPP)": "no"}


@pytest.mark.parametrize("detail", [[{"loc": 5, "msg": "x"}], [{"loc": None, "msg": "x"}], [{"loc": "body", "msg": "x"}]])
def test_a_validation_error_of_an_odd_shape_is_still_one_line(detail: list[dict[str, object]]) -> None:
    with OneAnswerPlatform(422, json.dumps({"detail": detail}).encode()) as platform:
        result = run_cli("rails", "--no-tempo", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY})

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "?: x" in result.stderr


@pytest.mark.parametrize("status", [404, 405])
def test_rails_on_a_platform_that_cannot_show_them_says_how_to_change_them(status: int) -> None:
    """Only PATCH is in the public docs; GET is the reference platform's own."""
    with OneAnswerPlatform(status, b'{"detail": "Method Not Allowed"}') as platform:
        result = run_cli("rails", env={"VRAM_SUPPLY_PLATFORM_URL": platform.url, "VRAM_SUPPLY_API_KEY": API_KEY})

    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (
        f"error: this platform does not show the payment rails (GET /v1/settings/provider/rails answered {status}; only changing them "
        "is documented): change one with `vramsupply rails --stripe/--no-stripe` or `--tempo/--no-tempo`, whose answer shows both"
    )


def write_raw_state(**fields: object) -> None:
    """A registration.json as an agent writes it, with ``fields`` changed (by a disk error, a hand edit)."""
    state = {"phase": "registered", "platform_url": "https://vram.supply", "model": "m", "endpoint_url": "https://gpu.example.com",
             "provider_id": "prov_1", "message": "", "pid": os.getpid(), "updated_at": time.time(), "last_heartbeat_at": time.time()}
    default_state_path().parent.mkdir(parents=True, exist_ok=True)
    default_state_path().write_text(json.dumps({**state, **fields}))  # json.dumps writes NaN as NaN, as a damaged file may hold


def test_devplatform_command_prints_its_url_and_key_and_serves_the_api() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "vramsupply", "devplatform", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        listening = process.stdout.readline()
        key_line = process.stdout.readline()
        url = listening.strip().removeprefix("reference platform listening on ")
        api_key = key_line.strip().removeprefix("API key: ")
        assert url.startswith("http://127.0.0.1:") and api_key.startswith("sk-dev-")

        rails_shown_there = run_cli("rails", env={"VRAM_SUPPLY_PLATFORM_URL": url, "VRAM_SUPPLY_API_KEY": api_key})
        assert rails_shown(rails_shown_there.stdout) == {"Stripe": "yes", "Tempo (MPP)": "yes"}

        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "reference platform stopped" in rest and "Traceback" not in errors
