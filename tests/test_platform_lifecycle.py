"""The register → heartbeat → deregister lifecycle against the reference platform over real HTTP."""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from live_platform import API_KEY, LivePlatform, free_port

from vramsupply import __version__
from vramsupply.config import Settings
from vramsupply.platform.token import EndpointTokenError
from vramsupply.platform import Backoff, Phase, PlatformClient, ProviderLifecycle, build_offer, read_state, resolve_endpoint_token
from vramsupply.serve.options import market_options


@dataclass(frozen=True)
class ResolvedGGUF:
    model_id: str = "qwen/qwen3.5-9b"
    repo_id: str | None = "unsloth/Qwen3.5-9B-GGUF"
    filename: str | None = "Qwen3.5-9B-Q4_K_M.gguf"
    sha256: str | None = "ab" * 32
    quant: str | None = "Q4_K_M"


@dataclass
class EngineCounters:
    """What the engine's stats() reports; the test plays the traffic."""

    slots_total: int = 4
    slots_busy: int = 0
    queue_depth: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    failure: str | None = None
    unavailable: str | None = None


def make_lifecycle(platform_url: str, counters: EngineCounters, state_path: Path | None = None, interval: float = 0.2) -> ProviderLifecycle:
    settings = Settings(endpoint_url="https://gpu.example.com", input_price=150, output_price=300, endpoint_token="tok-secret")
    offer = build_offer(market_options(settings), ResolvedGGUF(), served_context=8192, endpoint_token=resolve_endpoint_token("tok-secret"))
    client = PlatformClient(platform_url, API_KEY, attempts=1)
    return ProviderLifecycle(
        client, offer.request, lambda: counters, heartbeat_interval=interval, backoff=Backoff(initial=0.05, cap=0.2), state_path=state_path
    )


async def eventually(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_register_sends_exactly_the_documented_fields_plus_our_gguf_identity() -> None:
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, EngineCounters())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [provider] = platform.providers

        assert provider.offer.model_dump(exclude_unset=True) == {
            "provider_type": "agent",
            "endpoint_url": "https://gpu.example.com",
            "model": "qwen/qwen3.5-9b",
            "input_price_per_million": 150,
            "output_price_per_million": 300,
            "context_length_offered": 8192,
            "gguf_repo": "unsloth/Qwen3.5-9B-GGUF",
            "gguf_file": "Qwen3.5-9B-Q4_K_M.gguf",
            "gguf_sha256": "ab" * 32,
            "quant": "Q4_K_M",
            "agent_version": __version__,
            "endpoint_token": "tok-secret",
        }
        assert lifecycle.provider_id == provider.id
        await lifecycle.stop(timeout=5)


async def test_heartbeats_report_status_and_tokens_since_the_last_heartbeat() -> None:
    counters = EngineCounters(prompt_tokens_total=1000, completion_tokens_total=500)
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, counters)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [provider] = platform.providers
        counters.slots_busy, counters.queue_depth = 3, 2
        counters.prompt_tokens_total += 40
        counters.completion_tokens_total += 7

        await eventually(lambda: provider.reported_completion_tokens == 7)
        assert provider.reported_prompt_tokens == 40, "tokens served before start() are not this instance's"
        assert (provider.slots_total, provider.slots_busy, provider.queue_depth) == (4, 3, 2)
        counters.completion_tokens_total += 5
        await eventually(lambda: provider.reported_completion_tokens == 12)
        beats_before = provider.last_seen_at
        await asyncio.sleep(0.5)
        assert provider.last_seen_at > beats_before, "heartbeats keep coming at the 0.2 s interval"
        await lifecycle.stop(timeout=5)


async def test_tokens_served_while_a_heartbeat_is_on_its_way_are_reported_by_the_next_one() -> None:
    """The engine keeps counting while a heartbeat's reply travels: those tokens are no one's
    until the next heartbeat reports them (they were lost when the lifecycle read the live
    counters again after the reply)."""
    counters = EngineCounters()
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, counters)
        send, served_meanwhile = lifecycle._client.heartbeat, [3, 3, 3]

        async def heartbeat(request, **options):  # type: ignore[no-untyped-def]
            reply = await send(request, **options)  # the real request to the platform
            if served_meanwhile:
                counters.completion_tokens_total += served_meanwhile.pop()
            return reply

        lifecycle._client.heartbeat = heartbeat
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [provider] = platform.providers
        await eventually(lambda: provider.reported_completion_tokens == 9)
        await lifecycle.stop(timeout=5)


