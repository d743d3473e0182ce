"""`vramsupply plan` and serve's use of the plan: from Settings to a Plan, and a Plan to words.

serve calls `fit_settings` before it downloads or loads anything: without an explicit quant it
takes the best quant that fits, it shrinks a context or slot count the user did not set, and it
refuses (PlanRefused, with the numbers) when explicit settings cannot fit.

A Hub model's quants may come from several repos (gpu/source.py): the plan says which repo and
file the chosen one is, since that is what serve downloads, and sizes it on that file's header.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from rich import box
from rich.console import Console, Group, ConsoleOptions, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from vramsupply.config import DEFAULT_PARALLEL_RECURRENT
from vramsupply.config import Settings as AgentSettings
from vramsupply.engine.trained_context import served_context
from vramsupply.errors import MissingSetting, VramsupplyError
from vramsupply.gpu.devices import Device, build_has_gpu_backend, list_devices
from vramsupply.gpu.estimate import Settings
from vramsupply.gpu.options import GpuOptions
from vramsupply.gpu.plan import QUALITY_ORDER, SHRUNK, Candidate, Plan, Target, gib, make_plan, refusal, target_for
from vramsupply.gpu.source import ModelSource, SourceError, SourceUnreachable, model_source
from vramsupply.hub.local import is_local_path
from vramsupply.hub.quant import normalize_quant

log = logging.getLogger(__name__)
QUANT_IGNORED = "--quant (VRAM_SUPPLY_QUANT) applies to HuggingFace models only"
TRAINED_ON = "the model was trained on"  # the engine logs this itself when it loads


class PlanRefused(VramsupplyError):
    """The model cannot fit with the settings given; the message has the numbers and the fix."""


def estimate_settings(settings: AgentSettings, on_gpu: bool = True) -> Settings:
    """The serving settings that size memory. Flash attention `auto` is on on a GPU and off on the
    CPU alone (``GpuOptions.flash_attention``), where attention then needs a bigger buffer."""
    cache = GpuOptions(cache_type_k=settings.cache_type_k, cache_type_v=settings.cache_type_v)
    return Settings(
        context_length=settings.context_length,
        parallel=settings.parallel,
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
        flash_attention=cache.flash_attention(settings.flash_attention.value, on_gpu) != "off",
        n_batch=settings.n_batch,
        n_ubatch=settings.n_ubatch,
        kv_per_slot=settings.kv_per_slot,
        gpu_layers=settings.n_gpu_layers,
    )


def planning_target(settings: AgentSettings, devices: list[Device] | None = None) -> Target:
    """The memory to plan against: the GPUs in use (`devices` narrows them) or host RAM."""
    devices = list_devices() if devices is None else devices
    if settings.devices:
        names = {d.name.lower() for d in devices}
        for wanted in settings.devices:
            if wanted.lower() not in names:
                raise SourceError(f"no device {wanted!r} in this llama.cpp build; it has: {', '.join(d.name for d in devices)} (vramsupply doctor lists them)")
        chosen = {name.lower() for name in settings.devices}
        devices = [d for d in devices if not d.is_gpu or d.name.lower() in chosen]
    target = target_for(devices, gpu_offload=settings.n_gpu_layers != 0 and build_has_gpu_backend())
    return placed(target, settings)


def placed(target: Target, settings: AgentSettings) -> Target:
    """The GPUs as ``--split-mode`` and ``--tensor-split`` use them: ``none`` puts everything on
    ``--main-gpu`` alone, and shares split the layers as given (the plan had added up every GPU's
    free memory whatever was set, and a model for one 4 GiB GPU passed as fitting two)."""
    if len(target.gpus) < 2:
        return target
    if settings.split_mode == "none":
        main = target.gpus[settings.main_gpu] if settings.main_gpu < len(target.gpus) else target.gpus[0]
        return replace(target, gpus=(main,))
    if settings.tensor_split:
        return replace(target, shares=tuple(settings.tensor_split[: len(target.gpus)]))
    return target


def source_for(settings: AgentSettings, quant: str | None) -> ModelSource:
    if not settings.model:
        raise MissingSetting("no model to plan for: pass --model ./file.gguf (or org/model) or set VRAM_SUPPLY_MODEL")
    return model_source(settings.model, quant, settings.download_timeout, settings.gguf_publishers, settings.cache_dir)


def plan_for(settings: AgentSettings, *, quant_explicit: bool, context_explicit: bool = True, parallel_explicit: bool = True, target: Target | None = None) -> Plan:
    """The plan `serve` would follow. A local file is its own single candidate. A Hub quant chosen
    from another repo than the one whose header gave the shape is planned again on its own repo's
    header (once: fit_before_load plans on the downloaded file in any case)."""
    quant = normalize_quant(settings.quant) if quant_explicit else None
    source = source_for(settings, quant)
    _check_cache_types(settings, source)
    target = target or planning_target(settings)
    plan = _plan_on(source, settings, target, quant, context_explicit, parallel_explicit)
    exact = source.with_shape_of(plan.chosen.quant) if plan.chosen else None
    if exact is not None:
        source = exact
        _check_cache_types(settings, source)
        plan = _plan_on(source, settings, target, quant, context_explicit, parallel_explicit)
    return replace(plan, notes=plan.notes + _downloaded_file(source, plan))


def _check_cache_types(settings: AgentSettings, source: ModelSource) -> None:
    """A KV cache type this model's heads cannot take is a setting to change (``GpuOptionError``,
    exit 2, as when flash attention is off for a quantized V cache), not an unreadable model."""
    cache = GpuOptions(cache_type_k=settings.cache_type_k, cache_type_v=settings.cache_type_v)
    cache.flash_attention(settings.flash_attention.value)
    cache.check_head_size(source.shape.head_dim_k, source.shape.head_dim_v)


def _plan_on(source: ModelSource, settings: AgentSettings, target: Target, quant: str | None, context_explicit: bool, parallel_explicit: bool) -> Plan:
    sizing = estimate_settings(settings, target.on_gpu)
    if source.shape.recurrent and not parallel_explicit:  # each slot holds a whole recurrent state
        sizing = replace(sizing, parallel=min(sizing.parallel, DEFAULT_PARALLEL_RECURRENT))
    plan = make_plan(
        source,
        target,
        sizing,
        quant=None if source.local_path else quant,
        context_fixed=context_explicit,
        parallel_fixed=parallel_explicit,
    )
    return replace(plan, notes=plan.notes + _quant_ignored(source, quant) + _context_capped(source, sizing))


def _downloaded_file(source: ModelSource, plan: Plan) -> tuple[str, ...]:
    """Where a Hub model's chosen quant comes from: each quant is the first ranked repo's that has
    it, so repos may differ between quants, and `models resolve` shows the same file."""
    offer = next((q for q in source.quants if plan.chosen and q.quant == plan.chosen.quant), None)
    if offer is None or offer.resolved is None:
        return ()
    resolved = offer.resolved
    more = f" and {len(resolved.files) - 1} more part(s)" if len(resolved.files) > 1 else ""
    return (f"{offer.quant} is downloaded from {resolved.repo_id}: {resolved.primary.path}{more}",)


def _context_capped(source: ModelSource, asked: Settings) -> tuple[str, ...]:
    """A context beyond the training context, planned as the engine serves it (``served_context``):
    said, since the plan's numbers are then not the context asked for."""
    trained = source.shape.n_ctx_train
    served = served_context(asked.context_length, asked.parallel, asked.kv_per_slot, trained)
    if not served.capped(asked.context_length):
        return ()
    cache = "each slot's KV cache" if asked.kv_per_slot else "the KV cache the slots share"
    return (
        f"{TRAINED_ON} {trained} tokens: requests are served up to {served.request_tokens} tokens, and {cache} holds "
        f"{served.cache_tokens}; context_length is {asked.context_length}",
    )


