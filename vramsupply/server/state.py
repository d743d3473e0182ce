"""What every handler shares: the served model's names, the engine once it has loaded, metrics.

The app exists and answers before the engine does (``/health`` says 503 "loading"), so the engine
is attached later by the serve lifecycle with ``ServerState.attach``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from vramsupply.engine import Engine, EngineStats
from vramsupply.server.accounting import Accounts
from vramsupply.server.errors import ApiError, from_validation_error
from vramsupply.server.metrics import ServerMetrics

LOADING_RETRY_AFTER_SECONDS = "5"

Body = TypeVar("Body", bound=BaseModel)


class ServerState:
    def __init__(self, model_id: str, aliases: Iterable[str] = (), endpoint_token: str | None = None) -> None:
        self.model_id = model_id
        self.created = int(time.time())
        self.endpoint_token = endpoint_token or None
        self.engine: Engine | None = None
        self._names = {model_id.lower(), *(a.lower() for a in aliases)}
        self.metrics = ServerMetrics(self.stats)
        self.accounts = Accounts()

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
        raw = await request.read()
        try:
            body = model.model_validate_json(raw)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        self.check_model(getattr(body, "model", None))
        return body


def loading_error() -> ApiError:
    return ApiError(
        503,
        "The model is still loading; retry shortly.",
        type="server_error",
        code="model_loading",
        headers={"Retry-After": LOADING_RETRY_AFTER_SECONDS},
        extra={"status": "loading"},
    )


SERVER_STATE = web.AppKey("server_state", ServerState)