async def test_a_restarted_platform_with_empty_state_gets_the_agent_back() -> None:
    port = free_port()
    counters = EngineCounters()
    with LivePlatform(port) as platform:
        lifecycle = make_lifecycle(platform.url, counters)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        first_id = lifecycle.provider_id
    with LivePlatform(port) as restarted:
        await eventually(lambda: len(restarted.providers) == 1)
        assert restarted.providers[0].id != first_id
        await eventually(lambda: lifecycle.provider_id == restarted.providers[0].id)
        assert lifecycle.phase is Phase.registered
        await lifecycle.stop(timeout=5)
        assert restarted.providers == []


async def test_platform_down_for_a_while_logs_once_and_registration_resumes(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    port = free_port()
    state_path = tmp_path / "registration.json"
    lifecycle = make_lifecycle(f"http://127.0.0.1:{port}", EngineCounters(), state_path)
    with caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle.start()
        await eventually(lambda: lifecycle.phase is Phase.unreachable)
        await asyncio.sleep(0.6)
        recorded = read_state(state_path)
        assert recorded is not None and recorded.phase is Phase.unreachable
        with LivePlatform(port) as platform:
            await asyncio.wait_for(lifecycle.registered.wait(), 5)
            assert [p.id for p in platform.providers] == [lifecycle.provider_id]
            await lifecycle.stop(timeout=5)
    unreachable_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable_lines) == 1, "one line per state change, not one per retry"
    assert any("registered qwen/qwen3.5-9b as prov_" in r.getMessage() for r in caplog.records)


async def test_an_unexpected_error_in_a_heartbeat_is_logged_and_the_heartbeats_go_on(caplog: pytest.LogCaptureFixture) -> None:
    """A fault of our own (not the platform's) must not end the loop: the agent goes on serving,
    and without heartbeats the platform would mark it offline."""
    counters = EngineCounters()
    with LivePlatform() as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = make_lifecycle(platform.url, counters)
        heartbeat = lifecycle._client.heartbeat
        faults = [RuntimeError("a bug of ours")]

        async def faulty(request: object, **options: Any) -> object:
            if faults:
                raise faults.pop()
            return await heartbeat(request, **options)  # type: ignore[arg-type]

        lifecycle._client.heartbeat = faulty  # type: ignore[method-assign]
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [provider] = platform.providers
        counters.completion_tokens_total += 9
        await eventually(lambda: provider.reported_completion_tokens == 9)
        assert await lifecycle.stop(timeout=5) is True
    [logged] = [r for r in caplog.records if "unexpected error talking to the platform" in r.getMessage()]
    assert logged.levelno == logging.ERROR and logged.exc_info is not None and not faults


async def test_stop_deregisters_and_records_it(tmp_path: Path) -> None:
    state_path = tmp_path / "registration.json"
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, EngineCounters(), state_path)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        provider_id = lifecycle.provider_id
        registered = read_state(state_path)
        assert registered is not None and registered.phase is Phase.registered and registered.provider_id == provider_id

        assert await lifecycle.stop(timeout=5) is True

        assert platform.providers == []
    recorded = read_state(state_path)
    assert recorded is not None
    assert recorded.phase is Phase.deregistered and recorded.provider_id is None
    assert provider_id in recorded.message


async def test_drain_stops_routing_before_deregistering() -> None:
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, EngineCounters())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        await lifecycle.drain(timeout=2)
        assert platform.providers[0].status == "draining"
        assert platform.platform.store.candidates("qwen/qwen3.5-9b", "stripe") == []
        await lifecycle.stop(timeout=2)
        assert platform.providers == []