def _quant_ignored(source: ModelSource, quant: str | None) -> tuple[str, ...]:
    """A quant asked for with a local file, which is served as it is: said, so that nobody thinks
    they are serving the quant they named."""
    if quant is None or source.local_path is None or any(q.quant == quant for q in source.quants):
        return ()
    return (f"{QUANT_IGNORED}: {source.local_path.name} is served as it is ({', '.join(q.quant for q in source.quants)}), not {quant}",)


@dataclass(frozen=True)
class Fitted:
    settings: AgentSettings
    plan: Plan


def fit_settings(settings: AgentSettings, explicit: set[str], target: Target | None = None) -> Fitted:
    """Settings adjusted to the plan, or PlanRefused. `explicit`: the settings the user set (flag,
    env or config file); only the others may be chosen or reduced."""
    try:
        plan = plan_for(
            settings,
            quant_explicit="quant" in explicit,
            context_explicit="context_length" in explicit,
            parallel_explicit="parallel" in explicit,
            target=target,
        )
    except SourceError as exc:
        raise PlanRefused(str(exc)) from exc
    if plan.chosen is None:
        raise PlanRefused(f"the model does not fit: {refusal(plan)}")
    updates: dict[str, object] = {"context_length": _engine_context(settings, plan), "parallel": plan.settings.parallel}
    if settings.model is not None and not is_local_path(settings.model):
        updates["quant"] = plan.chosen.quant
    return Fitted(settings.model_copy(update=updates), plan)


