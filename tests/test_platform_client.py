"""The platform client's error messages, retries and bounds, and the offer checks made before any call (against a
hostile platform: tests/test_platform_client_hostile.py)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from aiohttp import web
from live_platform import API_KEY, LivePlatform, free_port

from vramsupply.config import Settings
from vramsupply.errors import MissingSetting
from vramsupply.platform import (
    ApiKeyRejected,
    Backoff,
    MarketplaceSession,
    OfferError,
    PlatformClient,
    PlatformError,
    PlatformUnavailable,
    RequestRejected,
    build_offer,
    check_endpoint_url,
    price_summary,
)
from vramsupply.platform.api import RailsUpdate, RegisterRequest
from vramsupply.serve.options import market_options


class LocalGGUF:
    model_id = "stories260k"
    repo_id = None
    filename = None
    sha256 = None
    quant = None


async def test_a_bad_api_key_gets_the_login_hint() -> None:
    with LivePlatform() as platform:
        async with PlatformClient(platform.url, "sk-wrong") as client:
            with pytest.raises(ApiKeyRejected) as info:
                await client.demand()
    assert str(info.value) == "API key rejected — run `vramsupply login`"


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
async def test_a_422_names_each_bad_field_and_why() -> None:
    offer = RegisterRequest.model_construct(
        provider_type="agent", model="m", input_price_per_million="cheap", output_price_per_million=200, context_length_offered=4096
    )
    with LivePlatform() as platform:
        async with PlatformClient(platform.url, API_KEY) as client:
            with pytest.raises(RequestRejected) as info:
                await client.register(offer)
    assert info.value.status == 422
    assert str(info.value) == (
        "platform rejected POST /v1/providers/register (422): "
        "endpoint_url: Field required for agent providers; input_price_per_million: Input should be a valid integer"
    )


async def test_a_400_carries_the_platforms_reason() -> None:
    with LivePlatform() as platform:
        async with PlatformClient(platform.url, API_KEY) as client:
            with pytest.raises(RequestRejected, match="at least one payment rail must remain enabled"):
                await client.set_rails(RailsUpdate(accepts_stripe=False, accepts_tempo=False))
            assert (await client.rails()).model_dump() == {"accepts_stripe": True, "accepts_tempo": True}


async def test_network_errors_are_retried_until_the_platform_answers() -> None:
    port = free_port()
    async with PlatformClient(f"http://127.0.0.1:{port}", API_KEY, attempts=5, backoff=Backoff(initial=0.3, cap=0.6)) as client:
        call = asyncio.create_task(client.demand())
        await asyncio.sleep(0.1)
        assert not call.done()
        with LivePlatform(port):
            demand = await asyncio.wait_for(call, 10)
    assert demand.models == []


async def test_5xx_answers_are_retried_and_4xx_are_not(aiohttp_server: Any) -> None:
    """A platform behind a flaky proxy: two 503s, then the real answer."""
    answers = [web.json_response({"error": {"message": "upstream busy"}}, status=503) for _ in range(2)]
    calls: list[str] = []

    async def demand(request: web.Request) -> web.Response:
        calls.append(request.headers["Authorization"])
        return answers.pop(0) if answers else web.json_response({"models": []})

    app = web.Application()
    app.router.add_get("/v1/providers/demand", demand)
    server = await aiohttp_server(app)
    async with PlatformClient(str(server.make_url("")), API_KEY, attempts=3, backoff=Backoff(initial=0.05, cap=0.1)) as client:
        assert (await client.demand()).models == []
        assert calls == [f"Bearer {API_KEY}"] * 3

        answers.extend(web.json_response({"error": {"message": "upstream busy"}}, status=502) for _ in range(3))
        with pytest.raises(PlatformUnavailable, match="answered 502: upstream busy"):
            await client.demand()

        calls.clear()
        answers.append(web.json_response({"error": {"message": "no such thing"}}, status=400))
        with pytest.raises(RequestRejected, match=r"\(400\): no such thing"):
            await client.demand()
        assert len(calls) == 1


async def test_answers_that_are_not_utf8_are_platform_errors_not_crashes(aiohttp_server: Any) -> None:
    """A captive portal or proxy between us and the platform: its pages may be in any encoding,
    or claim UTF-8 and not be. Such an answer must reach the lifecycle as a PlatformError (which
    it logs and retries), never as a UnicodeDecodeError that would end its loop."""
    answers = [
        web.Response(body=b"\xff\xfe{", content_type="application/json", charset="utf-8"),
        web.Response(body=b"Acc\xe8s refus\xe9", status=400, content_type="text/html", charset="utf-8"),
        web.Response(body=b"\xff", status=503, content_type="text/html", charset="utf-8"),
    ]

    async def demand(request: web.Request) -> web.Response:
        return answers.pop(0)

    app = web.Application()
    app.router.add_get("/v1/providers/demand", demand)
    server = await aiohttp_server(app)
    async with PlatformClient(str(server.make_url("")), API_KEY, attempts=1) as client:
        with pytest.raises(PlatformError, match="unexpected answer to GET /v1/providers/demand: body: Invalid JSON"):
            await client.demand()
        with pytest.raises(RequestRejected, match=r"\(400\): Acc\ufffds refus\ufffd"):
            await client.demand()
        with pytest.raises(PlatformUnavailable, match="answered 503: \ufffd"):
            await client.demand()


async def test_a_web_page_answering_where_the_api_should_is_named_with_the_setting_to_check(aiohttp_server: Any) -> None:
    """A platform_url pointing at some other web server (a typo, the site instead of the API): its
    404 page is no reason; the error says a page answered, and which setting to check."""
    page = "<!DOCTYPE HTML>\n<html><head><title>Error response</title></head><body>404 Not Found</body></html>"

    async def demand(request: web.Request) -> web.Response:
        return web.Response(text=page, status=404, content_type="text/html")

    app = web.Application()
    app.router.add_get("/v1/providers/demand", demand)
    server = await aiohttp_server(app)
    async with PlatformClient(str(server.make_url("")), API_KEY, attempts=1) as client:
        with pytest.raises(RequestRejected) as info:
            await client.demand()
    assert str(info.value) == (
        "platform rejected GET /v1/providers/demand (404): an HTML page, not an answer of the vram.supply API: "
        "check platform_url (VRAM_SUPPLY_PLATFORM_URL)"
    )


async def test_an_unreachable_platform_gives_up_after_the_attempts_with_one_line() -> None:
    port = free_port()
    started = time.monotonic()
    async with PlatformClient(f"http://127.0.0.1:{port}", API_KEY, attempts=3, backoff=Backoff(initial=0.05, cap=0.1)) as client:
        with pytest.raises(PlatformUnavailable) as info:
            await client.demand()
    assert str(info.value).startswith(f"cannot reach http://127.0.0.1:{port}: ")
    assert "\n" not in str(info.value)
    assert time.monotonic() - started < 5


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=10.0)
    rng = random.Random(7)
    delays = [backoff.delay(attempt, rng) for attempt in range(8)]

    for attempt, delay in enumerate(delays):
        ceiling = min(10.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert len({round(d, 6) for d in delays[4:]}) > 1, "jittered, not lockstep"
    assert backoff.delay(10_000, rng) <= 10.0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (None, "an endpoint URL is required to register: pass --endpoint-url or set VRAM_SUPPLY_ENDPOINT_URL"),
        ("ftp://gpu.example.com", "endpoint URL 'ftp://gpu.example.com' must be an http:// or https:// URL with a host"),
        ("gpu.example.com:8080", "must be an http:// or https:// URL"),
        ("https://gpu.example.com/?x=1", "must be a base URL without ?query or #fragment"),
    ],
)
def test_unusable_endpoint_urls_are_refused(url: str | None, message: str) -> None:
    with pytest.raises(OfferError, match=message.replace("?", r"\?")):
        check_endpoint_url(url)


@pytest.mark.parametrize("url", ["http://localhost:8080", "http://127.0.0.1:8080", "http://192.168.1.20:8080", "http://10.0.0.5", "http://[::1]:8080", "http://box.local"])
def test_local_and_private_endpoints_warn_outside_the_demo(url: str) -> None:
    [warning] = check_endpoint_url(url)
    assert "local or private address" in warning
    assert check_endpoint_url(url, local_ok=True) == []


def test_public_endpoints_do_not_warn() -> None:
    assert check_endpoint_url("https://gpu.example.com") == []
    assert check_endpoint_url("http://93.184.216.34:8080") == []


def test_context_offered_defaults_to_the_served_context_and_cannot_exceed_it() -> None:
    settings = Settings(endpoint_url="https://gpu.example.com")
    offer = build_offer(market_options(settings), LocalGGUF(), served_context=2048, endpoint_token="t")
    assert offer.request.context_length_offered == 2048
    assert offer.request.gguf_repo is None and offer.warnings == []

    with pytest.raises(OfferError, match=r"context_length_offered \(4096\) is larger than the context this agent serves \(2048\)"):
        settings = Settings(endpoint_url="https://gpu.example.com", context_length_offered=4096)
        build_offer(market_options(settings), LocalGGUF(), served_context=2048, endpoint_token="t")


def test_price_summary_shows_earnings_after_the_platform_fee() -> None:
    assert price_summary(7, 9) == (  # rounded to the cent, 6.65 and 8.55 cents read as the prices
        "prices per million tokens: input $0.07, output $0.09; you earn $0.0665 / $0.0855 after the 5% platform fee"
    )
    assert price_summary(100, 200) == (
        "prices per million tokens: input $1.00, output $2.00; you earn $0.95 / $1.90 after the 5% platform fee"
    )


def test_serving_without_what_registration_needs_is_refused_before_any_call() -> None:
    with pytest.raises(MissingSetting, match="no API key to register with: run `vramsupply login`"):
        MarketplaceSession.prepare(market_options(Settings(endpoint_url="https://gpu.example.com")))
    with pytest.raises(OfferError, match="an endpoint URL is required to register"):
        MarketplaceSession.prepare(market_options(Settings(api_key="sk-x")))
    with pytest.raises(OfferError, match=r"context_length_offered \(9000\) is larger than context_length \(8192\)"):
        MarketplaceSession.prepare(market_options(Settings(api_key="sk-x", endpoint_url="https://gpu.example.com", context_length_offered=9000)))


def test_the_startup_summary_names_the_offer_earnings_and_warnings() -> None:
    settings = Settings(api_key="sk-x", endpoint_url="http://192.168.1.5:8080", input_price=300, output_price=900)
    offer = MarketplaceSession.prepare(market_options(settings)).offer(LocalGGUF(), served_context=2048)

    assert offer.summary() == [
        "offering stories260k at http://192.168.1.5:8080 on https://vram.supply (context 2048)",
        "prices per million tokens: input $3.00, output $9.00; you earn $2.85 / $8.55 after the 5% platform fee",
    ]
    assert offer.warnings == [
        "endpoint URL http://192.168.1.5:8080 points at a local or private address: the platform and buyers on the internet cannot reach it"
    ]
