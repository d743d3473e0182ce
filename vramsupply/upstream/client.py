"""Talking to the upstream OpenAI-compatible server: discovery, probes, and the forwarded requests.

One ``aiohttp.ClientSession`` per upstream, bound to loopback or the provider's LAN. Every probe has
a short timeout so a hung upstream is noticed instead of hanging the monitor; forwarded generations
are bounded by the front itself (``limits``: a whole answer's time, a stream's gaps between
events, sizes), so aiohttp's own timeout only bounds the connect.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=10)
GENERATION_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)


class UpstreamUnavailable(Exception):
    """The upstream did not answer, or answered with an error; the message says which."""


@dataclass(frozen=True)
class DiscoveredModel:
    """What the upstream says it serves: its own model name and, where it tells, its context."""

    name: str
    context_length: int | None


def server_root(base_url: str) -> str:
    """``http://host:port/v1`` → ``http://host:port``: /health and /metrics live at the root."""
    parts = urlsplit(base_url.rstrip("/"))
    path = parts.path.removesuffix("/v1")
    return urlunsplit((parts.scheme, parts.netloc, path, "", "")).rstrip("/")


def openai_base(url: str) -> str:
    """Accept ``http://host:port`` or ``http://host:port/v1``; return the ``/v1`` base."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class UpstreamClient:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.base_url = openai_base(url)
        self.root_url = server_root(self.base_url)
        self.api_key = api_key
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self.headers(), auto_decompress=True)
        return self._session

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_json(self, url: str) -> Any:
        try:
            async with self.session.get(url, timeout=PROBE_TIMEOUT) as reply:
                if reply.status != 200:
                    raise UpstreamUnavailable(f"{url} answered {reply.status}")
                return await reply.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(f"{url}: {describe(exc)}") from None

    async def status_of(self, path: str) -> int | None:
        """The HTTP status of ``GET {root}{path}``; None when nothing answers in time."""
        try:
            async with self.session.get(self.root_url + path, timeout=PROBE_TIMEOUT) as reply:
                await reply.read()
                return reply.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def metrics_text(self) -> str | None:
        try:
            async with self.session.get(self.root_url + "/metrics", timeout=PROBE_TIMEOUT) as reply:
                return await reply.text() if reply.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
            return None

    async def models(self) -> list[DiscoveredModel]:
        """``GET /v1/models``: names, and the context where the server says it (vLLM, SGLang)."""
        listing = await self.get_json(self.base_url + "/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise UpstreamUnavailable(f"{self.base_url}/models did not list any model")
        return [DiscoveredModel(str(item["id"]), context_of(item)) for item in data if isinstance(item, dict) and item.get("id")]

    async def complete_one_token(self, model: str) -> None:
        """A real 1-token completion: the readiness proof a /health 200 alone is not."""
        body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        url = self.base_url + "/completions"
        try:
            async with self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=60)) as reply:
                text = (await reply.read()).decode("utf-8", errors="replace")
                if reply.status != 200:
                    raise UpstreamUnavailable(f"a 1-token completion got {reply.status}: {text[:200]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamUnavailable(f"a 1-token completion failed: {describe(exc)}") from None


    async def props(self) -> tuple[int | None, int | None]:
        """llama-server's ``/props``: the context per slot and the slot count; (None, None) elsewhere."""
        try:
            props = await self.get_json(self.root_url + "/props")
        except UpstreamUnavailable:
            return None, None
        if not isinstance(props, dict):
            return None, None
        settings = props.get("default_generation_settings")
        n_ctx = positive_int(settings.get("n_ctx")) if isinstance(settings, dict) else None
        return n_ctx, positive_int(props.get("total_slots"))


def context_of(card: dict[str, Any]) -> int | None:
    """The served context a model card states: vLLM and SGLang say ``max_model_len``."""
    return positive_int(card.get("max_model_len")) or positive_int(card.get("context_length"))


def positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def listed_as(wanted: str, names: list[str]) -> str | None:
    """The upstream's own spelling of ``wanted`` among the names it lists (any case; Ollama's
    ``qwen3`` is its ``qwen3:latest``), or None."""
    by_lower = {name.lower(): name for name in names}
    return by_lower.get(wanted.lower()) or by_lower.get(wanted.lower() + ":latest")


CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """Control characters (a terminal's escape sequences, binary output) as ``\\xNN``, for the log."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def describe(exc: BaseException) -> str:
    """An exception in a few words, on one line; a timeout's empty message becomes its name."""
    return escape_controls(" ".join(str(exc).split()))[:300] or type(exc).__name__
