"""The platform client against a hostile platform (tests/test_platform_hostile.py): answers stay bounded, redirects
are never followed, and whatever it sends reaches the provider as one readable line (the client's other errors,
retries and offer checks: tests/test_platform_client.py)."""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from live_platform import API_KEY
from test_platform_hostile import CONTROL, Answer, HostilePlatform, answer, client

from vramsupply.platform import Backoff, PlatformClient, PlatformError, PlatformUnavailable
from vramsupply.platform.api import RegisterRequest
from vramsupply.platform.client import UnexpectedAnswer, describe_error


def compressed(body: bytes, *, status: int = 200) -> Answer:
    async def respond(platform: HostilePlatform, request: web.Request, _: Any) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})

    return respond


async def never_ending(platform: HostilePlatform, request: web.Request, _: Any) -> web.StreamResponse:
    """Headers at once, then a body that trickles and never completes."""
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000000"})
    await response.prepare(request)
    while not platform.released:
        await response.write(b" ")
        await asyncio.sleep(0.05)
    return response


def gzip_bomb(megabytes: int) -> bytes:
    """``megabytes`` MiB of JSON whitespace, gzipped to a few dozen kilobytes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b" " * (1 << 20)
    return b"".join(packer.compress(chunk) for _ in range(megabytes)) + packer.flush()


def a_registration() -> RegisterRequest:
    return RegisterRequest(endpoint_url="https://gpu.example.com", model="m", input_price_per_million=1, output_price_per_million=2,
                           context_length_offered=4096, endpoint_token="tok-secret")  # fmt: skip


async def test_a_gzip_bomb_is_refused_after_a_few_megabytes_in_one_line() -> None:
    with HostilePlatform() as platform:
        platform.script("demand", compressed(gzip_bomb(64)), answer(200, text=" " * (6 << 20)), compressed(zlib.compress(b'{"models": []}')))
        async with client(platform) as api:
            for _ in range(2):  # gzipped, then as is
                with pytest.raises(PlatformError) as info:
                    await api.demand()
                assert str(info.value) == "the platform's answer to GET /v1/providers/demand is larger than 4 MiB; not reading it"
            assert (await api.demand()).models == [], "a small compressed answer is still read"


async def test_a_redirect_to_another_host_is_not_followed_and_names_where_it_pointed() -> None:
    """The register body carries the endpoint token: a 307 must not take it anywhere else."""
    with HostilePlatform() as platform, HostilePlatform() as elsewhere:
        platform.script("register", answer(307, headers={"Location": f"{elsewhere.url}/v1/providers/register"}))
        async with client(platform) as api:
            with pytest.raises(PlatformError) as info:
                await api.register(a_registration())
        assert elsewhere.seen == []
    assert str(info.value) == (
        f"{platform.url} redirects POST /v1/providers/register (307) to {elsewhere.url}/v1/providers/register; redirects are not followed, "
        f"so nothing was sent there: if the API moved there, set platform_url (VRAM_SUPPLY_PLATFORM_URL) to {elsewhere.url}"
    )


@pytest.mark.parametrize(
    ("answered", "reason"),
    [
        (answer(302, headers={"Location": "/moved"}), "redirects DELETE /v1/providers/prov_1 (302) to "),
        (answer(200, text="<html><body>Welcome to the hotel wifi</body></html>"), "unexpected answer to DELETE /v1/providers/prov_1: body: Invalid JSON"),
        (answer(200, {"provider_id": "prov_2", "status": "deregistered"}), "did not confirm removing prov_1: it answered status 'deregistered' for prov_2"),
        (answer(200, {"provider_id": "prov_1", "status": "online"}), "did not confirm removing prov_1: it answered status 'online' for prov_1"),
    ],
)
async def test_only_the_documented_answer_or_404_counts_as_deregistered(answered: Answer, reason: str) -> None:
    with HostilePlatform() as platform:
        platform.script("deregister", answered, answer(200, {"provider_id": "prov_1", "status": "deregistered"}), answer(404, {"error": "gone"}))
        async with client(platform) as api:
            with pytest.raises(PlatformError, match=re.escape(reason)):
                await api.deregister("prov_1")
            await api.deregister("prov_1")  # the documented answer
            await api.deregister("prov_1")  # already gone
        assert [seen.method for seen in platform.seen] == ["DELETE"] * 3


@pytest.mark.parametrize(
    ("provider_id", "raw_path"),
    [
        ("../../settings/provider/rails", "/v1/providers/..%2F..%2Fsettings%2Fprovider%2Frails"),
        ("abc?force=1#x", "/v1/providers/abc%3Fforce=1%23x"),
    ],
)
async def test_a_provider_id_goes_into_the_delete_url_as_one_path_segment(provider_id: str, raw_path: str) -> None:
    with HostilePlatform() as platform:
        async with client(platform) as api:
            await api.deregister(provider_id)  # unknown to it: 404, already gone
    assert [(seen.route, seen.raw_path) for seen in platform.seen] == [("deregister", raw_path)]


@pytest.mark.parametrize("provider_id", ["", ".", "..", "prov 1", "prov\x1b[2J", "p" * 129, 42])
async def test_an_empty_or_absurd_provider_id_is_no_registration(provider_id: object) -> None:
    with HostilePlatform() as platform:
        platform.script("register", answer(201, {"provider_id": provider_id, "status": "online"}))
        async with client(platform) as api:
            with pytest.raises(UnexpectedAnswer, match=r"^unexpected answer to POST /v1/providers/register: provider_id: ") as info:
                await api.register(a_registration())
    assert info.value.status == 201


async def test_terminal_escapes_and_huge_messages_from_the_platform_are_shown_escaped_and_cut() -> None:
    hostile = "no\x1b]0;pwned\x07 way\x1b[2J\x1b[31m red\x9b\x7f\nsecond line"
    with HostilePlatform() as platform:
        platform.script(
            "demand",
            answer(400, {"error": {"message": hostile}}),
            answer(400, text=hostile),
            answer(400, {"error": {"message": "x" * 2_000_000}}),
        )
        async with client(platform) as api:
            messages = []
            for _ in range(3):
                with pytest.raises(PlatformError) as info:
                    await api.demand()
                messages.append(str(info.value))
    assert messages[0] == r"platform rejected GET /v1/providers/demand (400): no\x1b]0;pwned\x07 way\x1b[2J\x1b[31m red\x9b\x7f second line"
    assert messages[1] == r"platform rejected GET /v1/providers/demand (400): no\x1b]0;pwned\x07 way\x1b[2J\x1b[31m red\x9b\x7f"
    assert messages[2].endswith("x… (cut, 2000000 characters)") and len(messages[2]) < 400
    assert not any(CONTROL.search(message) for message in messages)


@pytest.mark.parametrize("capacity", ["1e400", "-1e400", "NaN", '"nan"', '"-inf"', "-5", '"lots"', "true"])
async def test_a_capacity_that_is_no_number_is_dropped_and_the_demand_still_shown(capacity: str) -> None:
    demand = '{"models": [{"model": "m", "requests_24h": 5, "online_providers": 1, "capacity_tokens_per_second": %s}]}' % capacity

    async def respond(platform: HostilePlatform, request: web.Request, _: Any) -> web.StreamResponse:
        return web.Response(text=demand, content_type="application/json")

    with HostilePlatform() as platform:
        platform.script("demand", respond)
        async with client(platform) as api:
            market = await api.demand()
    [model] = market.models
    assert model.requests_24h == 5 and model.capacity_tokens_per_second is None
    json.dumps(market.model_dump(mode="json"), allow_nan=False)  # what `vramsupply demand --json` prints is JSON


async def test_a_body_that_never_ends_costs_one_timeout_not_one_per_retry() -> None:
    with HostilePlatform() as platform:
        platform.script("demand", never_ending)
        async with client(platform, attempts=3, timeout=0.5, backoff=Backoff(initial=0.01, cap=0.02)) as api:
            with pytest.raises(PlatformUnavailable, match=rf"^cannot reach {platform.url}: timed out$"):
                await api.demand()
        assert len(platform.requests("demand")) == 1, "the call's timeout covers its retries"


async def test_aiohttp_response_errors_are_described_in_words() -> None:
    """A redirect loop or an answer that is not HTTP: no "0, message='', url=…"."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        writer.write(b"HELLO \x1b[2J this is no HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, PlatformClient(url, API_KEY, attempts=1) as api:
        with pytest.raises(PlatformUnavailable) as info:
            await api.demand()
    assert str(info.value).startswith(f"cannot reach {url}: an answer that is not HTTP (Bad status line")
    assert "message=" not in str(info.value) and not CONTROL.search(str(info.value))

    with HostilePlatform() as platform:
        platform.script("demand", answer(302, headers={"Location": "/v1/providers/demand"}))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.TooManyRedirects) as loop:
                await session.get(f"{platform.url}/v1/providers/demand", max_redirects=3)
    assert describe_error(loop.value) == f"too many redirects, the last to {platform.url}/v1/providers/demand"
