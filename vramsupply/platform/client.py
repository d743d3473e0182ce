"""One aiohttp client for the vram.supply provider API.

Every call authenticates with ``Authorization: Bearer <API key>``. Failures become
``PlatformError`` subclasses whose message is one line a provider can act on; network errors and
5xx answers are retried with capped exponential backoff before giving up.
"""

from __future__ import annotations

import asyncio
import json
from typing import TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from vramsupply.errors import VramsupplyError
from vramsupply.platform import api
from vramsupply.platform.backoff import Backoff

ReplyT = TypeVar("ReplyT", bound=BaseModel)

API_KEY_REJECTED = "API key rejected — run `vramsupply login`"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_BACKOFF = Backoff(initial=0.5, cap=4.0)
"""Between a call's own retries: short, so a CLI command gives up within seconds."""


class PlatformError(VramsupplyError):
    """Any failure talking to the platform; ``str()`` is one line for the user."""


class ApiKeyRejected(PlatformError):
    def __init__(self) -> None:
        super().__init__(API_KEY_REJECTED)


class RequestRejected(PlatformError):
    """400/422 (or another 4xx): the platform says which field is wrong and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UnknownProvider(PlatformError):
    """404/410 for a provider id: the platform no longer knows this instance."""


class PlatformUnavailable(PlatformError):
    """Network error, timeout or 5xx, still failing after the retries."""


class PlatformClient:
    """Typed calls to the provider API. Use as ``async with PlatformClient(url, key) as client``."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        attempts: int = 3,
        backoff: Backoff = RETRY_BACKOFF,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PlatformClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def register(self, request: api.RegisterRequest) -> api.RegisterResponse:
        return await self._call("POST", api.REGISTER_PATH, api.RegisterResponse, request)

    async def heartbeat(self, request: api.HeartbeatRequest) -> api.HeartbeatResponse:
        return await self._call("POST", api.HEARTBEAT_PATH, api.HeartbeatResponse, request, names_provider=True)

    async def deregister(self, provider_id: str) -> None:
        """DELETE the instance; one the platform has already forgotten counts as deregistered."""
        try:
            await self._exchange("DELETE", api.PROVIDER_PATH.format(provider_id=provider_id), None, names_provider=True)
        except UnknownProvider:
            return

    async def demand(self) -> api.DemandResponse:
        return await self._call("GET", api.DEMAND_PATH, api.DemandResponse)

    async def rails(self) -> api.Rails:
        return await self._call("GET", api.RAILS_PATH, api.Rails)

    async def set_rails(self, update: api.RailsUpdate) -> api.Rails:
        return await self._call("PATCH", api.RAILS_PATH, api.Rails, update)

    def _session_for_call(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers={"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"},
            )
        return self._session

    async def _call(
        self, method: str, path: str, reply: type[ReplyT], body: BaseModel | None = None, *, names_provider: bool = False
    ) -> ReplyT:
        text = await self._exchange(method, path, body, names_provider=names_provider)
        try:
            return reply.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise PlatformError(f"unexpected answer to {method} {path}: {where}: {first['msg']}") from None

    async def _exchange(self, method: str, path: str, body: BaseModel | None, *, names_provider: bool = False) -> str:
        """The successful answer's body, retrying network errors and 5xx; ``names_provider``: 404/410 means UnknownProvider."""
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        url = self.base_url + path
        failure = ""
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(self._backoff.delay(attempt - 1))
            try:
                async with self._session_for_call().request(method, url, json=payload) as response:
                    # JSON is UTF-8 (RFC 8259); a proxy's error page in another encoding, or a
                    # wrong charset, is read with its odd bytes replaced rather than raising.
                    text = (await response.read()).decode("utf-8", errors="replace")
                    if response.status not in RETRYABLE_STATUSES:
                        _raise_for_status(method, path, response.status, text, names_provider)
                        return text
                    failure = f"{self.base_url} answered {response.status}{_detail(text)}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = f"cannot reach {self.base_url}: {describe_error(exc)}"
        raise PlatformUnavailable(failure)


def _raise_for_status(method: str, path: str, status: int, text: str, names_provider: bool) -> None:
    if status == 401:
        raise ApiKeyRejected()
    if status in (404, 410) and names_provider:
        raise UnknownProvider(f"the platform does not know this provider ({status}{_detail(text)})")
    if status >= 400:
        raise RequestRejected(status, f"platform rejected {method} {path} ({status}): {_message(text) or 'no reason given'}")


def _message(text: str) -> str | None:
    try:
        return api.error_message(json.loads(text))
    except ValueError:
        return text.strip().splitlines()[0][:200] if text.strip() else None


def _detail(text: str) -> str:
    message = _message(text)
    return f": {message}" if message else ""


def describe_error(exc: BaseException) -> str:
    """A network error in a few words; timeouts and some connection errors have an empty ``str()``."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
