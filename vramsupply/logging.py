"""Logging for a process that may run for weeks under systemd.

One line per event (journald stores each line as its own entry, so a traceback is folded onto its
event's line), colour only on a terminal, and a filter that masks every registered secret, so an
API key or endpoint token that ends up in a message, argument or exception never reaches a log
(a secret too short to mask inside other words, only where it stands alone: ``MIN_SUBSTRING_SECRET``).

On a terminal, rich lays each line out as columns: the time and level (29 columns), then the
message, its further lines indented under it. A terminal too narrow for that and a useful message
(``MIN_MESSAGE_COLUMNS``) gets each event as plain lines across the whole width instead: in 40
columns, rich's layout left the message 11 columns.

The HTTP access log (``vramsupply.access``, off on a terminal) writes one line per request. The
platform's health checks and a Prometheus scrape every 15 s made about 7,000 lines a day of
``/health`` and ``/metrics`` under systemd, burying the buyers' lines: ``QuietProbes`` logs those
that succeed (2xx) at DEBUG; their failures and every other line (``/v1``) stay at INFO. A
client's malformed HTTP, which aiohttp logs as an ERROR with a traceback, is one WARNING line
(``BadClientHttp``).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import SecretStr
from rich.console import Console, ConsoleRenderable
from rich.logging import RichHandler
from rich.text import Text

from vramsupply.display import console_width

MASK = "****"
# A secret this long is masked wherever it appears, inside other text too. A shorter one (an API
# key of one letter, say) is masked only where it stands alone: replacing every "k" in every line
# would garble the logs ("un****nown") and show where the key's letters occur.
MIN_SUBSTRING_SECRET = 8
_TOKEN_CHARS = r"A-Za-z0-9_\-"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MIN_MESSAGE_COLUMNS = 40
"""The narrowest message column worth rich's aligned layout; a narrower terminal gets plain lines."""
TIME_FORMAT = "[%x %X]"


def interactive() -> bool:
    """Colour and progress bars only for a person at a terminal, never for journald or a pipe."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class SecretMaskFilter(logging.Filter):
    """Replaces secret values in the rendered message, exception text and stack with ``****``."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()
        self._short: tuple[re.Pattern[str], ...] = ()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        if not secret:
            return
        with self._lock:
            # Longest first, so a secret that contains another is masked whole.
            self._secrets = tuple(sorted({*self._secrets, secret}, key=len, reverse=True))
            self._short = tuple(_whole_token(s) for s in self._secrets if len(s) < MIN_SUBSTRING_SECRET)

    def mask(self, text: str) -> str:
        for secret in self._secrets:
            if len(secret) >= MIN_SUBSTRING_SECRET:
                text = text.replace(secret, MASK)
        for pattern in self._short:
            text = pattern.sub(MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = f"{record.msg} {record.args}"  # a malformed call still gets logged, masked
        record.msg = self.mask(message)
        record.args = None
        if record.exc_info:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        return True


def _whole_token(secret: str) -> re.Pattern[str]:
    """``secret`` where no letter, digit, ``-`` or ``_`` touches it on either side."""
    return re.compile(rf"(?<![{_TOKEN_CHARS}]){re.escape(secret)}(?![{_TOKEN_CHARS}])")


class OneLineFormatter(logging.Formatter):
    """Folds multi-line messages and tracebacks onto one line, joined by `` | ``."""

    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(line for line in super().format(record).splitlines() if line.strip())


class TerminalHandler(RichHandler):
    """rich's handler, but in a narrow terminal without the columns (see the module docstring);
    the width is read at each event, so a resized terminal gets the layout it has room for."""

    def __init__(self, **options: Any) -> None:
        super().__init__(log_time_format=TIME_FORMAT, **options)
        self.prefix_columns = len(datetime.now().strftime(TIME_FORMAT)) + 1 + 8 + 1  # time, level, spaces

    def render(self, *, record: logging.LogRecord, traceback: Any, message_renderable: ConsoleRenderable) -> ConsoleRenderable:
        if self.console.width >= self.prefix_columns + MIN_MESSAGE_COLUMNS:
            return super().render(record=record, traceback=traceback, message_renderable=message_renderable)
        when = datetime.fromtimestamp(record.created).strftime(TIME_FORMAT)
        line = Text.assemble((when, "log.time"), " ", self.get_level_text(record).copy(), " ")
        line.rstrip()
        line.append(" ")
        line.append_text(message_renderable if isinstance(message_renderable, Text) else Text(str(message_renderable)))
        line.overflow = "fold"
        return line


class QuietProbes(logging.Filter):
    """On the access logger: a successful (2xx) ``/health`` or ``/metrics`` line becomes a DEBUG line,
    dropped unless the logger is at DEBUG (a logger's filter runs after its INFO check). aiohttp's
    access logger passes the request line and status as record attributes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _probe_answered(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _probe_answered(record: logging.LogRecord) -> bool:
    parts = str(getattr(record, "first_request_line", "")).split(" ")
    status = getattr(record, "response_status", None)
    if len(parts) < 2 or not isinstance(status, int):
        return False
    return parts[1].partition("?")[0] in PROBE_PATHS and 200 <= status < 300


class BadClientHttp(logging.Filter):
    """On aiohttp's server logger: a client's malformed HTTP (a URL over 8,190 bytes, a body
    encoding it cannot decode such as ``br``, chunked with a Content-Length) is logged by aiohttp
    as an ERROR with a traceback, as if the agent had failed, though it answers 400 and carries on.
    Anyone on the internet can send it through a tunnel, so it becomes one WARNING line. The
    exception is told by its class's name, so logging need not import aiohttp."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _client_http_error(exc):
            return True
        said = " ".join(str(getattr(exc, "message", "") or exc).split())
        record.msg, record.args = f"{record.getMessage()}: malformed HTTP, answered {exc.code}: {said}", None  # type: ignore[attr-defined]
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def _client_http_error(exc: BaseException) -> bool:
    code = getattr(exc, "code", None)
    parsing = any(cls.__name__ == "HttpProcessingError" for cls in type(exc).__mro__)
    return parsing and isinstance(code, int) and 400 <= code < 500


AIOHTTP_SERVER_LOGGER = "aiohttp.server"
ACCESS_LOGGER = "vramsupply.access"
PROBE_PATHS = frozenset({"/health", "/metrics"})
"""Asked every few seconds by machines (health checks, scrapes), not by buyers."""
quiet_probes = QuietProbes()
bad_client_http = BadClientHttp()
secret_filter = SecretMaskFilter()


def register_secret(secret: str | SecretStr | None) -> None:
    """Mask this value in every log line from now on (e.g. a generated endpoint token)."""
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if secret:
        secret_filter.add(secret)


def configure_logging(level: str, secrets: Iterable[str | SecretStr | None] = ()) -> None:
    """Install the agent's single log handler on the root logger (stderr), replacing any earlier one."""
    for secret in secrets:
        register_secret(secret)
    handler: logging.Handler
    if interactive():
        handler = TerminalHandler(console=Console(stderr=True, width=console_width(sys.stderr)), show_path=False, rich_tracebacks=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter(PLAIN_FORMAT))
    handler.addFilter(secret_filter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if secret_filter in h.filters]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    access = logging.getLogger(ACCESS_LOGGER)
    if quiet_probes not in access.filters:
        access.addFilter(quiet_probes)
    server = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    if bad_client_http not in server.filters:
        server.addFilter(bad_client_http)
