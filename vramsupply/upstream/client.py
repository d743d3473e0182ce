"""Talking to the upstream OpenAI-compatible server: discovery, probes, and the forwarded requests.

Two ``aiohttp.ClientSession`` per upstream, bound to loopback or the provider's LAN:

- ``session`` carries buyers' generations (and the counting of their usage). Its pool has no cap:
  the front admits as many requests as buyers send (``limits`` bounds their time and size, not
  their number), and aiohttp's default of 100 connections held the 101st buyer in our own queue.
- ``probes`` carries the health, load and model checks, on connections of their own. Sharing the
  buyers' pool, a check waited behind 100 long streams, a healthy upstream looked dead, and a
  launched vLLM was restarted in the middle of its busiest minute.

A pooled connection is the server's to close, and a request sent on one it has just closed fails
unanswered. llama-server closes the connection after every streamed answer, though its headers offer
to keep it alive: aiohttp took it back into the pool at the stream's last byte, the tokenize call
counting the stream took it and failed, and two streams in three of ``n`` 2 ended without the usage
their buyer asked for. So a stream asks for a connection of its own (``ONE_CONNECTION``): the
upstream closes it and says so, and it is not pooled. A closed connection met all the same (a
keep-alive running out as a request comes) is asked again once where that is safe: ``usage``'s
counting requests.

Every probe has a short timeout so a hung upstream is noticed instead of hanging the monitor;
forwarded generations are bounded by the front itself (``limits``: a whole answer's time, a
stream's gaps between events, sizes), so aiohttp's own timeout only bounds the connect.

``describe`` says what went wrong in plain words, for buyers and health reasons: never aiohttp's
class names or reprs, nor the upstream's address. Messages for the provider (``UpstreamUnavailable``'s
own text, the log) name the URL; its ``cause`` says the same without it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=10)
GENERATION_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)
COMPLETION_PROBE_SECONDS = 60.0
ONE_CONNECTION = {"Connection": "close"}
"""The headers of a streamed generation: its connection is not pooled after it (see the module docstring)."""


class UpstreamUnavailable(Exception):
    """The upstream did not answer, or answered with an error; the message says which, naming the
    URL asked (for the provider), and ``cause`` says it without the address (for buyers)."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = message if cause is None else cause


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
        self._probes: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """Buyers' generations: as many connections as requests in flight (see the module docstring)."""
        if self._session is None or self._session.closed:
            self._session = self._new_session(aiohttp.TCPConnector(limit=0))
        return self._session

    @property
    def probes(self) -> aiohttp.ClientSession:
        """Health, load and model checks, never queued behind buyers' connections."""
        if self._probes is None or self._probes.closed:
            self._probes = self._new_session(aiohttp.TCPConnector())
        return self._probes

    def _new_session(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers=self.headers(), auto_decompress=True, connector=connector)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def close(self) -> None:
        for session in (self._session, self._probes):
            if session is not None:
                await session.close()
        self._session = self._probes = None

    async def get_json(self, url: str) -> Any:
        path = urlsplit(url).path
        try:
            async with self.probes.get(url, timeout=PROBE_TIMEOUT) as reply:
                if reply.status != 200:
                    raise UpstreamUnavailable(f"{url} answered {reply.status}", f"{path} answered {reply.status}")
                return await reply.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            cause = describe(exc, PROBE_TIMEOUT.total)
            raise UpstreamUnavailable(f"{url}: {cause}", f"{path}: {cause}") from None

    async def status_of(self, path: str) -> int | None:
        """The HTTP status of ``GET {root}{path}``; None when nothing answers in time."""
        try:
            async with self.probes.get(self.root_url + path, timeout=PROBE_TIMEOUT) as reply:
                await reply.read()
                return reply.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def metrics_text(self) -> str | None:
        try:
            async with self.probes.get(self.root_url + "/metrics", timeout=PROBE_TIMEOUT) as reply:
                return await reply.text() if reply.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
            return None

    async def models(self) -> list[DiscoveredModel]:
        """``GET /v1/models``: names, and the context where the server says it (vLLM, SGLang)."""
        url = self.base_url + "/models"
        listing = await self.get_json(url)
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            raise UpstreamUnavailable(f"{url} did not list any model", f"{urlsplit(url).path} did not list any model")
        return [DiscoveredModel(str(item["id"]), context_of(item)) for item in data if isinstance(item, dict) and item.get("id")]

    async def complete_one_token(self, model: str) -> None:
        """A real 1-token completion: the readiness proof a /health 200 alone is not."""
        body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        url = self.base_url + "/completions"
        try:
            async with self.probes.post(url, json=body, timeout=aiohttp.ClientTimeout(total=COMPLETION_PROBE_SECONDS)) as reply:
                text = (await reply.read()).decode("utf-8", errors="replace")
                if reply.status != 200:
                    raise UpstreamUnavailable(f"a 1-token completion got {reply.status}: {escape_controls(text[:200])}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamUnavailable(f"a 1-token completion failed: {describe(exc, COMPLETION_PROBE_SECONDS)}") from None

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


def describe(exc: BaseException, seconds: float | None = None) -> str:
    """What went wrong talking to the upstream, as one plain cause a buyer may read: never aiohttp's
    class names or reprs, nor the upstream's address. ``seconds``: the timeout, when one struck.
    Our own ``UpstreamUnavailable`` is its message as it is (the log's words)."""
    within = f"within {seconds:g} s" if seconds else "in time"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"the model server did not take the connection {within}"
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return f"no answer {within}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the model server's name does not resolve"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "the TLS handshake with the model server failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if exc.os_error.errno == errno.ECONNREFUSED:
            return "the model server refused the connection"
        return "cannot connect to the model server" + os_reason(exc.os_error)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed before the answer was complete"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the model server closed the connection"
    if isinstance(exc, OSError):  # aiohttp.ClientOSError, a reset connection
        return "the connection to the model server failed" + os_reason(exc)
    if isinstance(exc, aiohttp.ClientResponseError):
        return "an answer that is not HTTP" if exc.headers is None else f"an answer that could not be read (HTTP {exc.status})"
    if isinstance(exc, UnicodeDecodeError):
        return "an answer that is not UTF-8 text"
    if isinstance(exc, ValueError) and not isinstance(exc, aiohttp.ClientError):  # json's decode error
        return "an answer that is not JSON"
    if isinstance(exc, aiohttp.ClientError):
        return "the connection to the model server failed"
    return escape_controls(" ".join(str(exc).split()))[:300] or "an error without a message"


def os_reason(exc: OSError) -> str:
    """`` (connection reset by peer)``: the system's words for an errno, never the message, which
    may name the address."""
    return f" ({os.strerror(exc.errno).lower()})" if exc.errno else ""
