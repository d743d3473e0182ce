"""The reference platform on a localhost port, in a thread with its own event loop, so that both
async tests and the real CLI in a subprocess (which blocks the test's loop) can talk to it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ports import free_port
from vramsupply.devplatform import DevPlatform, PlatformOptions, Provider, check_providers

API_KEY = "sk-test-0123456789abcdef"


class LivePlatform:
    """``DevPlatform`` on 127.0.0.1:``port`` (a free one by default) with the fixed test API key."""

    def __init__(self, port: int | None = None, *, api_key: str = API_KEY, **options: Any) -> None:
        self.port = port or free_port()
        self.platform = DevPlatform(api_key=api_key, options=PlatformOptions(**options))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-platform", daemon=True)

    def __enter__(self) -> LivePlatform:
        self._thread.start()
        self._run(self.platform.start("127.0.0.1", self.port))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._run(self.platform.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        return self.platform.api_key

    @property
    def providers(self) -> list[Provider]:
        return list(self.platform.store.providers.values())

    def check_health_now(self) -> None:
        self._run(check_providers(self.platform.app))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)
