"""What both sides of the reference platform share: the app's keys and its JSON error and body shapes.

The provider endpoints (``app``) and the buyer relay (``relay``) answer errors in one OpenAI-style
shape and read bodies the same way; keeping that here lets ``relay`` stay free of ``app``.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from vramsupply.devplatform.store import Store
from vramsupply.platform import api

STORE = web.AppKey("store", Store)
HTTP = web.AppKey("http", aiohttp.ClientSession)


def error_response(status: int, message: str, type_: str, code: str | None = None, fields: list[api.FieldError] | None = None) -> web.Response:
    return web.json_response(api.error_body(message, type_=type_, code=code, fields=fields), status=status)


async def json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "request body must be JSON", "invalid_request_error", "invalid_json")
    if not isinstance(body, dict):
        return error_response(400, "request body must be a JSON object", "invalid_request_error", "invalid_json")
    return body
