"""The HTTP access log's line, written here rather than from an aiohttp format string.

Why our own: a buyer who sends its own ``X-Request-Id`` gets it echoed in ``x-request-id``, and the
line named the request by that alone, while the completion's ``id`` (``chatcmpl-<hex>``, in the
body the buyer reads and in the earnings ledger's row) ends with a hex of its own: neither id led
to the other. aiohttp's format has no field for a value of ours, so the line is ours; it names
the completion after the buyer's id (``errors.completion_beside``), where ``req_<hex>`` does not.

The line is what aiohttp's ``%a "%r" %s %b %Tfs %{x-request-id}o`` wrote, with the same record
attributes (``logging.QuietProbes`` reads ``first_request_line`` and ``response_status``)::

    127.0.0.1 "POST /v1/chat/completions HTTP/1.1" 200 812 0.412345s trace-42 chatcmpl-9f…

A request whose connection the server closed because its client read nothing (``stalled.py``) gets
this line too, as a WARNING with the reason in place of "the buyer hung up": one line, not a
warning of the closing and an access line that blamed the buyer's hang-up.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from vramsupply.server.errors import REQUEST_ID_HEADER, completion_beside

ACCESS_LOG = web.AppKey("access_log", logging.Logger)
"""The access logger the server runs with, if any: who writes the lines aiohttp does not."""


class AccessLine(AbstractAccessLogger):
    """The runner's ``access_log_class``: one line per answered request (the ``log_format``
    aiohttp passes along is not read: the line above is the only one)."""

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        try:
            write_access_line(self.logger, request, response.status, response.body_length, time, response.headers.get(REQUEST_ID_HEADER, "-"))
        except Exception:  # a log line never fails a request
            self.logger.exception("cannot write the access line of a request")


def write_access_line(
    logger: logging.Logger, request: web.BaseRequest, status: int, size: int | str, seconds: float, echoed: str, note: str = "",
    level: int = logging.INFO,
) -> None:
    """``echoed``: the ``x-request-id`` the response carried; ``note`` follows the ids
    (`` (the buyer hung up)``, for a line aiohttp does not write)."""
    remote = request.remote or "-"
    first = f"{request.method} {request.path_qs} HTTP/{request.version.major}.{request.version.minor}"
    completion = completion_beside(request)
    extra: dict[str, object] = {
        "remote_address": remote, "first_request_line": first, "response_status": status, "response_size": size,
        "request_time_frac": f"{seconds:.6f}", "response_header": {REQUEST_ID_HEADER: echoed},
    }  # fmt: skip
    if completion is not None:
        extra["completion_id"] = completion
    ids = echoed if completion is None else f"{echoed} {completion}"
    logger.log(level, '%s "%s" %s %s %.6fs %s%s', remote, first, status, size, seconds, ids, note, extra=extra)
