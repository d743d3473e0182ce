"""Upstream-backed engines behind our front: a server the provider runs, or vLLM/SGLang we launch.

``UpstreamBackend`` is the other side of the serve lifecycle's engine seam (the llama.cpp engine is
the first): ``prepare`` settles the model's names, ``create_app`` builds the front, ``start``
connects (``upstream``) or launches and supervises (``vllm``, ``sglang``) until the upstream is
ready, then learns its context; ``stop_generating`` ends, at the drain's deadline, what is still
forwarded; ``close`` stops watching and stops a launched engine.

The watch (``UpstreamMonitor`` or ``Supervisor``) runs as a task for as long as we serve. Should
it ever end with an error, serving cannot go on honestly: the error is logged with its traceback,
``/health`` answers 503, and the failure reaches the serve lifecycle (``EngineStats.failure``),
which stops and exits 1 naming it, so the service manager restarts the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from dataclasses import dataclass

from aiohttp import web

from vramsupply.engine import EngineStats
from vramsupply.errors import VramsupplyError
from vramsupply.hub.local import model_id_of
from vramsupply.logging import register_secret
from vramsupply.upstream.client import DiscoveredModel, UpstreamClient, UpstreamUnavailable, listed_as
from vramsupply.upstream.front import FrontState, create_front_app
from vramsupply.upstream.launch import LaunchError, LaunchOptions, command_line
from vramsupply.upstream.monitor import UpstreamMonitor, set_ready
from vramsupply.upstream.options import UpstreamOptions
from vramsupply.upstream.supervisor import Supervisor

log = logging.getLogger("vramsupply.upstream")

KILLED_WAIT_SECONDS = 5.0
"""How long a second stop signal waits for a launched engine it has SIGKILLed to be reaped."""


class UpstreamError(VramsupplyError):
    """The upstream engine cannot be used as configured; the message says what to change."""


@dataclass(frozen=True)
class UpstreamModel:
    """The served model as the marketplace sees it (``platform.offer.ModelIdentity``): no GGUF fields."""

    model_id: str
    repo_id: str | None = None
    filename: str | None = None
    sha256: str | None = None
    quant: str | None = None


class UpstreamBackend:
    def __init__(self, options: UpstreamOptions) -> None:
        self.options = options
        self.kind = options.engine
        self.client: UpstreamClient | None = None
        self.state: FrontState | None = None
        self.model: UpstreamModel | None = None
        self.upstream_model = ""
        self.argv: list[str] = []
        self.supervisor: Supervisor | None = None
        self.n_ctx = 0
        self.slots = options.slots
        self._task: asyncio.Task[None] | None = None

    async def prepare(self) -> UpstreamModel:
        """Settle the names before listening: discovered from a running upstream, or given to a launched one."""
        if self.kind == "upstream":
            self.model = await self._connect()
        else:
            self.model = self._plan_launch()
        return self.model

    async def _connect(self) -> UpstreamModel:
        o = self.options
        if not o.url:
            raise UpstreamError("--engine upstream needs the server's URL: pass --upstream-url (e.g. http://127.0.0.1:11434/v1) or set VRAM_SUPPLY_UPSTREAM_URL")
        self.client = UpstreamClient(o.url, o.api_key)
        try:
            self.upstream_model = await self._check_name(self.client, o.upstream_model) if o.upstream_model else await self._discover_name(self.client)
        except UpstreamError:
            await self.client.close()
            raise
        return UpstreamModel(model_id_of(o.model or self.upstream_model))

    async def _discover_name(self, client: UpstreamClient) -> str:
        try:
            models = await client.models()
        except UpstreamUnavailable as exc:
            if "answered 401" in str(exc) or "answered 403" in str(exc):
                raise UpstreamError(f"the upstream refuses our credentials ({exc}): pass its key with --upstream-api-key") from None
            raise UpstreamError(f"cannot ask the upstream which model it serves ({exc}); start it, or pass --upstream-model") from None
        return pick_model(models, self.options.model)

    async def _check_name(self, client: UpstreamClient, wanted: str) -> str:
        """``--upstream-model`` as the upstream spells it; refused when the upstream lists others.
        An upstream that does not answer yet is waited for (the monitor checks the name then)."""
        try:
            names = [m.name for m in await client.models()]
        except UpstreamUnavailable:
            return wanted
        name = listed_as(wanted, names)
        if name is None:
            listed = ", ".join(names)[:300] or "none"
            raise UpstreamError(f"the upstream does not serve {wanted}: --upstream-model must be one of the models it lists ({listed})")
        return name

    def _plan_launch(self) -> UpstreamModel:
        o = self.options
        weights = o.upstream_model or o.model
        if not weights:
            raise UpstreamError(f"--engine {self.kind} needs the weights to load: pass --model org/model (a safetensors, AWQ or FP8 repo)")
        if weights.lower().endswith(".gguf"):
            raise UpstreamError(f"--engine {self.kind} loads a weights repo (safetensors, AWQ or FP8), not a GGUF file: pass --model org/model")
        model = UpstreamModel(model_id_of(o.model or weights), repo_id=weights)
        api_key = "vsk-" + secrets.token_urlsafe(24)
        register_secret(api_key)
        port = free_port()
        self.upstream_model = model.model_id
        launch = LaunchOptions(
            engine=self.kind,  # type: ignore[arg-type]
            model=weights,
            served_name=model.model_id,
            port=port,
            api_key=api_key,
            tensor_parallel=o.tensor_parallel,
            pipeline_parallel=o.pipeline_parallel,
            max_model_len=o.context_length,
            max_running=o.slots if o.slots_explicit else None,
            nnodes=o.nnodes,
            node_rank=o.node_rank,
            dist_init_addr=o.dist_init_addr,
            command=o.command,
            extra_args=o.extra_args,
        )
        try:
            self.argv = command_line(launch)
        except LaunchError as exc:
            raise UpstreamError(str(exc)) from None
        self.client = UpstreamClient(f"http://127.0.0.1:{port}", api_key)
        return model

    def create_app(self, endpoint_token: str | None, max_body_bytes: int) -> web.Application:
        assert self.client is not None and self.model is not None
        aliases = [self.options.model] if self.options.model else []
        self.state = FrontState(
            self.model.model_id, self.client, self.upstream_model, slots_total=self.slots, aliases=aliases, endpoint_token=endpoint_token
        )
        return create_front_app(self.state, max_body_bytes=max_body_bytes)

    async def start(self, stopping: asyncio.Event) -> bool:
        """Until the upstream is ready (False if a stop came first); then learn its context."""
        assert self.state is not None
        if self.kind == "upstream":
            monitor = UpstreamMonitor(self.state, interval=self.options.check_interval, stall_after=self.options.stall_after)
            ready = monitor.ready
            self._task = asyncio.create_task(monitor.run(), name="upstream-monitor")
        else:
            self.supervisor = Supervisor(
                self.state,
                self.kind,
                self.argv,
                ready_timeout=self.options.start_timeout,
                stop_timeout=self.options.stop_timeout,
                check_interval=self.options.check_interval,
                stall_after=self.options.stall_after,
            )
            ready = self.supervisor.ready
            self._task = asyncio.create_task(self.supervisor.run(), name=f"{self.kind}-supervisor")
        if not await first_of(ready, stopping, self._task):
            return False
        self._task.add_done_callback(self._watch_ended)
        self.n_ctx = await self._context()
        declared = self.kind == "upstream" and self.options.context_length is not None
        self.state.n_ctx = 0 if declared else self.n_ctx  # bounds usage only where the engine enforces it
        self.state.max_model_len = self.n_ctx
        return True

    def _watch_ended(self, task: asyncio.Task[None]) -> None:
        """The monitor or supervisor ended while serving: a failure (see the module docstring)."""
        if task.cancelled() or self.state is None:
            return
        exc = task.exception()
        reason = f"watching the {self.kind} engine failed ({type(exc).__name__}: {exc})" if exc is not None else f"watching the {self.kind} engine stopped"
        log.error("%s", reason, exc_info=exc)
        self.state.failure = reason
        set_ready(self.state, reason)

    async def _context(self) -> int:
        """The served context: configured, else what the upstream states (vLLM, SGLang, llama-server).
        llama-server's slot count is read first, whatever says the context: heartbeats report it."""
        assert self.client is not None
        n_ctx, total_slots = await self.client.props()
        if self.state is not None:
            self.state.one_choice_usage = n_ctx is not None or total_slots is not None
        if total_slots and not self.options.slots_explicit and self.state is not None:
            self.slots = self.state.slots_total = total_slots
        if self.options.context_length is not None and self.kind == "upstream":
            return self.options.context_length
        with contextlib.suppress(UpstreamUnavailable):
            for card in await self.client.models():
                if card.name == self.upstream_model and card.context_length:
                    return card.context_length
        if n_ctx:
            return n_ctx
        if self.options.context_length is not None:
            return self.options.context_length
        raise UpstreamError(f"the upstream does not say its context length: pass --context-length (the context {self.upstream_model} is served with)")

    def stats(self) -> EngineStats:
        assert self.state is not None
        return self.state.snapshot()

    def in_flight(self) -> int:
        return 0 if self.state is None else self.state.counters.in_flight

    def stop_generating(self) -> None:
        """The drain's deadline (or a second stop signal): end what the upstream has not finished, as
        our llama.cpp engine ends its generations (``front.FrontState.stop_generating``)."""
        if self.state is None:
            return
        ended = self.state.stop_generating()
        if ended:
            log.info("stopping: ending %d forwarded request(s) the upstream has not finished", ended)

    def ready_line(self, url: str) -> str:
        assert self.model is not None and self.client is not None
        return (
            f"vramsupply ready: serving {self.model.model_id} at {url}/v1 through {self.kind} at {self.client.base_url} "
            f"({self.slots} slots, {self.n_ctx}-token context)"
        )

    def stop_now(self) -> None:
        """A second stop signal: a launched engine is killed when stopped, not given its stop timeout."""
        if self.supervisor is not None:
            self.supervisor.stop_timeout = 0.0

    async def close(self) -> None:
        """Stop watching; a launched engine gets SIGTERM (then SIGKILL) once the front has drained."""
        try:
            if self._task is not None:
                await self._end_watch(self._task)
            if self.supervisor is not None:
                await self.supervisor.close()
        finally:  # a second stop signal too: an open probe connection was "Unclosed connector", an ERROR
            if self.client is not None:
                await self.client.close()

    async def _end_watch(self, task: asyncio.Task[None]) -> None:
        """Cancel the watch and wait for it: a supervisor stops its engine as it ends. A second stop
        signal meanwhile cancels this wait, and is passed on (it used to be swallowed here, and the
        agent then waited the engine's stop timeout out and exited 0): the engine is killed now."""
        task.cancel()
        try:
            await asyncio.wait({task})  # never raises the watch's own outcome (``_watch_ended`` reports it)
        except asyncio.CancelledError:
            self.stop_now()
            task.cancel()  # cuts ``EngineProcess.stop``'s wait short: it kills the engine
            await asyncio.wait({task}, timeout=KILLED_WAIT_SECONDS)
            raise
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it again


def pick_model(models: list[DiscoveredModel], wanted: str | None) -> str:
    """The one model an upstream lists, or the one ``wanted`` names among several."""
    if len(models) == 1:
        return models[0].name
    names = [m.name for m in models]
    if wanted is not None and (name := listed_as(wanted, names)) is not None:
        return name
    if not names:
        raise UpstreamError("the upstream lists no model; load one there, or pass --upstream-model")
    raise UpstreamError(f"the upstream serves several models ({', '.join(names)}): pass --upstream-model NAME to choose one")


async def first_of(ready: asyncio.Event, stopping: asyncio.Event, task: asyncio.Task[None]) -> bool:
    """True once ``ready``; False on a stop; the task's own error if it ended first (a failed first start)."""
    waiters = {asyncio.ensure_future(ready.wait()), asyncio.ensure_future(stopping.wait())}
    try:
        await asyncio.wait({*waiters, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise UpstreamError(str(task.exception()))
    return ready.is_set() and not stopping.is_set()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

