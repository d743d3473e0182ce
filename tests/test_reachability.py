"""Reachability told precisely: the hop that keeps the platform from the agent, and what to do about it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from live_platform import API_KEY, LivePlatform, free_port
from live_server import LiveServer

from vramsupply.config import Settings
from vramsupply.platform import Backoff, Phase, PlatformClient, ProviderLifecycle, build_offer
from vramsupply.platform.offer import OfferError, check_endpoint_url
from vramsupply.platform.reachability import check_configured, offline_message, probe
from vramsupply.serve.options import market_options
from test_platform_lifecycle import EngineCounters, ResolvedGGUF, eventually


def test_the_offline_message_names_the_url_the_port_to_forward_and_the_tunnel() -> None:
    assert offline_message("https://gpu.example.com", 8080) == (
        "the platform cannot reach https://gpu.example.com/health: forward port 443 to port 8080 of this machine, "
        "open the firewall for it, or use --tunnel cloudflared"
    )
    assert "forward port 9000 to port 9000" in offline_message("http://203.0.113.7:9000", None)
    tunnelled = offline_message("https://a-b.trycloudflare.com", 8080, "cloudflared")
    assert tunnelled.startswith("the platform cannot reach https://a-b.trycloudflare.com/health through the cloudflared tunnel")


async def test_a_private_address_is_the_first_hop_named() -> None:
    result = await probe("http://192.168.1.20:8080", "http://127.0.0.1:8080")
    assert (result.ok, result.hop) == (False, "address")
    assert "local or private address" in result.message and "forward port 8080" in result.message


async def test_a_name_that_does_not_resolve_is_a_dns_problem() -> None:
    result = await probe("https://no-such-host.invalid", timeout=5)
    assert (result.ok, result.hop) == (False, "dns")
    assert "the name no-such-host.invalid does not resolve" in result.message


async def test_a_closed_port_says_forward_it_or_open_the_firewall() -> None:
    port = free_port()
    result = await probe(f"http://127.0.0.1:{port}", "http://127.0.0.1:8080", check_address=False)
    assert (result.ok, result.hop) == (False, "tcp")
    assert f"nothing accepts connections at 127.0.0.1:{port}" in result.message
    assert f"forward port {port} to port 8080 of this machine, open the firewall for it, or use --tunnel cloudflared" in result.message


async def test_a_port_that_leads_to_something_else_is_named() -> None:
    with LivePlatform() as platform:  # a web server, but not this agent: /health is not there
        result = await probe(platform.url, check_address=False)
    assert (result.ok, result.hop) == (False, "http")
    assert "answered 404" in result.message and "does not lead to this agent" in result.message


async def test_a_loading_agent_and_a_healthy_one() -> None:
    async with LiveServer(load=False) as live:
        loading = await probe(live.url, live.url, check_address=False)
        assert (loading.ok, loading.hop) == (False, "agent") and "still loading" in loading.message
        await live.acall(live._attach_engine)
        healthy = await probe(live.url, live.url, check_address=False)
    assert (healthy.ok, healthy.hop) == (True, "none")
    assert "check from outside it, or use --tunnel cloudflared" in healthy.message


async def test_an_offline_heartbeat_reply_names_the_hop_and_retraces_the_path(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO)
    dead = f"http://127.0.0.1:{free_port()}"
    with LivePlatform(health_interval=0.1, health_timeout=1) as platform:
        settings = Settings(endpoint_url=dead, endpoint_token="tok")
        offer = build_offer(market_options(settings), ResolvedGGUF(), served_context=4096, endpoint_token="tok")
        lifecycle = ProviderLifecycle(
            PlatformClient(platform.url, API_KEY, attempts=1), offer.request, EngineCounters,
            heartbeat_interval=0.1, backoff=Backoff(initial=0.05, cap=0.2), local_url="http://127.0.0.1:8080",
        )
        lifecycle.start()
        await eventually(lambda: lifecycle.phase is Phase.offline, timeout=10)
        assert lifecycle.message.endswith(
            f"offline: the platform cannot reach {dead}/health: forward port {dead.rsplit(':', 1)[1]} to port 8080 of this machine, "
            "open the firewall for it, or use --tunnel cloudflared"
        )
        await eventually(lambda: "reachability of" in caplog.text, timeout=10)
        await asyncio.sleep(0.5)  # more offline heartbeats: still one warning and one probe
        assert caplog.text.count("reachability of") == 1
        assert caplog.text.count("as offline") == 1
        assert "is a local or private address the platform cannot reach" in caplog.text
        await lifecycle.stop(timeout=5)


async def test_the_doctor_check_follows_the_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = "http://127.0.0.1:8080"
    assert (await check_configured(None, local)).message.startswith("serving locally only")
    tunnelled = market_options(Settings(tunnel="cloudflared", api_key="k"))
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = await check_configured(tunnelled, local)
    assert (missing.ok, missing.hop) == (False, "tunnel") and "brew install cloudflared" in missing.message
    fake = tmp_path / "cloudflared"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert (await check_configured(tunnelled, local)).ok
    nowhere = await check_configured(market_options(Settings(api_key="k")), local)
    assert (nowhere.ok, nowhere.hop) == (False, "address") and "--endpoint-url" in nowhere.message
    private = await check_configured(market_options(Settings(api_key="k", endpoint_url="http://10.1.2.3:8080")), local)
    assert (private.ok, private.hop) == (False, "address")


async def test_an_https_url_at_a_port_that_speaks_plain_http_says_so() -> None:
    with LivePlatform() as platform:  # plain HTTP on this port
        port = platform.url.rsplit(":", 1)[1]
        result = await probe(f"https://127.0.0.1:{port}", check_address=False)
    assert (result.ok, result.hop) == (False, "tls")
    assert f"127.0.0.1:{port} answers plain HTTP, not HTTPS: make the endpoint URL http://127.0.0.1:{port}" in result.message
    assert "terminate TLS in front of the agent (a reverse proxy, or --tunnel cloudflared)" in result.message
    assert "does not lead to this agent" not in result.message


async def test_an_endpoint_url_ending_in_v1_is_named_as_the_problem_and_refused_when_registering() -> None:
    async with LiveServer() as live:  # the agent prints its URL with /v1: a provider may paste that
        result = await probe(f"{live.url}/v1", live.url, check_address=False)
    assert (result.ok, result.hop) == (False, "url")
    assert f"{live.url}/v1 ends in /v1" in result.message and f"the endpoint URL is the base URL, {live.url}" in result.message
    with pytest.raises(OfferError, match=r"must be the base URL, without /v1 .*: use https://gpu\.example\.com$"):
        check_endpoint_url("https://gpu.example.com/v1/")


async def test_a_carrier_grade_nat_address_says_port_forwarding_cannot_work() -> None:
    result = await probe("http://100.64.1.1:8080", "http://127.0.0.1:8080")
    assert (result.ok, result.hop) == (False, "address")
    assert "carrier-grade NAT" in result.message and "port forwarding cannot work here: use --tunnel cloudflared" in result.message
    [warning] = check_endpoint_url("http://100.64.1.1:8080")
    assert "carrier-grade NAT" in warning and "--tunnel cloudflared" in warning
    for public in ("http://8.8.8.8:8080", "http://100.128.0.1:8080", "http://[2606:4700::1]:8080", "https://gpu.example.com"):
        assert check_endpoint_url(public) == [], public
    assert check_endpoint_url("http://10.1.2.3:8080") != []
