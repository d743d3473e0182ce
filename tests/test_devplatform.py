"""The reference platform: validation, health checks, and buyers routed to a real agent and back."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from live_platform import API_KEY, LivePlatform
from live_server import MODEL_ID, LiveServer
from openai import AsyncOpenAI

from vramsupply.devplatform import Provider
from vramsupply.platform.api import RegisterRequest

ENDPOINT_TOKEN = "endpoint-token-for-tests"
MESSAGES = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def agent() -> Iterator[LiveServer]:
    with LiveServer(endpoint_token=ENDPOINT_TOKEN) as live:
        yield live


@pytest.fixture
def platform() -> Iterator[LivePlatform]:
    with LivePlatform() as live:
        yield live


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


async def http(method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body, headers=headers) as response:
        return Reply(response.status, dict(response.headers), await response.text())


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def register(
    platform: LivePlatform, agent_url: str, *, api_key: str = API_KEY, token: str = ENDPOINT_TOKEN, output_price: int = 200, input_price: int = 100,
    model: str = MODEL_ID,
) -> str:
    offer = RegisterRequest(
        endpoint_url=agent_url,
        model=model,
        input_price_per_million=input_price,
        output_price_per_million=output_price,
        context_length_offered=2048,
        endpoint_token=token,
    )
    auth = {"Authorization": f"Bearer {api_key}"}
    response = await http("POST", f"{platform.url}/v1/providers/register", body=offer.model_dump(exclude_none=True), headers=auth)
    assert response.status == 201, response.text
    return str(response.json()["provider_id"])


def provider(platform: LivePlatform, provider_id: str) -> Provider:
    return platform.platform.store.providers[provider_id]


def buyer(platform: LivePlatform) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{platform.url}/v1", api_key=API_KEY, max_retries=0)


async def test_register_validates_required_fields_and_types_per_the_docs(platform: LivePlatform) -> None:
    response = await http("POST",
        f"{platform.url}/v1/providers/register",
        body={"model": "m", "input_price_per_million": "100", "output_price_per_million": 2.5, "endpoint_url": "ftp://x", "colour": "red"},
        headers=AUTH,
    )

    assert response.status == 422
    fields = {f["field"]: f["message"] for f in response.json()["error"]["fields"]}
    assert fields == {
        "endpoint_url": "URL scheme should be 'http' or 'https'",
        "input_price_per_million": "Input should be a valid integer",
        "output_price_per_million": "Input should be a valid integer",
        "context_length_offered": "Field required for agent providers",
        "colour": "Extra inputs are not permitted",
    }
    assert platform.providers == []


async def test_provider_endpoints_need_a_known_api_key(platform: LivePlatform) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-unknown"}, {"Authorization": f"Basic {API_KEY}"}):
        response = await http("GET", f"{platform.url}/v1/providers/demand", headers=headers)
        assert response.status == 401
        assert response.json()["error"]["type"] == "authentication_error"


async def test_heartbeat_and_delete_of_an_unknown_provider_are_404(platform: LivePlatform) -> None:
    beat = {"provider_id": "prov_nope", "slots_total": 1, "slots_busy": 0, "queue_depth": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert (await http("POST", f"{platform.url}/v1/providers/heartbeat", body=beat, headers=AUTH)).status == 404
    assert (await http("DELETE", f"{platform.url}/v1/providers/prov_nope", headers=AUTH)).status == 404


async def test_buyer_request_is_routed_to_the_agent_and_back_with_tokens_counted(platform: LivePlatform, agent: LiveServer) -> None:
    provider_id = await register(platform, agent.url)
    async with buyer(platform) as client:
        completion = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})

    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    routed = provider(platform, provider_id)
    assert (routed.routed_requests, routed.routed_completion_tokens) == (1, 6)
    assert routed.routed_prompt_tokens == completion.usage.prompt_tokens
    [demand] = platform.platform.store.demand(time.time()).models
    assert (demand.model, demand.requests_24h, demand.online_providers) == (MODEL_ID, 1, 1)


async def test_streaming_is_passed_through_and_usage_only_shown_when_asked(platform: LivePlatform, agent: LiveServer) -> None:
    provider_id = await register(platform, agent.url)
    async with buyer(platform) as client:
        stream = await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=5, stream=True, extra_body={"ignore_eos": True})
        plain = [chunk async for chunk in stream]
        with_usage = [
            c
            async for c in await client.chat.completions.create(
                model=MODEL_ID, messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
            )
        ]

    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
    assert all(c.usage is None for c in plain), "the usage chunk the platform asked for is not leaked"
    assert plain[-1].choices[0].finish_reason == "length"
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 5
    assert provider(platform, provider_id).routed_completion_tokens == 10


async def test_the_agent_enforces_its_endpoint_token(platform: LivePlatform, agent: LiveServer) -> None:
    direct = await http("POST", f"{agent.url}/v1/chat/completions", body={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2})
    assert direct.status == 401
    assert (await http("GET", f"{agent.url}/health")).status == 200, "health stays open for the platform's checks"

    await register(platform, agent.url, token="not-the-agents-token")
    routed = await http("POST", f"{platform.url}/v1/chat/completions", body={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2}, headers=AUTH)
    assert routed.status == 502
    assert routed.json()["error"]["code"] == "provider_auth"


async def test_no_authorization_gets_an_mpp_challenge_and_a_payment_credential_is_served(platform: LivePlatform, agent: LiveServer) -> None:
    await register(platform, agent.url, output_price=200)
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 3, "stream": True, "ignore_eos": True}

    challenged = await http("POST", f"{platform.url}/v1/chat/completions", body=body)
    assert challenged.status == 402
    header = challenged.headers["WWW-Authenticate"]
    params = dict(re.findall(r'(\w+)="([^"]*)"', header))
    assert header.startswith("Payment ")
    assert (params["realm"], params["method"], params["intent"]) == ("vram.supply", "tempo", "session")
    request = json.loads(base64.urlsafe_b64decode(params["request"] + "=" * (-len(params["request"]) % 4)))
    assert request["amount"] == "2", "200 ¢/M = 2 base units per token: the 5% fee is inside the price, not added"
    assert request["unitType"] == "llm_token" and request["suggestedDeposit"] == "1000000"

    credential = {
        "challenge": {"id": params["id"], "realm": "vram.supply"},
        "source": "0x1234",
        "payload": {"action": "voucher", "channelId": "0x6d0f", "cumulativeAmount": "50000", "signature": "0xabc"},
    }
    encoded = base64.urlsafe_b64encode(json.dumps(credential).encode()).decode().rstrip("=")
    paid = await http("POST", f"{platform.url}/v1/chat/completions", body=body, headers={"Authorization": f"Payment {encoded}"})

    assert paid.status == 200
    events = [e for e in paid.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith("event: payment-receipt\ndata: ")
    receipt = json.loads(events[-2].split("data: ", 1)[1])
    assert receipt["status"] == "success" and receipt["tokens"] > 3
    completion = 3
    prompt = receipt["tokens"] - completion
    # charged at the provider's own prices (100 and 200 ¢/M: 1 and 2 base units a token), the fee
    # inside them: the ledger's gross for the same request, of which the provider earns 95 %
    assert int(receipt["amount"]) == prompt * 1 + completion * 2

    forged = dict(credential, challenge={"id": "ch_forged"})
    encoded_forged = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode()
    refused = await http("POST", f"{platform.url}/v1/chat/completions", body=body, headers={"Authorization": f"Payment {encoded_forged}"})
    assert refused.status == 402 and "ch_forged" in refused.json()["error"]["message"]
    assert "WWW-Authenticate" in refused.headers


@pytest.mark.parametrize("credential", ["!!!", "", "bm90IGpzb24"])  # the last is base64url of "not json"
async def test_a_credential_that_is_not_base64url_json_is_a_402_that_says_so(platform: LivePlatform, agent: LiveServer, credential: str) -> None:
    await register(platform, agent.url)
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2}
    refused = await http("POST", f"{platform.url}/v1/chat/completions", body=body, headers={"Authorization": f"Payment {credential}"})
    assert refused.status == 402 and "WWW-Authenticate" in refused.headers
    assert refused.json()["error"]["message"] == "malformed Payment credential: not base64url-encoded JSON"


def payment_for(challenged: Any, **voucher: str) -> dict[str, str]:
    """The Authorization header paying against a 402's challenge, with the voucher's fields as given."""
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenged.headers["WWW-Authenticate"]))
    payload = {"action": "voucher", "channelId": "0x6d0f", "cumulativeAmount": "50000", "signature": "0xabc", **voucher}
    credential = {"challenge": {"id": params["id"], "realm": "vram.supply"}, "source": "0x1234", "payload": payload}
    return {"Authorization": "Payment " + base64.urlsafe_b64encode(json.dumps(credential).encode()).decode().rstrip("=")}


async def test_a_buyer_is_never_charged_above_the_quote_it_paid_against(platform: LivePlatform, agent: LiveServer) -> None:
    """The cheap provider that was quoted went away (or raised its price) before the buyer paid: the
    request went to a dearer one, charged above the quote; a challenge for one model also paid for another."""
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2}
    cheap = await register(platform, agent.url, output_price=200)
    challenged = await http("POST", f"{platform.url}/v1/chat/completions", body=body)
    paying = payment_for(challenged)
    await http("DELETE", f"{platform.url}/v1/providers/{cheap}", headers=AUTH)
    await register(platform, agent.url, output_price=900)

    dearer = await http("POST", f"{platform.url}/v1/chat/completions", body={**body, "model": MODEL_ID.upper()}, headers=paying)  # the same model
    assert dearer.status == 402 and "now cost more than the 2 units a token challenge" in dearer.json()["error"]["message"]
    fresh = dict(re.findall(r'(\w+)="([^"]*)"', dearer.headers["WWW-Authenticate"]))["request"]
    assert json.loads(base64.urlsafe_b64decode(fresh + "=" * (-len(fresh) % 4)))["amount"] == "9", "a fresh quote, at today's price"

    await register(platform, agent.url, output_price=5000, model="other/model")
    other = await http("POST", f"{platform.url}/v1/chat/completions", body={**body, "model": "other/model"}, headers=payment_for(dearer))
    assert other.status == 402 and f"was issued for {MODEL_ID}, not other/model" in other.json()["error"]["message"]


async def test_a_buyer_who_hangs_up_before_a_whole_answer_is_billed_nothing(platform: LivePlatform, agent: LiveServer) -> None:
    """The platform bills by the usage a buyer receives: it waited for the provider's whole answer
    after the buyer had gone, billed it, and kept the provider generating for nobody."""
    provider_id = await register(platform, agent.url)
    body = json.dumps({"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 1500, "n": 2, "ignore_eos": True}).encode()
    host, port = platform.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    await asyncio.sleep(0.3)  # forwarded, and generating
    writer.close()
    routed = platform.platform.store.requests
    for _ in range(100):
        if routed[-1].status:
            break
        await asyncio.sleep(0.05)

    assert routed[-1].status, "the platform gave up on it within 5 s (3,000 tokens take longer)"
    assert (routed[-1].prompt_tokens, routed[-1].completion_tokens) == (0, 0)
    assert provider(platform, provider_id).routed_completion_tokens == 0


@pytest.mark.parametrize(
    "voucher",
    [{"cumulativeAmount": "abc"}, {"cumulativeAmount": "-5"}, {"cumulativeAmount": ""}, {"channelId": ""}, {"signature": ""}],
    ids=["amount-not-a-number", "amount-negative", "amount-empty", "no-channel", "no-signature"],
)
async def test_a_voucher_without_a_whole_amount_channel_or_signature_is_refused(platform: LivePlatform, agent: LiveServer, voucher: dict[str, str]) -> None:
    await register(platform, agent.url)
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2}
    challenged = await http("POST", f"{platform.url}/v1/chat/completions", body=body)

    refused = await http("POST", f"{platform.url}/v1/chat/completions", body=body, headers=payment_for(challenged, **voucher))
    assert refused.status == 402 and refused.json()["error"]["message"].startswith("malformed Payment credential: payload.")


async def test_the_challenge_quotes_the_dearer_price_when_prompt_tokens_cost_more(platform: LivePlatform, agent: LiveServer) -> None:
    """The amount a buyer sees before paying is never below what one of its tokens will cost."""
    await register(platform, agent.url, input_price=1000, output_price=100)
    challenged = await http("POST", f"{platform.url}/v1/chat/completions", body={"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2})
    assert challenged.status == 402
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenged.headers["WWW-Authenticate"]))
    request = json.loads(base64.urlsafe_b64decode(params["request"] + "=" * (-len(params["request"]) % 4)))
    assert request["amount"] == "10", "1000 ¢/M for prompt tokens: 10 base units, not the output price's 1"


async def test_rails_filter_which_buyers_reach_a_provider(platform: LivePlatform, agent: LiveServer) -> None:
    await register(platform, agent.url)
    rails = await http("PATCH", f"{platform.url}/v1/settings/provider/rails", body={"accepts_stripe": False}, headers=AUTH)
    assert rails.json() == {"accepts_stripe": False, "accepts_tempo": True}

    card_buyer = await http("POST", f"{platform.url}/v1/chat/completions", body={"model": MODEL_ID, "messages": MESSAGES}, headers=AUTH)
    assert card_buyer.status == 503
    assert card_buyer.json()["error"]["message"] == f"no online provider of '{MODEL_ID}' accepts stripe payments right now"
    assert (await http("POST", f"{platform.url}/v1/chat/completions", body={"model": MODEL_ID, "messages": MESSAGES})).status == 402

    both_off = await http("PATCH", f"{platform.url}/v1/settings/provider/rails", body={"accepts_tempo": False}, headers=AUTH)
    assert both_off.status == 400
    assert both_off.json()["error"]["message"] == "at least one payment rail must remain enabled"
    not_bool = await http("PATCH", f"{platform.url}/v1/settings/provider/rails", body={"accepts_tempo": "yes"}, headers=AUTH)
    assert not_bool.status == 422 and not_bool.json()["error"]["param"] == "accepts_tempo"


async def test_the_cheapest_online_provider_gets_the_request(platform: LivePlatform, agent: LiveServer) -> None:
    other_account = platform.platform.store.add_account("sk-second-provider")
    pricey = await register(platform, agent.url, output_price=400)
    cheap = await register(platform, agent.url, api_key=other_account.api_key, output_price=150)
    async with buyer(platform) as client:
        await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)

    assert provider(platform, cheap).routed_requests == 1
    assert provider(platform, pricey).routed_requests == 0


async def test_unknown_model_is_404_and_counts_as_demand(platform: LivePlatform) -> None:
    response = await http("POST", f"{platform.url}/v1/chat/completions", body={"model": "org/wanted", "messages": MESSAGES}, headers=AUTH)

    assert response.status == 404 and response.json()["error"]["code"] == "model_not_found"
    [wanted] = platform.platform.store.demand(time.time()).models
    assert (wanted.model, wanted.requests_24h, wanted.online_providers) == ("org/wanted", 1, 0)


async def test_health_checks_mark_a_stopped_provider_offline() -> None:
    with LivePlatform(health_interval=0.2) as platform:
        with LiveServer(endpoint_token=ENDPOINT_TOKEN) as short_lived:
            provider_id = await register(platform, short_lived.url)
            await asyncio.sleep(0.5)
            assert provider(platform, provider_id).status == "online"
        deadline = time.monotonic() + 5
        while provider(platform, provider_id).status != "offline":
            assert time.monotonic() < deadline, "the periodic health check never marked it offline"
            await asyncio.sleep(0.05)

        [demand] = platform.platform.store.demand(time.time()).models
        assert demand.online_providers == 0
        routed = await http("POST", f"{platform.url}/v1/chat/completions", body={"model": MODEL_ID, "messages": MESSAGES}, headers=AUTH)
        assert routed.status == 503
