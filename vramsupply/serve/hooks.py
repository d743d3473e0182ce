"""Extensions the CLI plugs into `vramsupply serve` without serve importing them.

``--demo`` is one: it runs the reference platform around serving and buys one answer once the
agent is ready. The CLI builds the hook (``devplatform.demo.DemoHook``) and passes it to
``run_serve``; the serve lifecycle only knows this protocol, so it never depends on devplatform.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from vramsupply.config import Settings
from vramsupply.platform import MarketplaceSession


class ServeHook(Protocol):
    local_endpoint_ok: bool
    """True when the hook registers a loopback endpoint on purpose (no "unreachable" warning)."""

    def around(self, settings: Settings) -> AbstractAsyncContextManager[Settings]:
        """Run around the whole serve; yield the settings serve should use."""
        ...

    async def on_ready(self, market: MarketplaceSession, model_id: str, stopping: asyncio.Event) -> None:
        """The server answers and registration has started; errors raised here stop serving.

        Serving waits for this, so once ``stopping`` is set it must end as soon as what is in
        flight has finished, and say nothing that is no longer true ("still serving")."""
        ...
