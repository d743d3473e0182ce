"""One aiohttp client for the vram.supply provider API.

Every call authenticates with ``Authorization: Bearer <API key>``. Failures become
``PlatformError`` subclasses whose message is one line a provider can act on; network errors, 429
and 5xx answers are retried with capped exponential backoff before giving up, all within the call's
``timeout``. A 429 or 503 that says when to ask again (``Retry-After``) is not asked sooner: when
that is past the call's timeout, the call gives up at once and says when the platform asked to be
retried (``PlatformUnavailable.retry_after`` carries it to the lifecycle, which waits it out, capped).

The platform is on the other side of the internet, so nothing it sends is trusted: an answer is
read up to ``MAX_ANSWER_BYTES`` (decompressed by us, a bounded step at a time, so a gzip bomb costs
neither memory nor the event loop); redirects are never followed (a register body carries the
endpoint token, and a redirected DELETE proves nothing); a provider id is one URL path segment;
and any text of the platform's that reaches a message is ``api.printable``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from vramsupply.errors import VramsupplyError
from vramsupply.platform import api
from vramsupply.platform.api import printable
from vramsupply.platform.backoff import Backoff, parse_retry_after

ReplyT = TypeVar("ReplyT", bound=BaseModel)

API_KEY_REJECTED = "API key rejected — run `vramsupply login`"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
GATEWAY_STATUSES = frozenset({502, 504})
"""A proxy's answer: the platform behind it may have acted on the request all the same."""
RETRY_AFTER_STATUSES = frozenset({429, 503})
"""The answers whose ``Retry-After`` says when to ask again (RFC 6585 §4, RFC 9110 §15.6.4)."""
RETRY_BACKOFF = Backoff(initial=0.5, cap=4.0)
"""Between a call's own retries: short, so a CLI command gives up within its ``timeout``."""
MAX_ANSWER_BYTES = 4 << 20
"""The largest answer read (decompressed): the provider API's are a few kilobytes."""
PLATFORM_URL_SETTING = "platform_url (VRAM_SUPPLY_PLATFORM_URL)"


def account_of(api_key: str) -> str:
    """A fingerprint of ``api_key`` (16 hex digits of its SHA-256): which account, never the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


class PlatformError(VramsupplyError):
    """Any failure talking to the platform; ``str()`` is one line for the user."""


class ApiKeyRejected(PlatformError):
    def __init__(self, message: str = API_KEY_REJECTED) -> None:
        super().__init__(message)


class RequestRejected(PlatformError):
    """400/422 (or another 4xx): the platform says which field is wrong and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UnknownProvider(PlatformError):
    """404/410 for a provider id: the platform no longer knows this instance."""


