"""Pricing advice in `vramsupply demand`, checked against sums done by hand."""

from __future__ import annotations

import json
import os
import time
from decimal import Decimal

import pytest
from conftest import run_cli
from live_platform import LivePlatform
from test_platform_cli import platform_env, register

from vramsupply.platform import api
from vramsupply.platform.state import Phase, RegistrationState, default_state_path, write_state
from vramsupply.platform.advice import Advice, Band, advice_lines, advise, earned_cents_per_hour, tempo_price_range, tempo_units
from vramsupply.throughput import Capacity, default_bench_path, save


def test_dollars_per_hour_by_hand() -> None:
    # 100 tok/s is 360,000 tokens an hour; at 200 ¢/M that is 72 ¢, of which the provider keeps 95 %: 68.4 ¢
    assert earned_cents_per_hour(100.0, 200) == Decimal("68.4")
    # 450.5 tok/s → 1,621,800 tokens/h; × 150 ¢/M = 243.27 ¢; × 0.95 = 231.1065 ¢
    assert earned_cents_per_hour(450.5, 150) == Decimal("231.1065")
    assert earned_cents_per_hour(0.0, 500) == 0


@pytest.mark.parametrize(
    ("price", "units"),
    [(200, 2), (100, 1), (95, 1), (101, 2), (201, 3), (250, 3), (300, 3), (301, 4), (0, 0), (1, 1), (2000, 20)],
)
def test_the_tempo_amount_is_the_price_rounded_up_to_whole_units_the_fee_inside_it(price: int, units: int) -> None:
    # 200 ¢/M = 2 units/token exactly; 250 ¢/M = 2.5 → 3; 95 → 0.95 → 1: buyers pay the provider's price, who earns 95 % of it
    assert tempo_units(price) == units


def test_the_prices_a_tempo_buyer_pays_the_same_for() -> None:
    assert tempo_price_range(1) == (1, 100)
    assert tempo_price_range(2) == (101, 200)
    assert tempo_price_range(3) == (201, 300)
    for units in range(1, 30):
        low, high = tempo_price_range(units)
        assert tempo_units(low) == tempo_units(high) == units
        assert tempo_units(low - 1) == units - 1 and tempo_units(high + 1) == units + 1


def test_where_a_price_sits_in_the_band() -> None:
    band = Band.of(api.PriceRange(min=150, max=250, median=200))
    assert band.position(200) == "50 % of the way from low to high, at the median"
    assert band.position(175) == "25 % of the way from low to high, below the median"
    assert band.position(250) == "100 % of the way from low to high, above the median"
    assert band.position(149) == "below the band: the cheapest offer"
    assert band.position(251) == "above the band: the most expensive offer"
    assert Band.of(api.PriceRange(min=100, max=100)).position(100) == "at the band's only price"
    estimated = Band.of(api.PriceRange(min=150, max=251))
    assert (estimated.median, estimated.median_estimated) == (200, True)


def test_advice_for_one_model_by_hand() -> None:
    demand = api.DemandResponse(
        models=[
            api.ModelDemand(
                model="qwen/qwen3.5-9b", requests_24h=10, online_providers=3,
                output_price_per_million=api.PriceRange(min=150, max=250, median=200),
            ),
            api.ModelDemand(model="other/model", requests_24h=5, online_providers=0),
        ]
    )
    [advice] = advise(demand, {"qwen/qwen3.5-9b"}, 200, {"qwen/qwen3.5-9b": (100.0, 4)})
    # 360,000 tokens/h: low 54 ¢ → 51.3 ¢, median 72 ¢ → 68.4 ¢, high 90 ¢ → 85.5 ¢ (rounded half up to 86)
    assert advice.per_hour == (Decimal("51.3"), Decimal("68.4"), Decimal("85.5"))
    assert advice_lines(advice) == [
        "Pricing advice for qwen/qwen3.5-9b (output price per million tokens)",
        "  market band: low $1.50, median $2.00, high $2.50 (3 online)",
        "  your price: $2.00, 50 % of the way from low to high, at the median",
        "  at your measured 100.0 tok/s (4 slots busy) you would earn $0.51/h at low, $0.68/h at median, $0.86/h at high (95 %, output tokens only)",
        "  Tempo (MPP): buyers are quoted 2 unit(s)/token = $2.00/M for your $2.00/M (the 5 % fee read as inside the price; rounded up to a whole unit); every price from $1.01 to $2.00 is quoted the same",
    ]
    assert advice.as_json()["earned_cents_per_hour"] == {"low": "51.30", "median": "68.40", "high": "85.50"}
    assert advice.as_json()["tempo"] == {"units_per_token": 2, "cents_per_million": 200, "for_price": 200, "same_units_from": 101, "same_units_to": 200}


