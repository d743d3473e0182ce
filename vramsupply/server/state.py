"""What every handler shares: the served model's names, the engine once it has loaded, metrics.

The app exists and answers before the engine does (``/health`` says 503 "loading"), so the engine
is attached later by the serve lifecycle with ``ServerState.attach``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from vramsupply.engine import Engine, EngineStats
from vramsupply.server.accounting import Accounts
from vramsupply.server.errors import ApiError, from_validation_error
from vramsupply.server.metrics import ServerMetrics
from vramsupply.timeouts import within

LOADING_RETRY_AFTER_SECONDS = "5"
INLINE_PARSE_MAX_BYTES = 64 * 1024
BODY_IDLE_SECONDS = 30.0
"""A client that sends its headers and then stops sending its body holds a connection and a handler:
after this long without a byte it gets 408 and the connection is closed. A slow upload that keeps
sending is never cut."""

Body = TypeVar("Body", bound=BaseModel)


class ServerState:
    def __init__(self, model_id: str, aliases: Iterable[str] = (), endpoint_token: str | None = None) -> None:
        self.model_id = model_id
        self.created = int(time.time())
        self.endpoint_token = endpoint_token or None
        self.engine: Engine | None = None
        self._names = {model_id.lower(), *(a.lower() for a in aliases)}
        self.accounts = Accounts()
        self.tunnel_trouble: str | None = None
        """What is wrong with the tunnel that makes this agent public (``--tunnel``), for /health."""
        self.metrics = ServerMetrics(self.stats, ledger_failure=lambda: self.accounts.failure)

    placement: Any = None  # vramsupply.gpu.report.PlacementMonitor once loaded: where the model runs

    def attach(self, engine: Engine) -> None:
        """The model has loaded: start serving. Its GGUF name becomes one more accepted alias."""
        self._names.add(engine.model_name.lower())
        self.engine = engine

    def stats(self) -> EngineStats | None:
        return None if self.engine is None else self.engine.stats()

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise loading_error()
        return self.engine

    def check_model(self, requested: str | None) -> None:
        """A request may name the served model by its id or an alias (any case), or leave it out."""
        if requested is not None and requested.lower() not in self._names:
            raise ApiError(
                404,
                f"The model '{requested}' does not exist on this server; it serves '{self.model_id}'.",
                param="model",
                code="model_not_found",
            )

    async def parse(self, request: web.Request, model: type[Body]) -> Body:
        """Read and validate a JSON body (aiohttp raises 413 past the size limit) and check its model."""
        raw = without_bom(await read_body(request))
        try:
            # A large body takes milliseconds to parse: do it off the loop that streams to others.
            body = model.model_validate_json(raw) if len(raw) <= INLINE_PARSE_MAX_BYTES else await asyncio.to_thread(model.model_validate_json, raw)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        self.check_model(getattr(body, "model", None))
        return body


def without_bom(raw: bytes) -> bytes:
    """A body saved by an editor that opens UTF-8 with a byte order mark (Notepad, ``curl -d @file``):
    RFC 8259 lets a parser ignore it, and pydantic's refuses the first byte (the upstream front's
    ``json.loads`` reads it already)."""
    return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw


async def read_body(request: web.Request) -> bytes:
    """The whole body, as ``request.read()`` reads it (413 past ``client_max_size``), but giving up
    on a client that sends nothing for ``BODY_IDLE_SECONDS``."""
    limit = request.client_max_size
    body = bytearray()
    while True:
        try:
            chunk = await within(request.content.readany(), BODY_IDLE_SECONDS)
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"No part of the request body arrived for {BODY_IDLE_SECONDS:g} seconds.",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from None
        except ConnectionError:
            # Nobody will read this answer; the status is what /metrics counts (nginx's 499).
            raise ApiError(499, "The client closed the connection before sending the whole body.", code="client_closed_request") from None
        except web.RequestPayloadError as exc:  # a Content-Encoding (gzip, deflate) the body is not in
            raise ApiError(400, f"The request body cannot be read: {exc.__cause__ or exc}.", code="invalid_body", headers={"Connection": "close"}) from None
        if not chunk:
            return bytes(body)
        body.extend(chunk)
        if limit and len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(limit, len(body))


def loading_error() -> ApiError:
    return ApiError(
        503,
        "The model is still loading; retry shortly.",
        type="server_error",
        code="model_loading",
        headers={"Retry-After": LOADING_RETRY_AFTER_SECONDS},
        extra={"status": "loading"},
    )


def failed_error(reason: str) -> ApiError:
    """The engine cannot serve any more: health checks and requests get 503 with the reason."""
    return ApiError(
        503,
        f"The inference engine failed and this agent is restarting: {reason}",
        type="server_error",
        code="engine_failed",
        extra={"status": "error", "reason": reason},
    )


SERVER_STATE = web.AppKey("server_state", ServerState)
BUYER_LEFT: Any = web.RequestKey("buyer_left", bool) if hasattr(web, "RequestKey") else "vramsupply.buyer_left"  # an aiohttp without RequestKey
"""Set on a request whose buyer hung up during the last writes of its stream: the handler ends
normally, and /metrics counts it as 499 (client closed request), not 200."""