async def test_an_engine_that_goes_down_takes_itself_off_the_market_at_once_and_comes_back() -> None:
    counters = EngineCounters()
    with LivePlatform() as platform:
        lifecycle = make_lifecycle(platform.url, counters, interval=30)
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        [provider] = platform.providers
        assert provider.status == "online"

        # The upstream dies: the platform hears it long before the next regular heartbeat (30 s).
        counters.unavailable = "the upstream is not ready: the upstream server at http://127.0.0.1:8000 does not answer"
        # (the platform lists it offline when the heartbeat arrives; the lifecycle, once it reads the answer)
        await eventually(lambda: provider.status == "offline" and lifecycle.phase is Phase.offline, timeout=10)
        assert platform.platform.store.candidates("qwen/qwen3.5-9b", "stripe") == []
        assert "does not answer" in lifecycle.message

        # Back again: the platform hears that too; it lists us once its own health check passes.
        counters.unavailable = None
        await eventually(lambda: "serving again" in lifecycle.message, timeout=10)
        assert await lifecycle.stop(timeout=5) is True
        assert platform.providers == []


async def test_stop_gives_up_at_the_deadline_when_the_platform_is_gone() -> None:
    port = free_port()
    with LivePlatform(port) as platform:
        lifecycle = make_lifecycle(platform.url, EngineCounters())
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
    started = time.monotonic()
    assert await lifecycle.stop(timeout=0.5) is False
    assert time.monotonic() - started < 2
    assert lifecycle.phase is Phase.deregister_failed


async def test_a_rejected_api_key_keeps_retrying_and_says_how_to_fix_it(caplog: pytest.LogCaptureFixture) -> None:
    with LivePlatform(api_key="sk-someone-else") as platform, caplog.at_level(logging.INFO, logger="vramsupply.platform"):
        lifecycle = make_lifecycle(platform.url, EngineCounters())
        lifecycle.start()
        await eventually(lambda: lifecycle.phase is Phase.rejected)
        await asyncio.sleep(0.5)
        await lifecycle.stop(timeout=1)
    rejected = [r for r in caplog.records if "API key rejected — run `vramsupply login`" in r.getMessage()]
    assert len(rejected) == 1 and rejected[0].levelno == logging.ERROR


def test_endpoint_token_is_generated_once_and_stored_private(tmp_path: Path) -> None:
    path = tmp_path / "endpoint_token"
    first = resolve_endpoint_token(None, path)
    second = resolve_endpoint_token(None, path)

    assert first == second and len(first) > 30
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_endpoint_token("configured", path) == "configured"

    path.write_bytes(b"\xff\xfe\x00")  # damaged: never silently replaced, which would change the token
    with pytest.raises(EndpointTokenError, match="endpoint token file .* is damaged .* delete it"):
        resolve_endpoint_token(None, path)


def test_a_data_dir_that_cannot_hold_the_endpoint_token_is_one_line_naming_the_way_out(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the data dir should be")  # before: a bare "Not a directory"
    with pytest.raises(EndpointTokenError, match=r"cannot read the endpoint token file .*not-a-dir/endpoint_token: Not a directory"):
        resolve_endpoint_token(None, blocked / "endpoint_token")
    with pytest.raises(EndpointTokenError, match=r"cannot keep the endpoint token in /proc/no-such-dir/endpoint_token: .*set VRAM_SUPPLY_ENDPOINT_TOKEN") as refusal:
        resolve_endpoint_token(None, Path("/proc/no-such-dir/endpoint_token"))  # no folder can be made there, even as root
    assert refusal.value.exit_code == 1, "the machine's fault, not an invalid setting (exit 2)"


async def test_an_unwritable_state_file_is_reported_once_and_never_stops_registration(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the data dir should be")
    with LivePlatform() as platform, caplog.at_level(logging.WARNING, logger="vramsupply.platform"):
        lifecycle = make_lifecycle(platform.url, EngineCounters(), blocked / "registration.json")
        lifecycle.start()
        await asyncio.wait_for(lifecycle.registered.wait(), 5)
        await asyncio.sleep(0.5)
        assert await lifecycle.stop(timeout=5) is True
    warnings = [r.getMessage() for r in caplog.records if "cannot record the registration state" in r.getMessage()]
    assert len(warnings) == 1
