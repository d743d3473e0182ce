"""Typed options for each part serve drives, picked out of ``Settings`` in one place.

The engine takes ``EngineOptions`` and the marketplace ``MarketOptions``; neither reads the whole
configuration, so each can be built and tested on its own and a setting's name changes only here.
``start_warnings`` reads the settings once more for what serve says at start about a setup that
works but may not do what was meant (who can reach /v1, a price of 0, a GPU index that names no GPU).
"""

from __future__ import annotations

from vramsupply.config import EngineKind, Settings, env_name
from vramsupply.engine import EngineOptions
from vramsupply.errors import ConfigError, VramsupplyError
from vramsupply.gpu.options import GpuOptions
from vramsupply.hub.local import LocalModel
from vramsupply.platform import MarketOptions
from vramsupply.platform.offer import is_loopback_host, loopback_listen_warning
from vramsupply.upstream.launch import LaunchError, split_engine_args
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
        decode_nice=settings.decode_nice,
        max_queue=settings.max_queue,
        cache_ram=settings.cache_ram,
        draft_max=settings.draft_max,
        backend_sampling=settings.backend_sampling,
        stall_timeout=settings.stall_timeout,
        stream_interval_ms=settings.stream_interval_ms,
        gpu=GpuOptions.of(settings),
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


def start_warnings(settings: Settings) -> list[str]:
    """What serve says once at start about a configuration that works but may not do what was
    meant: who can reach /v1, a price of nothing, and a GPU index that names no GPU."""
    checks = (unreachable_by_forward(settings), open_without_token(settings), free_of_charge(settings))
    return [warning for warning in checks if warning] + gpu_index_warnings(settings)


def free_of_charge(settings: Settings) -> str | None:
    """A price of 0 is allowed (a provider may give tokens away), but is more often a slip: said."""
    if settings.no_register or not settings.api_key:
        return None
    free = [name for name in ("input_price", "output_price") if getattr(settings, name) == 0]
    if not free:
        return None
    # named as a flag and as a variable: the 0 may come from either, or from the config file
    named = " and ".join(f"{name} ({'--' + name.replace('_', '-')}, {env_name(name)})" for name in free)
    what = "every token is" if len(free) == 2 else f"{'prompt' if free[0] == 'input_price' else 'generated'} tokens are"
    return f"{named} 0: {what} sold for nothing; prices are in cents per million tokens (the defaults are 100 and 200)"


def unreachable_by_forward(settings: Settings) -> str | None:
    """Registering an endpoint URL of another host while listening on loopback only (the default).
    Without an API key serve registers nothing: it refuses to start, and that line is the one to read."""
    if settings.no_register or settings.tunnel or not settings.api_key:
        return None
    return loopback_listen_warning(settings.endpoint_url, settings.host)


def open_without_token(settings: Settings) -> str | None:
    """``--no-register`` beyond loopback and no token: /v1 answers anyone (registering, or a tunnel,
    generates or requires one)."""
    if not settings.no_register or settings.tunnel or settings.endpoint_token or is_loopback_host(settings.host):
        return None
    where = f"every address of this machine (--host {settings.host})" if settings.host in WILDCARDS else settings.host
    return (
        f"/v1 answers without a token on {where}: anyone who can reach this machine can use the model; "
        f"set VRAM_SUPPLY_ENDPOINT_TOKEN (endpoint_token) to require `Authorization: Bearer <token>`, or serve with --host 127.0.0.1"
    )


WILDCARDS = ("0.0.0.0", "::")


def listening_everywhere(host: str, url: str) -> str | None:
    """For a wildcard host, where the agent answers: ``url`` is this machine's own way in
    (``platform.offer.local_base_url``), since ``http://0.0.0.0:PORT`` is no address to connect to."""
    if host not in WILDCARDS:
        return None
    return f"listening on every address of this machine (--host {host}): this machine reaches it at {url}/v1, other machines at this machine's own address"


def gpu_index_warnings(settings: Settings) -> list[str]:
    """``--main-gpu`` beyond the GPUs llama.cpp sees (or beyond ``--devices``): said, not refused,
    since only llama.cpp's own device list can tell, and a layer split does not use it."""
    if settings.engine is not EngineKind.llama_cpp or "main_gpu" not in settings.model_fields_set or settings.main_gpu == 0:
        return []
    from vramsupply.gpu.devices import list_devices

    gpus = len(settings.devices) if settings.devices else sum(1 for device in list_devices() if device.is_gpu)
    if settings.main_gpu < gpus:
        return []
    among = " among --devices" if settings.devices else ""
    unused = "; with --split-mode layer it is not used" if settings.split_mode == "layer" else ""
    seen = f"{gpus} GPU{'' if gpus == 1 else 's'}{among}, numbered from 0"
    return [f"main_gpu = {settings.main_gpu} names no GPU: llama.cpp sees {seen} (vramsupply doctor lists them){unused}"]


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
        extra_args = split_engine_args(settings.engine.value, settings.engine_args)
    except LaunchError as exc:
        raise ConfigError(str(exc)) from None
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