class UnexpectedAnswer(PlatformError):
    """A success status (2xx) whose body is not the documented one: the platform did act on the call."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PlatformUnavailable(PlatformError):
    """Network error, timeout, 429 or 5xx, still failing after the retries.

    ``reached``: some try may have reached the platform all the same (no answer came in time, the
    connection dropped after the request went out, a gateway answered 502/504), so whatever it
    asked for may have been done; False when every try failed to connect or was refused.
    ``retry_after``: the seconds the last answer asked us to wait before asking again (a usable
    ``Retry-After`` on a 429 or 503), None when it said nothing usable."""

    def __init__(self, message: str, *, reached: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reached = reached
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Transient:
    """One try that failed in a way worth trying again (see ``PlatformUnavailable``)."""

    message: str
    reached: bool = False
    retry_after: float | None = None


class PlatformClient:
    """Typed calls to the provider API. Use as ``async with PlatformClient(url, key) as client``.

    ``timeout``: seconds one call may take, its retries and their backoff included; ``sleep``:
    how the waits between tries are waited (a test passes one that records them)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        attempts: int = 3,
        backoff: Backoff = RETRY_BACKOFF,
        timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._timeout = timeout
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    @property
    def account(self) -> str:
        """A fingerprint of the API key (not the key): tells a record of this account's instances from another's."""
        return account_of(self._api_key)

    async def use_api_key(self, api_key: str) -> None:
        """Authenticate with ``api_key`` from the next call on (a key replaced while the agent runs)."""
        self._api_key = api_key
        await self.close()  # its session sends the old key with every request

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

    async def heartbeat(self, request: api.HeartbeatRequest, *, key: str | None = None) -> api.HeartbeatResponse:
        """The platform's view; ``UnexpectedAnswer`` when it accepted the heartbeat (2xx) but its body is unreadable.
        ``key``: the heartbeat's ``Idempotency-Key``, the same each time that heartbeat is sent."""
        headers = {api.IDEMPOTENCY_KEY_HEADER: key} if key is not None else None
        return await self._call("POST", api.HEARTBEAT_PATH, api.HeartbeatResponse, request, names_provider=True, headers=headers)

    async def deregister(self, provider_id: str) -> None:
        """DELETE the instance: done when the platform confirms it (the documented answer), or has
        already forgotten it (404/410); any other answer is a PlatformError saying what came."""
        path = api.PROVIDER_PATH.format(provider_id=quote(provider_id, safe=""))
        try:
            reply = await self._call("DELETE", path, api.DeregisterResponse, names_provider=True)
        except UnknownProvider:
            return
        if reply.provider_id != provider_id or reply.status != "deregistered":
            said = f"status {printable(reply.status, 40)!r} for {reply.provider_id}"
            raise UnexpectedAnswer(200, f"the platform did not confirm removing {provider_id}: it answered {said}")

    async def demand(self) -> api.DemandResponse:
        return await self._call("GET", api.DEMAND_PATH, api.DemandResponse)

    async def rails(self) -> api.Rails:
        """The account's rails. Only PATCH is in the public docs (reading them with GET is the
        reference platform's): a platform without it is said to be so, with the way that works."""
        try:
            return await self._call("GET", api.RAILS_PATH, api.Rails)
        except RequestRejected as exc:
            if exc.status not in (404, 405, 501):
                raise
            raise PlatformError(
                f"this platform does not show the payment rails (GET {api.RAILS_PATH} answered {exc.status}; only changing them is "
                "documented): change one with `vramsupply rails --stripe/--no-stripe` or `--tempo/--no-tempo`, whose answer shows both"
            ) from None

    async def set_rails(self, update: api.RailsUpdate) -> api.Rails | None:
        """The rails after the change, or None where the platform's answer does not show them: the
        public docs say how to change them, not what the answer holds, and a 2xx has applied it."""
        _, text = await self._exchange("PATCH", api.RAILS_PATH, update)
        try:
            return api.Rails.model_validate_json(text)
        except ValidationError:
            return None

    def _session_for_call(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._api_key}", "Accept": "application/json", "Accept-Encoding": "gzip, deflate"},
                auto_decompress=False,  # ``_read_answer`` inflates, within MAX_ANSWER_BYTES
            )
        return self._session

    async def _call(
        self, method: str, path: str, reply: type[ReplyT], body: BaseModel | None = None, *, names_provider: bool = False, headers: dict[str, str] | None = None
    ) -> ReplyT:
        status, text = await self._exchange(method, path, body, names_provider=names_provider, headers=headers)
        try:
            return reply.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise UnexpectedAnswer(status, f"unexpected answer to {method} {path}: {printable(where, 100)}: {printable(first['msg'])}") from None

    async def _exchange(
        self, method: str, path: str, body: BaseModel | None, *, names_provider: bool = False, headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        """The successful answer's status and body, retrying transient failures within the call's
        timeout, never sooner than the platform asked (``Retry-After``); gives up at once when that
        is past the timeout. ``names_provider``: 404/410 means UnknownProvider."""
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        deadline = time.monotonic() + self._timeout
        failed, reached = _Transient(""), False
        for attempt in range(self._attempts):
            if attempt:
                pause = max(self._backoff.delay(attempt - 1), failed.retry_after or 0.0)
                if time.monotonic() + pause >= deadline:
                    break
                await self._sleep(pause)
            outcome = await self._try(method, path, payload, deadline, names_provider, headers)
            if not isinstance(outcome, _Transient):
                return outcome
            failed, reached = outcome, reached or outcome.reached
        raise PlatformUnavailable(failed.message, reached=reached, retry_after=failed.retry_after)

    async def _try(
        self, method: str, path: str, payload: object, deadline: float, names_provider: bool, headers: dict[str, str] | None = None
    ) -> tuple[int, str] | _Transient:
        """One request: the answer, or why it failed in a way worth trying again (other failures raise)."""
        timeout = aiohttp.ClientTimeout(total=max(0.001, deadline - time.monotonic()))
        try:
            session = self._session_for_call()
            request = session.request(method, self.base_url + path, json=payload, headers=headers, allow_redirects=False, timeout=timeout)
            async with request as response:
                text = await _answer_text(response, f"{method} {path}")
                if response.status not in RETRYABLE_STATUSES:
                    self._raise_for_status(method, path, response, text, names_provider)
                    return response.status, text
                return self._transient_answer(response, text)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:  # nothing was sent
            return _Transient(f"cannot reach {self.base_url}: {describe_error(exc)}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _Transient(f"cannot reach {self.base_url}: {describe_error(exc)}", reached=True)

    def _transient_answer(self, response: aiohttp.ClientResponse, text: str) -> _Transient:
        """A 429 or 5xx, with the wait it asks for (a usable ``Retry-After`` on a 429 or 503)."""
        status = response.status
        headers = response.headers
        asked = parse_retry_after(headers.get("Retry-After"), sent_at=headers.get("Date")) if status in RETRY_AFTER_STATUSES else None
        when = f" (it asks to be retried in {math.ceil(asked)} s)" if asked else ""
        return _Transient(f"{self.base_url} answered {status}{_detail(text)}{when}", reached=status in GATEWAY_STATUSES, retry_after=asked)

    def _raise_for_status(self, method: str, path: str, response: aiohttp.ClientResponse, text: str, names_provider: bool) -> None:
        status = response.status
        if 300 <= status < 400:
            raise PlatformError(self._redirect_message(f"{method} {path}", status, response.headers.get("Location")))
        if status == 401:
            raise ApiKeyRejected()
        if status in (404, 410) and names_provider:
            raise UnknownProvider(f"the platform does not know this provider ({status}{_detail(text)})")
        if status >= 400:
            reason = _message(text) or "no reason given"
            if _is_html(text):  # a web server or proxy answered, not the platform's API
                reason = f"an HTML page, not an answer of the vram.supply API: check {PLATFORM_URL_SETTING}"
            raise RequestRejected(status, f"platform rejected {method} {path} ({status}): {reason}")

    def _redirect_message(self, call: str, status: int, location: str | None) -> str:
        """A redirect is not followed; say where it pointed, and whether it looks like the API moved."""
        said = f"{self.base_url} redirects {call} ({status})"
        if not location:
            return f"{said} without saying where; redirects are not followed: check {PLATFORM_URL_SETTING}"
        path = call.split(" ", 1)[1]
        try:
            target = str(URL(self.base_url + path).join(URL(location)))
        except ValueError:
            target = location
        moved = target[: -len(path)] if target.endswith(path) else None
        if moved and moved != self.base_url and moved.startswith(("http://", "https://")):
            hint = f"if the API moved there, set {PLATFORM_URL_SETTING} to {printable(moved, 200)}"
        else:
            hint = f"check {PLATFORM_URL_SETTING}"
        return f"{said} to {printable(target, 200)}; redirects are not followed, so nothing was sent there: {hint}"


async def _answer_text(response: aiohttp.ClientResponse, call: str) -> str:
    """``_read_answer``, where a success whose body cannot be read (not the gzip it claims, past
    MAX_ANSWER_BYTES) is an ``UnexpectedAnswer``: the platform did act on the call, so a heartbeat's
    tokens must not be told again, and a register may have listed us."""
    try:
        return await _read_answer(response, call)
    except PlatformError as exc:
        if 200 <= response.status < 300:
            raise UnexpectedAnswer(response.status, str(exc)) from None
        raise


async def _read_answer(response: aiohttp.ClientResponse, call: str) -> str:
    """The body as text, read and inflated a bounded step at a time; PlatformError past MAX_ANSWER_BYTES.

    JSON is UTF-8 (RFC 8259); a proxy's error page in another encoding, or a wrong charset, is
    read with its odd bytes replaced rather than raising."""
    too_large = f"the platform's answer to {call} is larger than {MAX_ANSWER_BYTES >> 20} MiB; not reading it"
    if (response.content_length or 0) > MAX_ANSWER_BYTES:
        response.close()
        raise PlatformError(too_large)
    inflater = _inflater(response.headers.get("Content-Encoding", ""), call)
    body, received = bytearray(), 0
    async for chunk in response.content.iter_any():
        received += len(chunk)
        body += chunk if inflater is None else _inflate(inflater, chunk, MAX_ANSWER_BYTES + 1 - len(body), call)
        if len(body) > MAX_ANSWER_BYTES or received > MAX_ANSWER_BYTES:
            response.close()
            raise PlatformError(too_large)
    return body.decode("utf-8", errors="replace")


def _inflater(encoding: str, call: str) -> zlib._Decompress | None:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # a gzip or a zlib header, whichever it has
    raise PlatformError(f"the platform's answer to {call} is in an encoding not asked for ({printable(encoding, 40)})")


def _inflate(inflater: zlib._Decompress, data: bytes, room: int, call: str) -> bytes:
    """At most ``room`` bytes more out of ``data`` (room + 1 when there is more: the caller stops then)."""
    out = bytearray()
    try:
        while data and not inflater.eof and len(out) <= room:
            out += inflater.decompress(data, room + 1 - len(out))
            data = inflater.unconsumed_tail
    except zlib.error:
        raise PlatformError(f"the platform's answer to {call} is not the compressed data it says it is") from None
    return bytes(out)


def _message(text: str) -> str | None:
    try:
        return api.error_message(json.loads(text))
    except ValueError:
        lines = text.strip().splitlines()
        return printable(lines[0]) if lines else None


def _is_html(text: str) -> bool:
    """Whether an answer is a web page (a plain web server's 404, a proxy's or captive portal's page)."""
    start = text.lstrip()[:200].lower()
    return start.startswith(("<!doctype html", "<html")) or (start.startswith("<") and "<html" in start)


def _detail(text: str) -> str:
    message = _message(text)
    return f": {message}" if message else ""


def describe_error(exc: BaseException) -> str:
    """A network error in a few words, on one line; timeouts and some connection errors have an
    empty ``str()``, and aiohttp's response errors a ``repr``-like one."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return f"too many redirects, the last to {printable(str(exc.request_info.real_url), 200)}"
    if isinstance(exc, aiohttp.ClientResponseError):
        message = printable(exc.message or "", 200)
        if exc.status == 400 and exc.headers is None:  # the answer did not parse as HTTP
            return f"an answer that is not HTTP ({message or 'unreadable'})"
        return f"HTTP {exc.status}: {message}" if message else f"HTTP {exc.status}"
    return printable(str(exc), 200) or type(exc).__name__
