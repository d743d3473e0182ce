"""Requests aiohttp cannot parse, answered as OpenAI error JSON like every other error of the API.

A URL or header over 8,190 bytes, a body in an encoding aiohttp cannot decode (``br`` without
Brotli installed), or chunked encoding together with a Content-Length fails in aiohttp's parser,
before any route or middleware runs (``errors.error_middleware`` never sees it). aiohttp then
answers with a text/plain body of its own, "Can not decode content-encoding: brotli (br). Please
install `Brotli`": advice for the server's owner, shown to a buyer whose SDK expects
``{"error": …}``. Only the connection's handler sees these, so ``OpenAIErrorRunner`` gives every
connection one whose ``handle_error`` answers in OpenAI's shape (aiohttp still logs each, which
``logging.BadClientHttp`` keeps to one WARNING line). Each is counted as the middlewares count
every other answer (``vramsupply_requests_total``, route ``unmatched``), through ``counted``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from vramsupply.server.errors import REQUEST_ID_HEADER, ApiError, request_id


def framing_error(status: int, exc: BaseException | None, message: str | None) -> ApiError:
    """What a buyer is told for a request that could not be parsed (or an error aiohttp met itself)."""
    if status >= 500:
        return ApiError(status, "The server had an error while processing your request.", type="server_error")
    if isinstance(exc, ContentEncodingError):
        return ApiError(status, "The request body's Content-Encoding cannot be read here: send the body as gzip, deflate or uncompressed.", code="invalid_body")
    if isinstance(exc, LineTooLong):
        return ApiError(status, "The request line or a header is too long: each may be at most 8,190 bytes.", code="invalid_http")
    said = " ".join((message or str(exc or "")).split())
    return ApiError(status, f"The request is not valid HTTP: {said}", code="invalid_http")


class _OpenAIErrorHandler(RequestHandler):
    counted: Callable[[int], None] | None = None

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it, and refuses once a response has begun
        if self.counted is not None:
            self.counted(status)
        response = framing_error(status, exc, message).response()
        response.headers[REQUEST_ID_HEADER] = request_id(request)  # type: ignore[arg-type]  # (a BaseRequest: no route)
        response.force_close()
        return response


class _OpenAIErrorServer(web.Server):
    counted: Callable[[int], None] | None = None

    def __call__(self) -> RequestHandler:
        handler = _OpenAIErrorHandler(self, loop=self._loop, **self._kwargs)
        handler.counted = self.counted
        return handler


class OpenAIErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer what aiohttp's parser refuses as OpenAI errors;
    ``counted(status)`` is told of each."""

    def __init__(self, app: web.Application, *, counted: Callable[[int], None] | None = None, **kwargs: object) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self._counted = counted

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        # The server aiohttp's Application makes, with the same handler and arguments: only the
        # class of each connection's handler differs. An aiohttp whose server keeps them otherwise
        # serves as it is, with its own text errors for these requests, rather than not at all.
        try:
            handler, factory, cancellation, kwargs = made.request_handler, made.request_factory, made.handler_cancellation, made._kwargs
        except AttributeError:
            return made
        server = _OpenAIErrorServer(handler, request_factory=factory, handler_cancellation=cancellation, loop=asyncio.get_running_loop(), **kwargs)
        server.counted = self._counted
        return server