def _engine_context(asked: AgentSettings, plan: Plan) -> int:
    """The context_length to serve with. Where the plan only cut it to the training context (it
    sizes the cache the engine will make), the one asked for: the engine cuts it to the same cache
    itself, and its warning then names the context the provider asked for, not the plan's cache
    size ("context_length 32768 is more than ... trained on" where 100000 was asked). Where the
    plan shrank it to fit memory, the plan's."""
    capped = any(note.startswith(TRAINED_ON) for note in plan.notes)
    shrunk = any(SHRUNK in note for note in plan.notes)
    return asked.context_length if capped and not shrunk else plan.settings.context_length


def fit_before_download(settings: AgentSettings, explicit: set[str]) -> AgentSettings:
    """For a Hub model: choose the quant and size the context before downloading anything."""
    if not settings.model or is_local_path(settings.model):
        return settings
    try:
        fitted = fit_settings(settings, explicit)
    except PlanRefused as exc:
        if isinstance(exc.__cause__, SourceUnreachable):
            chosen = settings if "quant" in explicit else _best_cached(settings)
            # Only with a cached copy is there a file to plan on; without one the download's
            # error follows at once and says what to do.
            cached = _verified_copy(chosen)
            log.info("memory plan before download skipped (%s)%s", exc, "; planning on the cached file instead" if cached else "")
            return chosen
        raise
    _report(fitted)
    return fitted.settings


def _best_cached(settings: AgentSettings) -> AgentSettings:
    """Offline, with no quant asked for: the best quant already in the cache, which an earlier
    plan chose (the quant setting's default would be another file, perhaps never downloaded)."""
    from vramsupply.hub.cache import best_cached_quant
    from vramsupply.hub.store import default_cache_dir

    assert settings.model is not None
    cached = best_cached_quant(settings.cache_dir or default_cache_dir(), settings.model, QUALITY_ORDER)
    return settings if cached is None else settings.model_copy(update={"quant": cached})


def _verified_copy(settings: AgentSettings) -> bool:
    """Whether the cache holds a verified copy of the model at the quant it would be served at."""
    from vramsupply.hub.store import default_cache_dir, find_verified_pull

    assert settings.model is not None
    return find_verified_pull(settings.cache_dir or default_cache_dir(), settings.model, settings.quant) is not None