def test_a_tempo_quote_is_the_dearer_price_s_when_prompt_tokens_cost_more() -> None:
    """The platform's 402 quotes one amount for every token: a provider asking $4.50/M for input and
    $2.00/M for output is quoted 5 units, not the output price's 2."""
    advice = Advice("m", 200, None, 0, None, None, input_price=450)

    assert advice.tempo == (5, 401, 500)
    assert advice_lines(advice)[-1].startswith(
        "  Tempo (MPP): buyers are quoted 5 unit(s)/token = $5.00/M for your input price $4.50/M, the dearer of your two ("
    )
    assert advice.as_json()["tempo"]["for_price"] == 450
    assert Advice("m", 200, None, 0, None, None, input_price=100).tempo == (2, 101, 200)  # the usual case: output dearer


def test_advice_without_a_market_or_a_measurement_says_what_is_missing() -> None:
    lines = advice_lines(Advice("m", 100, None, 0, None, None))
    assert "no provider is online for it" in lines[1]
    assert "run `vramsupply bench`" in lines[2]
    assert "buyers are quoted 1 unit(s)/token = $1.00/M" in lines[3]


async def test_demand_prints_advice_for_the_model_you_serve_at_your_measured_speed() -> None:
    save(default_bench_path(), Capacity(
        model="stories260k", quant=None, parallel=4, single_stream_tokens_per_second=900.0, all_slots_tokens_per_second=2000.0,
        measured_at=time.time(), seconds=12.0, agent_version="test",
    ))
    with LivePlatform() as platform:
        for i, price in enumerate((150, 200, 300)):
            await register(platform, "stories260k", f"http://10.0.0.{i + 1}:8080", 100, price)
        env = platform_env(platform, VRAM_SUPPLY_MODEL="stories260k", VRAM_SUPPLY_OUTPUT_PRICE="250")
        table = run_cli("demand", env=env)
        as_json = run_cli("demand", "--json", env=env)

    assert table.returncode == 0, table.stderr
    # 2000 tok/s = 7.2 M tokens/h: × $1.50/M × 0.95 = $10.26, × $2.00 → $13.68, × $3.00 → $20.52
    assert "you would earn $10.26/h at low, $13.68/h at median, $20.52/h at high" in table.stdout
    assert "your price: $2.50, 66 % of the way from low to high, above the median" in table.stdout
    # 250 ¢/M = 2.5 units → 3 units/token
    assert "buyers are quoted 3 unit(s)/token = $3.00/M for your $2.50/M" in table.stdout
    [advice] = json.loads(as_json.stdout)["advice"]
    assert advice["band"] == {"low": 150, "median": 200, "high": 300, "median_estimated": False}
    assert advice["earned_cents_per_hour"] == {"low": "1026.00", "median": "1368.00", "high": "2052.00"}


async def test_demand_quotes_tempo_buyers_the_configured_input_price_when_it_is_the_dearer() -> None:
    with LivePlatform() as platform:
        await register(platform, "stories260k", "http://10.0.0.1:8080", 100, 200)
        env = platform_env(platform, VRAM_SUPPLY_MODEL="stories260k", VRAM_SUPPLY_OUTPUT_PRICE="250", VRAM_SUPPLY_INPUT_PRICE="450")
        table = run_cli("demand", env=env)
        as_json = run_cli("demand", "--json", env=env)

    assert table.returncode == 0, table.stderr
    assert "buyers are quoted 5 unit(s)/token = $5.00/M for your input price $4.50/M, the dearer of your two" in table.stdout
    [advice] = json.loads(as_json.stdout)["advice"]
    assert advice["tempo"]["units_per_token"] == 5 and advice["your_output_price_per_million"] == 250


