"""Typed options for each part serve drives, picked out of ``Settings`` in one place.

The engine takes ``EngineOptions`` and the marketplace ``MarketOptions``; neither reads the whole
configuration, so each can be built and tested on its own and a setting's name changes only here.
"""

from __future__ import annotations

import shlex

from vramsupply.config import EngineKind, Settings
from vramsupply.engine import EngineOptions
from vramsupply.errors import ConfigError, VramsupplyError
from vramsupply.gpu.options import GpuOptions
from vramsupply.hub.local import LocalModel
from vramsupply.platform import MarketOptions
from vramsupply.upstream.options import UpstreamOptions


class ServeError(VramsupplyError):
    """Serving cannot start for a reason of its own (a tunnel tool missing); one line for the CLI."""


def engine_options(settings: Settings, model: LocalModel, explicit: set[str] | None = None) -> EngineOptions:
    """Settings already checked every engine value alone and together (``config.check_together``).
    ``explicit``: the settings the user set (default: ``settings``' own), since the memory plan's
    updates count as set."""
    explicit = settings.model_fields_set if explicit is None else explicit
    return EngineOptions(
        model_path=model.path,
        n_ctx=settings.context_length,
        n_ctx_explicit="context_length" in explicit,
        parallel=settings.parallel,
        kv_per_slot=settings.kv_per_slot,
        n_gpu_layers=settings.n_gpu_layers,
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        flash_attention=settings.flash_attention.value,
        threads=settings.threads,
        max_queue=settings.max_queue,
        cache_ram=settings.cache_ram,
        draft_max=settings.draft_max,
        backend_sampling=settings.backend_sampling,
        stall_timeout=settings.stall_timeout,
        stream_interval_ms=settings.stream_interval_ms,
        gpu=GpuOptions(
            split_mode=settings.split_mode,
            main_gpu=settings.main_gpu,
            tensor_split=tuple(settings.tensor_split or ()),
            devices=tuple(settings.devices or ()),
            cache_type_k=settings.cache_type_k,
            cache_type_v=settings.cache_type_v,
        ),
    )


def market_options(settings: Settings, *, local_ok: bool = False) -> MarketOptions:
    """The provider's terms; ``local_ok`` (the demo) accepts a loopback endpoint URL without a warning."""
    return MarketOptions(
        platform_url=settings.platform_url,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        endpoint_url=settings.endpoint_url,
        input_price=settings.input_price,
        output_price=settings.output_price,
        context_length_offered=settings.context_length_offered,
        planned_context=planned_context(settings),
        heartbeat_interval=settings.heartbeat_interval,
        endpoint_token=endpoint_token_of(settings),
        local_ok=local_ok,
        tunnel=settings.tunnel,
    )


def endpoint_token_of(settings: Settings) -> str | None:
    return settings.endpoint_token.get_secret_value() if settings.endpoint_token else None


def planned_context(settings: Settings) -> int | None:
    """The context serve intends to offer, known before anything starts; an upstream's is learned later."""
    if settings.engine is EngineKind.llama_cpp or "context_length" in settings.model_fields_set:
        return settings.context_length
    return None


def upstream_options(settings: Settings) -> UpstreamOptions:
    """For ``--engine upstream|vllm|sglang``: only what was set explicitly overrides the upstream's own."""
    explicit = settings.model_fields_set
    try:
        extra_args = tuple(shlex.split(settings.engine_args or ""))
    except ValueError as exc:
        raise ConfigError(f"invalid engine_args {settings.engine_args!r}: {exc}") from None
    return UpstreamOptions(
        engine=settings.engine.value,  # type: ignore[arg-type]
        model=settings.model,
        upstream_model=settings.upstream_model,
        url=settings.upstream_url,
        api_key=settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None,
        context_length=settings.context_length if "context_length" in explicit else None,
        slots=settings.parallel,
        slots_explicit="parallel" in explicit,
        tensor_parallel=settings.tensor_parallel_size,
        pipeline_parallel=settings.pipeline_parallel_size,
        nnodes=settings.nnodes,
        node_rank=settings.node_rank,
        dist_init_addr=settings.dist_init_addr,
        command=settings.engine_command,
        extra_args=extra_args,
        start_timeout=settings.engine_start_timeout,
    )
