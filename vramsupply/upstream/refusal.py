"""What a buyer gets when the upstream answers anything but 200.

The upstream's status is the upstream's story, not the buyer's: its 401 means our key to it is
wrong, its 404 a wrong path or model name in our configuration, its 500 its own crash. So only
the statuses that judge the buyer's own request pass through, in OpenAI's shape:

- 400, 413, 422 (a prompt past the context, a bad field): same status, the upstream's message
  (its first line, cut short); a prompt past the context gets OpenAI's code for it, whichever
  engine's words said so;
- 429 (the upstream's queue is full): 429 ``queue_full`` with ``Retry-After``, as our own engine
  answers when it is at capacity; 503 (starting, overloaded): 503 ``upstream_unavailable``;
- anything else (other 4xx, 5xx, a redirect, 201, 204, 304, 599...): 502 ``upstream_error`` that
  names only the status. The upstream's body, which may hold a traceback or internal paths, goes
  to the provider's log, escaped and cut short, never to the buyer.

Only ``RelayLimits.max_error_bytes`` of the body are read.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import aiohttp

from vramsupply.server.errors import ApiError
from vramsupply.upstream.client import escape_controls
from vramsupply.upstream.limits import Deadline, read_head

log = logging.getLogger("vramsupply.upstream")

BUYERS_FAULT = {400, 413, 422}
CONTEXT_OVERFLOW = re.compile(
    r"exceeds? the available context size"  # llama-server
    r"|maximum context length"  # vLLM (OpenAI's own words)
    r"|longer than the model's context length"  # SGLang
    r"|exceed context window",  # llama_cpp.server
    re.IGNORECASE,
)
"""An engine's words for a prompt past the context: the buyer gets OpenAI's code for it,
``context_length_exceeded``, which clients that shorten and retry look for."""
MESSAGE_CHARS = 300
RETRY_AFTER_DEFAULT = "5"


async def refusal(reply: aiohttp.ClientResponse, path: str, max_bytes: int, deadline: Deadline) -> ApiError:
    """The buyer's error for the upstream's non-200 ``reply`` (see the module docstring)."""
    raw = await read_head(reply.content, max_bytes, deadline)
    status = reply.status
    if status in BUYERS_FAULT:
        return rejected(status, raw)
    if status == 429:
        return ApiError(429, "The model server is at capacity; retry shortly.", type="rate_limit_error", code="queue_full", headers=retry_after(reply))
    if status == 503:
        return ApiError(503, "The model server is temporarily unavailable; retry shortly.", type="server_error", code="upstream_unavailable", headers=retry_after(reply))
    log.warning("the upstream answered %s with HTTP %d: %s", path, status, printable(raw.decode("utf-8", "replace"), 200) or "(no body)")
    if status in (401, 403):
        log.warning("the upstream refuses our credentials: check --upstream-api-key (VRAM_SUPPLY_UPSTREAM_API_KEY)")
    return ApiError(502, f"The model server behind this endpoint failed (it answered HTTP {status}).", type="server_error", code="upstream_error")


def rejected(status: int, raw: bytes) -> ApiError:
    """The buyer's own request refused by the upstream: its message, in OpenAI's shape."""
    try:
        payload: Any = json.loads(raw)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    fields = error if isinstance(error, dict) else payload if isinstance(payload, dict) else {}
    message = fields.get("message") if isinstance(fields.get("message"), str) else None
    if message is None and isinstance(fields.get("detail"), (str, list)):
        message = fields["detail"] if isinstance(fields["detail"], str) else json.dumps(fields["detail"])
    if message is None:
        message = raw.decode("utf-8", "replace") if payload is None else ""
    summary = printable(message, MESSAGE_CHARS) or f"HTTP {status}"
    param = fields.get("param") if isinstance(fields.get("param"), str) else None
    code = fields.get("code") if isinstance(fields.get("code"), str) else None
    if code is None and (fields.get("type") == "exceed_context_size_error" or CONTEXT_OVERFLOW.search(message)):
        code = "context_length_exceeded"  # as our engine and OpenAI say it, whichever engine said it in words
    return ApiError(status, f"The model server refused the request: {summary}", param=param and param[:100], code=code and code[:100])


def retry_after(reply: aiohttp.ClientResponse) -> dict[str, str]:
    value = reply.headers.get("Retry-After", "")
    return {"Retry-After": value if value.isdigit() and int(value) <= 600 else RETRY_AFTER_DEFAULT}


def printable(text: str, limit: int) -> str:
    """The first line of ``text``, control characters escaped, at most ``limit`` characters."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return escape_controls(first)[:limit]
