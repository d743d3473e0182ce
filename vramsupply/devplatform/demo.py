"""`vramsupply serve --demo`: the whole marketplace loop on one machine.

The reference platform runs in the agent's own process; the agent serves the bundled tiny model,
registers with it, and a buyer request goes through the platform to the agent and back, so a new
provider sees every moving part before touching the real network.

The CLI plugs ``DemoHook`` into `vramsupply serve` (``serve.hooks.ServeHook``); serve never imports
this module.

What the demo prints goes where serve's own lines go (``output.say_part``): a standard output
nobody reads (``serve --demo | head -3``) sends it to the log and the demo serves on, as serve does.
A stop (Ctrl-C) before the platform lists the agent ends the demo there; one during the purchase
lets the answer finish, as any buyer's request in flight, and the demo no longer says it goes on
serving.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from pydantic import SecretStr

from vramsupply.config import Settings
from vramsupply.devplatform import DevPlatform
from vramsupply.errors import VramsupplyError
from vramsupply.output import say_part
from vramsupply.platform.api import CHAT_COMPLETIONS_PATH
from vramsupply.platform.offer import local_base_url
from vramsupply.platform.session import MarketplaceSession

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "stories260K.gguf"
DEMO_PROMPT = "Once upon a time"
DEMO_MAX_TOKENS = 48
REGISTER_WAIT_SECONDS = 30.0


class DemoHook:
    """``--demo``: the reference platform around serving, and one bought answer once ready."""

    local_endpoint_ok = True

    def __init__(self, emit: Callable[[str], None] | None = None) -> None:
        self.platform: DevPlatform | None = None
        self._emit = emit or say_part

    @asynccontextmanager
    async def around(self, settings: Settings) -> AsyncIterator[Settings]:
        async with demo_marketplace(settings) as (hooked, platform):
            self.platform = platform
            try:
                yield hooked
            finally:
                self.platform = None

    async def on_ready(self, market: MarketplaceSession, model_id: str, stopping: asyncio.Event) -> None:
        if self.platform is None:
            raise DemoError("the demo platform is not running")
        await buy_one_answer(self.platform, market, model_id, self._emit, stopping)


@asynccontextmanager
async def demo_marketplace(settings: Settings) -> AsyncIterator[tuple[Settings, DevPlatform]]:
    """Run the reference platform in this process; yield the settings that point the agent at it.

    The agent serves the bundled tiny model unless --model names one (``cli.serve.demo_model``
    leaves out a model the environment or the config file names), and registers its own
    loopback URL (the demo's platform is local too, so no warning about it).
    """
    platform = DevPlatform()
    await platform.start()
    try:
        yield demo_settings(settings, platform), platform
    finally:
        await platform.stop()


def demo_settings(settings: Settings, platform: DevPlatform) -> Settings:
    """Port 0 becomes a concrete free port here: the endpoint URL is registered before listening."""
    port = settings.port or free_port(settings.host)
    return settings.model_copy(
        update={
            "model": settings.model or str(DEMO_MODEL),
            "platform_url": platform.url,
            "api_key": SecretStr(platform.api_key),
            "port": port,
            "endpoint_url": local_base_url(settings.host, port),
            "no_register": False,
        }
    )


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def buyer_request(platform: DevPlatform, model: str, emit: Callable[[str], None]) -> None:
    """Stream one chat completion bought through the platform, passing each piece to ``emit``."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": DEMO_MAX_TOKENS,
        "stream": True,
    }
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Authorization": f"Bearer {platform.api_key}"}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(platform.url + CHAT_COMPLETIONS_PATH, json=body, headers=headers) as response:
            if response.status != 200:
                raise DemoError(f"the platform answered the buyer with {response.status}: {await response.text()}")
            async for line in response.content:
                piece = _delta_text(line)
                if piece:
                    emit(piece)


async def buy_one_answer(
    platform: DevPlatform, market: MarketplaceSession, model: str, emit: Callable[[str], None], stopping: asyncio.Event
) -> None:
    """Once the agent is listed, buy one answer through the platform and show every step (see the
    module docstring for a stop meanwhile)."""
    lifecycle = market.lifecycle
    if lifecycle is None:
        raise DemoError("the agent is not registering with the demo platform")
    listed = asyncio.ensure_future(lifecycle.registered.wait())
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({listed, stopped}, timeout=REGISTER_WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listed.cancel()
        stopped.cancel()
    if stopping.is_set():
        return
    if not lifecycle.registered.is_set():
        raise DemoError(f"the agent did not register with the demo platform within {REGISTER_WAIT_SECONDS:g}s: {lifecycle.message}")
    emit(f"demo: the platform at {platform.url} lists this agent as {lifecycle.provider_id}\n")
    emit(f"demo: a buyer asks the platform for {model!r}: {DEMO_PROMPT!r}; the platform routes it here and streams the answer back:\n")
    await buyer_request(platform, model, emit)
    provider = platform.store.providers.get(lifecycle.provider_id or "")
    tokens = provider.routed_completion_tokens if provider is not None else 0
    emit(f"\ndemo: the platform counted {tokens} completion tokens served by this agent (you earn 95% of what buyers pay)\n")
    if stopping.is_set():
        return
    emit(
        f"demo: still serving and heartbeating; in another terminal try: VRAM_SUPPLY_PLATFORM_URL={platform.url} "
        f"VRAM_SUPPLY_API_KEY={platform.api_key} vramsupply demand. Ctrl-C stops and deregisters.\n"
    )


class DemoError(VramsupplyError):
    """The demo's buyer request failed; the message says how."""


def _delta_text(line: bytes) -> str:
    text = line.decode("utf-8", "replace").strip()
    if not text.startswith("data:") or text == "data: [DONE]":
        return ""
    try:
        chunk = json.loads(text[5:])
    except ValueError:
        return ""
    choices = chunk.get("choices") or []
    return str(choices[0].get("delta", {}).get("content") or "") if choices else ""