@pytest.mark.parametrize(
    "prices",
    [api.PriceRange(min=500, max=100, median=1000), api.PriceRange(min=100, max=500, median=50), api.PriceRange(min=500, max=100)],
    ids=["low-above-high", "median-below-low", "no-median"],
)
def test_a_band_out_of_order_is_no_band_and_gives_no_advice(prices: api.PriceRange) -> None:
    demand = api.DemandResponse(models=[api.ModelDemand(model="m", requests_24h=1, online_providers=2, output_price_per_million=prices)])
    [advice] = advise(demand, {"m"}, 200, {"m": (100.0, 4)})

    assert advice.band is None and advice.per_hour is None and advice.inconsistent_band == prices
    assert advice.as_json()["inconsistent_band"] == prices.model_dump() and advice.as_json()["position"] is None
    assert advice_lines(advice)[1].startswith("  market band: not used, the platform sent low $")
    assert not any("band:" in line and "online" in line or "your price" in line for line in advice_lines(advice))
    with pytest.raises(ValueError, match="not a band"):
        Band.of(prices)


def test_advice_shows_a_model_name_as_plain_text() -> None:
    advice = Advice("evil\x1b]0;TITLE\x07\x1b[2J[/x]", 100, None, 0, None, None)
    assert advice_lines(advice)[0] == "Pricing advice for evil\\x1b]0;TITLE\\x07\\x1b[2J[/x] (output price per million tokens)"
    assert advice.as_json()["model"] == "evil\x1b]0;TITLE\x07\x1b[2J[/x]"  # JSON keeps it exact (printed with escapes)


async def test_demand_advises_on_the_price_the_running_agent_asks_and_sees_it_in_the_band() -> None:
    """`serve --output-price 340` is in no setting `demand` reads: the running agent's record says
    it. Before, the advice compared the default $2.00 with a band made of the agent's own $3.40."""
    with LivePlatform() as platform:
        await register(platform, "stories260k", "http://10.0.0.1:8080", 100, 340)
        write_state(default_state_path(), RegistrationState(
            phase=Phase.registered, platform_url=platform.url, model="stories260k", endpoint_url="http://10.0.0.1:8080",
            pid=os.getpid(), updated_at=time.time(), output_price=340,
        ))
        env = platform_env(platform)  # no model configured, and the default price of 200
        running = run_cli("demand", env=env)
        flagged = run_cli("demand", "--output-price", "150", env=env)
        as_json = run_cli("demand", "--json", env=env)

    assert running.returncode == flagged.returncode == 0, running.stderr + flagged.stderr
    assert "market band: low $3.40, median $3.40, high $3.40 (1 online, your running agent among them)" in running.stdout
    assert "your price: $3.40 (what your running agent asks), at the band's only price" in running.stdout
    assert "your price: $1.50 (--output-price), below the band: the cheapest offer" in flagged.stdout
    [advice] = json.loads(as_json.stdout)["advice"]
    assert (advice["your_output_price_per_million"], advice["band_includes_yours"]) == (340, True)


def test_demand_refuses_a_price_no_agent_could_ask() -> None:
    result = run_cli("demand", "--output-price", "-5", env={"VRAM_SUPPLY_API_KEY": "vs_unused"})

    assert result.returncode == 2 and result.stderr.startswith("error: invalid output_price = -5 (from flag --output-price)")


def test_demand_counts_are_written_with_thousands_separators() -> None:
    """A busy model's 1234567 requests in a day read as 1,234,567."""
    from rich.console import Console

    from vramsupply.platform.commands import demand_view

    demand = api.DemandResponse.model_validate(
        {"models": [{"model": "acme/busy", "requests_24h": 1234567, "online_providers": 1200, "prices": None}]}
    )
    console = Console(width=200, record=True)
    console.print(demand_view(demand, set()))
    shown = console.export_text()
    assert "1,234,567" in shown and "1,200" in shown