def fit_before_load(settings: AgentSettings, explicit: set[str], path: Path) -> AgentSettings:
    """For the file about to be loaded: shrink what was not set, or refuse, before llama.cpp allocates."""
    local = settings.model_copy(update={"model": str(path)})
    # A Hub model's file was picked by its quant tag, which the file's own header may name
    # otherwise (unsloth's UD-Q4_K_XL is a Q4_K_M to llama.cpp): only a path the user gave is
    # served regardless of --quant.
    asked = explicit if settings.model is None or is_local_path(settings.model) else explicit - {"quant"}
    fitted = fit_settings(local, asked)
    _report(fitted)
    return fitted.settings.model_copy(update={"model": settings.model})


def _report(fitted: Fitted) -> None:
    plan = fitted.plan
    for note in plan.notes:
        if SHRUNK in note or note.startswith(QUANT_IGNORED):
            log.warning("memory plan: %s", note)
        elif note.startswith(TRAINED_ON):
            log.debug("memory plan: %s", note)
        else:
            log.info("memory plan: %s", note)


def plan_table(plan: Plan) -> RenderableType:
    """One row per quant. Readable at 80 columns: short headers, no vertical rules, and sizes that
    are never cut (each size column is as wide as its longest value); the quant name folds and the
    chosen mark wraps under "yes". A terminal too narrow even for that gets one block per quant."""
    headers = ("quant", "file", "weights", "KV+state" if any(c.estimate.state_bytes for c in plan.candidates) else "KV", "compute", "total", f"on {'GPU' if plan.target.on_gpu else 'CPU'}", "fits")
    rows = [
        (c.quant, gib(c.file_bytes), gib(c.estimate.weights_bytes), gib(c.estimate.memory_bytes), gib(c.estimate.compute_bytes), gib(c.estimate.total_bytes), gib(c.needed_bytes), _fits(plan, c))
        for c in plan.candidates
    ]
    title = f"memory plan for {plan.model}: {plan.settings.describe()}"
    wide = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    for index, header in enumerate(headers):
        if header in ("quant", "fits"):  # at least "chosen", or a quant tag of up to 10 letters, unbroken
            wide.add_column(header, overflow="fold", min_width=6 if header == "fits" else max(5, min(10, max(len(row[0]) for row in rows))))
        else:
            wide.add_column(header, justify="right", no_wrap=True, min_width=max([len(header)] + [len(row[index]) for row in rows]))
    needed = sum(column.min_width or 1 for column in wide.columns) + 2 * (len(wide.columns) - 1)  # a gap of 2 between columns
    narrow = Table(box=None, show_header=False, pad_edge=False, padding=(0, 0, 0, 1))
    narrow.add_column(overflow="fold")
    narrow.add_column(overflow="fold")
    for row in rows:
        wide.add_row(*row)
        narrow.add_row(Text(row[0], style="bold"), row[-1])
        for header, value in zip(headers[1:-1], row[1:-1]):
            narrow.add_row(f"  {header}", value)
    return _WideOrNarrow(wide, Group(Text(title, style="italic"), narrow), needed)


@dataclass(frozen=True)
class _WideOrNarrow:
    """The wide table where the terminal has room for it, else the narrow one (Rich would drop
    whole columns of the wide one)."""

    wide: Table
    narrow: Group  # the title, then one block per quant
    wide_needs: int  # columns

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.wide if self.wide_needs <= options.max_width else self.narrow


def _fits(plan: Plan, candidate: Candidate) -> str:
    chosen = plan.chosen is not None and candidate.quant == plan.chosen.quant
    return ("yes" if candidate.fits else "no") + (" ← chosen" if chosen else "")


def plan_summary(plan: Plan) -> list[str]:
    lines = [f"devices: {plan.target.describe()}"]
    if plan.chosen is None:
        lines.append(f"nothing fits: {refusal(plan)}")
    else:
        lines += list(plan.notes)
    return lines
