"""Every failure leaves the server as OpenAI's error JSON, so SDK clients raise the right exception.

Handlers raise ``ApiError``; aiohttp's own ``HTTPException``s (unknown route, wrong method, body
too large) are converted by ``error_middleware``; anything unexpected becomes a logged 500 whose
body never contains a traceback.

Every response, errors included, names its request in ``x-request-id`` (the openai SDK shows it
as ``_request_id``), so a buyer can quote the failed request and the provider find it: the access
log writes it too. A client's own sane ``X-Request-Id`` (a trace id) is echoed instead; the
completion id (``chatcmpl-<hex>``) ends with the request's own hex either way, and where the
client's id is echoed the access log writes the completion id after it (``completion_beside``):
the line showed the client's id alone, so neither id led to the other, nor to the ledger's row.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from pydantic import ValidationError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces, bounded
_OWN_ID: Any = web.RequestKey("own_id", str) if hasattr(web, "RequestKey") else "vramsupply.own_id"  # an aiohttp without RequestKey
_COMPLETION_ID: Any = web.RequestKey("completion_id", str) if hasattr(web, "RequestKey") else "vramsupply.completion_id"


def own_id(request: web.Request) -> str:
    """The request's own id: 24 hex digits, made once per request."""
    found = request.get(_OWN_ID)
    if found is None:
        found = request[_OWN_ID] = secrets.token_hex(12)
    return found


def request_id(request: web.Request) -> str:
    """The client's ``X-Request-Id`` when it is a sane token, else ``req_`` and the own id."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _SANE_REQUEST_ID.fullmatch(given) else f"req_{own_id(request)}"


def completion_id(request: web.Request, prefix: str) -> str:
    """The id of the completion the request makes (``chatcmpl``/``cmpl``, a hyphen, the own id),
    as its body and the earnings ledger carry it; kept on the request for ``completion_beside``."""
    made = request[_COMPLETION_ID] = f"{prefix}-{own_id(request)}"
    return made


def completion_beside(request: web.BaseRequest) -> str | None:
    """The completion id the access log writes after ``x-request-id``: only where that is the
    client's own id (``req_<hex>`` already names the completion), and only for a request that
    made a completion."""
    made = request.get(_COMPLETION_ID)
    return made if made is not None and request_id(request) != f"req_{own_id(request)}" else None  # type: ignore[arg-type]


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed or not, error or not, before its headers go."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)


class ApiError(Exception):
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        return {
            **self.extra,
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code},
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def from_validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming the first offending field the way a client wrote it, e.g. ``messages[0].role``."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"We could not parse the JSON body of your request: {first['msg']}", code="invalid_json")
    param = param_path(first["loc"])
    if first["type"] == "model_type" and param is None:
        return ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    message = first["msg"].removeprefix("Value error, ")
    if param is None:
        return ApiError(400, message)
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return ApiError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def param_path(loc: tuple[int | str, ...]) -> str | None:
    """Render a pydantic error location as ``field[0].sub``; pydantic's ``[key]`` markers are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith("["):
            path += f".{part}" if path else part
    return path or None


def http_exception_error(request: web.Request, exc: web.HTTPException) -> ApiError:
    """The OpenAI-shaped equivalent of one of aiohttp's own HTTP errors."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
    if isinstance(exc, web.HTTPNotFound):
        message = f"Invalid URL ({request.method} {request.path})"
        if request.path.startswith("/v1/responses"):  # agent SDKs default to it (openai-agents, langchain's use_responses_api)
            message += ": this server serves OpenAI's Chat Completions API (/v1/chat/completions), not its Responses API"
        return ApiError(404, message, code="unknown_url")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return ApiError(
            405,
            f"Method {request.method} is not allowed for {request.path} (allowed: {allowed})",
            code="method_not_allowed",
            headers=headers,
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(
            413,
            f"The request body is too large: the limit is {request.client_max_size} bytes.",
            code="request_too_large",
        )
    error_type = INVALID_REQUEST if exc.status < 500 else "server_error"
    return ApiError(exc.status, exc.reason, type=error_type, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every exception into OpenAI error JSON; an unexpected one is logged, never shown."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_exception_error(request, exc).response()
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return internal_error().response()


def internal_error() -> ApiError:
    """What a buyer sees of a fault of ours: no detail (it is in the log, with its traceback)."""
    return ApiError(500, "The server had an internal error handling your request.", type="server_error")
