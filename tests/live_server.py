"""A real vramsupply HTTP server on a free localhost port, running in a thread with its own event loop,
so that synchronous clients (the openai SDK's ``OpenAI``) and async tests can both talk to it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions
from vramsupply.server import ApiServer, ServerState, create_app
from vramsupply.server.accounting import FinishedRequest

T = TypeVar("T")
MODEL_ID = "stories260k"


class RecordingLedger:
    """A test double of the earnings ledger: it keeps every finished request's row in memory."""

    def __init__(self) -> None:
        self.rows: list[FinishedRequest] = []
        self.failure = None

    async def record(self, finished: FinishedRequest) -> None:
        self.rows.append(finished)


@contextmanager
def recording_server(**options: Any) -> Iterator[LiveServer]:
    """A live server on the tiny model (also named by its file name) whose ledger rows the test
    reads (``state.accounts.recorder.rows``)."""
    with LiveServer(aliases=[TINY_MODEL.name], **options) as live:
        live.state.accounts.recorder = RecordingLedger()
        yield live


class LiveServer:
    """``create_app`` + ``ApiServer`` on 127.0.0.1:<free port>; the tiny model loaded unless ``load=False``."""

    def __init__(self, *, load: bool = True, drain_timeout: float = 5.0, **app_options: Any) -> None:
        self.engine_options = EngineOptions(
            model_path=app_options.pop("model_path", TINY_MODEL),
            n_ctx=app_options.pop("n_ctx", 2048),
            parallel=app_options.pop("parallel", 4),
            max_queue=app_options.pop("max_queue", 64),
            # One decode thread by default (see conftest.isolated_env): it keeps a shared machine from stalling it.
            threads=app_options.pop("threads", 1),
            stall_timeout=app_options.pop("stall_timeout", 600.0),
            draft_max=app_options.pop("draft_max", None),
        )
        self._load = load
        self._drain_timeout = drain_timeout
        self._app_options = app_options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-server", daemon=True)
        self.engine: Engine | None = None
        self.server: ApiServer | None = None

    def __enter__(self) -> LiveServer:
        self._thread.start()
        self.call(self._start)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.call(self._stop)
        self._shut_down_loop()

    async def __aenter__(self) -> LiveServer:
        """From an async test, so the test's own loop keeps running (and closing its sockets) meanwhile."""
        self._thread.start()
        await self.acall(self._start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.acall(self._stop)
        self._shut_down_loop()

    def _shut_down_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return self.url + "/v1"

    @property
    def state(self) -> ServerState:
        assert self.server is not None
        return self.server.state

    def call(self, function: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(function(), self._loop)
        return future.result(timeout=60)

    async def acall(self, function: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``call`` for async tests: awaits without blocking the caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(function(), self._loop))

    def load_engine(self) -> None:
        """Load the model and attach it, as ``vramsupply serve`` does once loading finishes."""
        self.call(self._attach_engine)

    async def _attach_engine(self) -> None:
        self.engine = await asyncio.to_thread(Engine.load, self.engine_options)
        self.state.attach(self.engine)

    async def _start(self) -> None:
        self.server = ApiServer(create_app(MODEL_ID, **self._app_options), "127.0.0.1", 0, drain_timeout=self._drain_timeout)
        await self.server.start()
        if self._load:
            await self._attach_engine()

    async def _stop(self) -> None:
        assert self.server is not None
        await self.server.stop()
        if self.engine is not None:
            self.engine.close()


def chat_server(chat_models: dict[str, Path], family: str) -> Iterator[LiveServer]:
    """A module fixture's server for one of ``conftest.chat_models``' test models (``yield from``)."""
    with LiveServer(model_path=chat_models[family], n_ctx=2048, threads=1) as live:
        yield live


def sdk(server: LiveServer) -> Any:
    """The official openai SDK against ``server``, retrying nothing: a test sees every answer."""
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
