"""The engine seam: what the serve lifecycle needs of whatever produces the tokens.

Two implementations:

- ``LlamaCppBackend`` (``--engine llama.cpp``, the default): our own engine in this process; the hub
  resolves and downloads the GGUF, the server answers with the engine's continuous batching.
- ``upstream.UpstreamBackend`` (``--engine upstream|vllm|sglang``): our front before another
  OpenAI-compatible server, one the provider runs or one we launch and supervise.

The lifecycle calls them in this order: ``prepare`` (before listening: the model's identity),
``create_app`` (the HTTP app, listening at once), ``start`` (until ready; False when a stop signal
came first), then ``stats`` and ``ready_line`` while serving, and ``close`` after the server drained.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Protocol

from aiohttp import web

from vramsupply.config import Settings
from vramsupply.engine import Engine, EngineOptions
from vramsupply.engine.model import LoadAbandoned, abandoned_when
from vramsupply.errors import ConfigError
from vramsupply.gpu.report import PlacementMonitor
from vramsupply.gpu.report import placement_of as gpu_placement_of
from vramsupply.hub.local import LocalModel
from vramsupply.platform.offer import ModelIdentity, OfferError
from vramsupply.serve.options import engine_options
from vramsupply.serve.status import ServingStats
from vramsupply.server import SERVER_STATE, create_app
from vramsupply.signals import in_daemon_thread
from vramsupply.timeouts import within

log = logging.getLogger("vramsupply.serve")

EXIT_WAIT_SECONDS = 10.0
"""How long the agent, stopping, waits for a decode step still running once its requests were ended
(``Engine.close`` frees llama.cpp's memory only after it). systemd's TimeoutStopSec gives 30 s past
the drain (``service.unit.STOP_MARGIN_SEC``) to this and to the settling after it (the platform's
drain notice, up to 3 s, and deregistration, up to 10 s; the tunnel's stop): a stop killed before it
deregistered leaves the instance listed."""


class Backend(Protocol):
    kind: str
    n_ctx: int
    slots: int

    async def prepare(self) -> ModelIdentity: ...
    def create_app(self, endpoint_token: str | None, max_body_bytes: int) -> web.Application: ...
    async def start(self, stopping: asyncio.Event) -> bool: ...
    def stats(self) -> ServingStats: ...
    def in_flight(self) -> int: ...
    def ready_line(self, url: str) -> str: ...
    async def close(self) -> None: ...


class LlamaCppBackend:
    """The GGUF served by our llama.cpp engine in this process."""

    kind = "llama.cpp"
    first_stop_while_starting = "abandoning the model load (a KV cache llama.cpp is already allocating is finished first); again to stop at once"
    """What a first stop signal does during ``start`` (``StopSignals.first_stop``): see ``load_engine``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: LocalModel | None = None
        self.engine: Engine | None = None
        self.app: web.Application | None = None
        self.placement: PlacementMonitor | None = None  # where the model runs, once loaded
        self._closed: asyncio.Future[None] | None = None  # the engine's one close, in its thread
        self.explicit: set[str] = set(settings.model_fields_set)  # what the user set, before the plan fills in the rest

    async def prepare(self) -> LocalModel:
        """Fit the plan to memory, download (a bar on a terminal, plain lines in logs), fit again."""
        self.settings = await fit_to_memory(self.settings, self.explicit)
        self.model = await resolve_model(self.settings)  # a stop signal need not wait for it (see lifecycle)
        self.settings = await fit_to_memory(self.settings, self.explicit, self.model)
        refuse_offer_beyond_context(self.settings, self.model)
        return self.model

    def create_app(self, endpoint_token: str | None, max_body_bytes: int) -> web.Application:
        assert self.model is not None
        self.app = create_app(self.model.model_id, aliases=model_aliases(self.model), endpoint_token=endpoint_token, max_body_bytes=max_body_bytes)
        return self.app

    async def start(self, stopping: asyncio.Event) -> bool:
        """Load in a worker thread, which a stop abandons where llama.cpp allows (``load_engine``), then attach."""
        assert self.model is not None and self.app is not None
        if stopping.is_set():
            return False
        log.info("loading %s from %s", self.model.model_id, self.model.path)
        try:
            self.engine = await load_engine(engine_options(self.settings, self.model, explicit=self.explicit), stopping)
        except LoadAbandoned:
            log.info("model load abandoned: a stop was requested")
            return False
        if stopping.is_set():
            return False
        self.app[SERVER_STATE].attach(self.engine)
        self.placement = PlacementMonitor(await asyncio.to_thread(gpu_placement_of, self.engine, self.settings.n_gpu_layers))
        self.app[SERVER_STATE].placement = self.placement
        return True

    @property
    def n_ctx(self) -> int:
        return 0 if self.engine is None else self.engine.n_ctx

    @property
    def slots(self) -> int:
        return self.settings.parallel if self.engine is None else self.engine.parallel

    def stats(self) -> ServingStats:
        assert self.engine is not None
        return self.engine.stats()

    def in_flight(self) -> int:
        if self.engine is None:
            return 0
        stats = self.engine.stats()
        return stats.slots_busy + stats.queue_depth

    def ready_line(self, url: str) -> str:
        assert self.model is not None
        return f"vramsupply ready: serving {self.model.model_id} at {url}/v1 ({self.slots} slots, {self.n_ctx}-token context)"

    def stop_generating(self) -> None:
        """The drain's deadline passed: end every generation (each stream gets an error event).

        ``Engine.close`` may wait for a decode step that runs on (up to ``CLOSE_WAIT_SECONDS``),
        so it runs in a thread of its own: meanwhile the event loop goes on writing the streams'
        error events, pinging systemd's watchdog and hearing a second signal."""
        if self.engine is not None and self._closed is None:
            self._closed = in_daemon_thread(self.engine.close)

    async def close(self) -> None:
        """The engine's close, finished (started here unless the drain started it). It waits for a
        step that runs on for up to ``EXIT_WAIT_SECONDS``; a "stop now" (this task cancelled: a
        second signal) not at all (``Engine.hurry``). Either way the requests were ended, and the
        hurried close is still awaited, lest the process exit while it frees llama.cpp's memory."""
        self.stop_generating()
        if self._closed is None or self.engine is None:
            return
        if stopping_now():
            self.engine.hurry()
        try:
            await within(asyncio.shield(self._closed), EXIT_WAIT_SECONDS)
        except asyncio.TimeoutError:
            log.warning("the engine's close still waits for a decode step after %gs; exiting without waiting more", EXIT_WAIT_SECONDS)
            self.engine.hurry()
            await asyncio.shield(self._closed)
        except asyncio.CancelledError:
            self.engine.hurry()
            await asyncio.shield(self._closed)
            raise


def stopping_now() -> bool:
    """This task was cancelled ("stop now", ``signals.StopSignals``) and is unwinding."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling is not None and cancelling())


def require_model(settings: Settings) -> None:
    """A GGUF to serve: without one, a missing setting (exit 2), said before anything else."""
    if not settings.model:
        raise ConfigError("no model to serve: pass --model ./file.gguf (or org/model) or set VRAM_SUPPLY_MODEL")


def resolve_model(settings: Settings) -> asyncio.Future[LocalModel]:
    """Download (unless cached) and verify, in a daemon thread: a "stop now" need not wait for it,
    and an interrupted download resumes on the next start.

    The hub shows download progress as a bar on a terminal and as plain lines in logs (journald).
    """
    require_model(settings)
    from vramsupply.hub.prepare import prepare_configured  # imports huggingface_hub only for Hub models

    return in_daemon_thread(prepare_configured, settings.model, settings, progress=True)


async def fit_to_memory(settings: Settings, explicit: set[str], model: LocalModel | None = None) -> Settings:
    """The memory plan (vramsupply.gpu): before download it picks the quant; before load it shrinks
    a context or slot count that was not set, or refuses with the numbers instead of an OOM."""
    from vramsupply.gpu.planning import fit_before_download, fit_before_load

    # In daemon threads, as the download: before download the plan asks the Hub, which may never
    # answer (up to download_timeout), and a stop must not wait for it, at exit least of all.
    if model is None:
        return await in_daemon_thread(fit_before_download, settings, explicit)
    return await in_daemon_thread(fit_before_load, settings, explicit, model.path)


def refuse_offer_beyond_context(settings: Settings, model: LocalModel) -> None:
    """Refuse a ``context_length_offered`` longer than the requests this model will be served
    with, before loading it (``OfferError``): found at registration, it came after minutes of
    loading a large model, and after "ready". The same rule as the engine's own
    (``trained_context``), on the context the memory plan chose and the GGUF's training context."""
    from vramsupply.engine.trained_context import served_context
    from vramsupply.gpu.source import local_source

    offered = settings.context_length_offered
    if offered is None or settings.no_register:
        return
    trained = local_source(str(model.path)).shape.n_ctx_train
    served = served_context(settings.context_length, settings.parallel, settings.kv_per_slot, trained).request_tokens
    if offered > served:
        trained_note = f", what {model.path.name} was trained on" if served < settings.context_length else ""
        raise OfferError(f"context_length_offered ({offered}) is larger than the context this agent will serve ({served}{trained_note})")


def model_aliases(model: LocalModel) -> list[str]:
    """Other names a request's ``model`` may use: the GGUF repo and file (the GGUF's own name is added on load)."""
    names = [model.path.name, model.path.stem]
    if model.repo_id:
        names.append(model.repo_id)
    return names


async def load_engine(options: EngineOptions, stopping: asyncio.Event | None = None) -> Engine:
    """Load in a daemon thread; once ``stopping`` is set, the load is abandoned where llama.cpp
    allows (``engine.model.abandoned_when``) and ends in ``LoadAbandoned``.

    While llama.cpp reads the weights, a graceful stop ends the load before the next tensor; once it
    sets up the context (allocating and clearing the KV cache, then the warm-up), the stop waits
    for that: the thread is then inside llama.cpp, and a process that exits under it risks
    crashing in llama.cpp's teardown (a GPU's above all). A second signal waits for nothing.
    """
    if stopping is None:
        return await in_daemon_thread(Engine.load, options)
    abandon = threading.Event()
    watch = asyncio.ensure_future(stopping.wait())
    watch.add_done_callback(lambda waited: None if waited.cancelled() else abandon.set())
    try:
        return await in_daemon_thread(load_unless_abandoned, options, abandon)
    finally:
        watch.cancel()


def load_unless_abandoned(options: EngineOptions, abandon: threading.Event) -> Engine:
    with abandoned_when(abandon):
        return Engine.load(options)
