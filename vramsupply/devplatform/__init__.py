"""A local, in-memory reference implementation of the vram.supply platform API.

It lets `vramsupply serve --demo`, `vramsupply devplatform` and the tests exercise the whole
marketplace loop (register, heartbeat, health checks, buyer routing, demand, rails) on one machine.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from vramsupply.config import api_key_problem
from vramsupply.devplatform.app import PlatformOptions, check_providers, create_app
from vramsupply.devplatform.store import Account, Provider, Store
from vramsupply.errors import ConfigError, ListenError
from vramsupply.listen import start_sites
from vramsupply.signals import StopSignals

__all__ = ["Account", "DevPlatform", "PlatformOptions", "Provider", "Store", "check_providers", "create_app", "serve_forever"]


class DevPlatform:
    """The reference platform on a localhost port, started and stopped from async code."""

    def __init__(self, *, api_key: str | None = None, options: PlatformOptions | None = None) -> None:
        """``api_key``: the one key it accepts (None: a generated one). Checked as `login` checks
        a key: one an agent could never be given (empty, with a space) is refused, not replaced."""
        problem = None if api_key is None else api_key_problem(api_key)
        if problem is not None:
            raise ConfigError(f"invalid --api-key {api_key!r}: {problem}")
        self.store = Store()
        self.account = self.store.add_account(api_key)
        self.app = create_app(self.store, options or PlatformOptions())
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def api_key(self) -> str:
        return self.account.api_key

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0: a free port) and return the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        try:
            await start_sites(self._runner, host, port)  # one port for all of the host's addresses
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{_url_host(bound_host)}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DevPlatform:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve_forever(platform: DevPlatform, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Run ``platform`` until SIGINT/SIGTERM, announcing where it listens and its API key.

    The signal handlers are in place before the port opens, so a stop at any moment (even while
    starting) ends in the same clean shutdown; a second signal cancels that shutdown.
    """
    with StopSignals() as stop:
        try:
            try:
                url = await platform.start(host, port)
            except OSError as exc:
                raise ListenError(host, port, exc) from None
            announce(url)
            await stop.event.wait()
        finally:
            await platform.stop()
