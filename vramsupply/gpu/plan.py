"""The memory plan: which quant fits the devices, at which context and slot count, before any
download or load.

Ollama users' commonest failures are an OOM from a wrong estimate and a silent fall back to the
CPU; the plan prevents both by deciding up front, from the GGUF header and each device's free
memory, with headroom:

- the GPUs (when the build can offload and `n_gpu_layers` is not 0) must hold the offloaded
  weights, the KV cache and the compute buffers, less 1 GiB each for the driver's own use;
  token embeddings and the logits buffer stay in host RAM, as llama.cpp places them;
- otherwise host RAM must hold everything, less 512 MiB.

Quant choice: the best quant (in QUALITY_ORDER) that fits at the requested settings. A context
that was not set explicitly gives way first: the best quant that fits at some context down to
KEEP_QUANT_CONTEXT is chosen, at the largest such context, before a lower quant at the full
default. When none fits even so and the context or slot count was not set explicitly, they are
reduced the way llama-server's `-fit` does it: the context first (not below MIN_CONTEXT), then
the slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vramsupply.config.settings import setting_flag
from vramsupply.engine.trained_context import served_context
from vramsupply.gpu.devices import Device
from vramsupply.gpu.estimate import Estimate, Settings, estimate
from vramsupply.gpu.source import ModelSource, QuantFile

GIB = 1024**3
MIB = 1024**2
GPU_HEADROOM = 1 * GIB
HOST_HEADROOM = 512 * MIB
MIN_CONTEXT = 2048
KEEP_QUANT_CONTEXT = 4096
"""A default context shrinks to this before the plan trades down the quant: the default was 4096
until the slots' shared cache proved too small under many conversations (config/settings.py), and a GPU
that held the best quant at that context still does."""
CONTEXT_STEP = 256
# Best first. F16/BF16/F32 only when asked for: Q8_0 answers the same at half the memory and twice the speed.
QUALITY_ORDER = (
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "IQ4_XS", "IQ4_NL", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "IQ3_M", "IQ3_S", "Q3_K_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S",
    "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)  # fmt: skip
FULL_PRECISION = ("BF16", "F16", "F32")
SHRUNK = "fits only with"
"""In the note of a plan that reduced the context or slots to fit (``_shrunk_plan``)."""


TIB = 1024 * GIB


def gib(n: int) -> str:
    """A size in MiB, GiB or TiB (not "1024.00 GiB"), two decimals past a GiB."""
    if n >= TIB:
        return f"{n / TIB:.2f} TiB"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


@dataclass(frozen=True)
class Target:
    """The memory a plan must fit in: the GPUs the model is offloaded to, or host RAM."""

    gpus: tuple[Device, ...]
    host: Device
    shares: tuple[float, ...] | None = None
    """``--tensor-split``: each GPU's share of the layers (None: by free memory, llama.cpp's default)."""

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpus)

    def holds(self, needed: int, compute: int) -> bool:
        """Whether ``needed`` bytes (a compute buffer on each GPU, the layers split between them) fit."""
        if self.shares is None or len(self.shares) != len(self.gpus) or not sum(self.shares):
            return needed <= self.usable_bytes
        layers = needed - compute * len(self.gpus)
        return all(
            layers * share / sum(self.shares) + compute <= max(0, gpu.free_bytes - GPU_HEADROOM)
            for gpu, share in zip(self.gpus, self.shares)
        )

    @property
    def usable_bytes(self) -> int:
        if self.gpus:
            return sum(max(0, d.free_bytes - GPU_HEADROOM) for d in self.gpus)
        return max(0, self.host.free_bytes - HOST_HEADROOM)

    @property
    def devices(self) -> tuple[Device, ...]:
        return self.gpus or (self.host,)

    def describe(self) -> str:
        names = ", ".join(d.label for d in self.devices)
        free = sum(d.free_bytes for d in self.devices)
        headroom = GPU_HEADROOM * len(self.gpus) if self.gpus else HOST_HEADROOM
        return f"{names}: {gib(free)} free, {gib(self.usable_bytes)} after {gib(headroom)} headroom"


@dataclass(frozen=True)
class Candidate:
    quant: str
    file_bytes: int
    estimate: Estimate
    needed_bytes: int  # on the target (GPU share, or everything on the CPU)
    fits: bool
    repo: str | None = None  # a Hub model's: the repo serve downloads this quant from

    def as_json(self) -> dict[str, Any]:
        e = self.estimate
        found = {
            "quant": self.quant,
            "file_bytes": self.file_bytes,
            "weights_bytes": e.weights_bytes,
            "kv_bytes": e.memory_bytes,
            "compute_bytes": e.compute_bytes,
            "total_bytes": e.total_bytes,
            "fits": self.fits,
        }
        return found | ({"repo": self.repo} if self.repo else {})

    def breakdown(self, settings: Settings) -> str:
        e = self.estimate
        return (
            f"{self.quant} needs {gib(e.total_bytes)}: weights {gib(e.weights_bytes)} + KV {gib(e.kv_bytes)} "
            f"({settings.describe()}{f', {gib(e.kv_bytes_per_context)} each' if settings.kv_per_slot else ''})"
            f"{f' + recurrent state {gib(e.state_bytes)} ({settings.parallel} x {gib(e.state_bytes // settings.parallel)})' if e.state_bytes else ''}"
            f" + compute {gib(e.compute_bytes)}"
        )


@dataclass(frozen=True)
class Plan:
    model: str
    target: Target
    settings: Settings  # the settings `chosen` was sized for (reduced when they had to be)
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    notes: tuple[str, ...] = field(default=())
    asked: str | None = None  # the quant the user named
    local: bool = False  # a local file: served as it is, --quant chooses nothing

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "devices": [d.as_json() for d in self.target.devices],
            "candidates": [c.as_json() for c in self.candidates],
            "chosen": self.chosen.as_json() if self.chosen else None,
        }


def target_for(devices: Sequence[Device], *, gpu_offload: bool) -> Target:
    gpus = tuple(d for d in devices if d.is_gpu) if gpu_offload else ()
    host = next((d for d in devices if d.kind == "cpu"), Device("CPU", "", "cpu", 0, 0))
    return Target(gpus, host)


def needed_on_target(source: ModelSource, e: Estimate, target: Target, settings: Settings) -> int:
    """GPU share: all but the token embeddings and the host logits buffer; one compute buffer per GPU.
    With ``--n-gpu-layers`` fewer than the model's, the offloaded layers' share of the weights and
    of the KV cache (the refusal's advice: it planned every layer, whatever was set)."""
    if not target.on_gpu:
        return e.total_bytes
    host_only = source.shape.input_bytes + 4 * source.shape.n_vocab * settings.parallel
    layered = e.weights_bytes - source.shape.input_bytes + e.memory_bytes
    n_layer = source.shape.n_layer
    kept_on_host = layered - layered * settings.gpu_layers // n_layer if 0 <= settings.gpu_layers < n_layer else 0
    return e.total_bytes - host_only - kept_on_host + (e.compute_bytes * (len(target.gpus) - 1))


def candidate(source: ModelSource, quant: QuantFile, target: Target, settings: Settings) -> Candidate:
    e = estimate(source.shape, source.weights_bytes(quant), settings)
    needed = needed_on_target(source, e, target, settings)
    return Candidate(quant.quant, quant.file_bytes, e, needed, target.holds(needed, e.compute_bytes), quant.repo_id)


def ranked(quants: Sequence[QuantFile]) -> list[QuantFile]:
    """Best first: QUALITY_ORDER, then unknown tags by size, full precision last."""

    def key(q: QuantFile) -> tuple[int, int]:
        if q.quant in QUALITY_ORDER:
            return (0, QUALITY_ORDER.index(q.quant))
        return (2 if q.quant in FULL_PRECISION else 1, -q.file_bytes)

    return sorted(quants, key=key)


def make_plan(
    source: ModelSource,
    target: Target,
    settings: Settings,
    *,
    quant: str | None = None,
    context_fixed: bool = True,
    parallel_fixed: bool = True,
) -> Plan:
    """Size every quant; choose `quant` if given, else the best that fits; shrink what is not fixed.

    A context beyond the model's training context is served as the engine serves it
    (``served_context``: requests cut to the training context, a shared cache kept up to what the
    slots can fill), so it is planned that way too."""
    plan = _sized(source, target, settings, quant, context_fixed, parallel_fixed)
    return replace(plan, local=source.local_path is not None)


def _sized(source: ModelSource, target: Target, settings: Settings, quant: str | None, context_fixed: bool, parallel_fixed: bool) -> Plan:
    served = served_context(settings.context_length, settings.parallel, settings.kv_per_slot, source.shape.n_ctx_train)
    settings = replace(settings, context_length=served.cache_tokens)
    quants = ranked(source.quants)
    candidates = tuple(candidate(source, q, target, settings) for q in quants)
    pool = [q for q in quants if q.quant == quant] if quant else [q for q in quants if q.quant not in FULL_PRECISION] or quants
    keep_floor = settings.context_length if context_fixed else min(KEEP_QUANT_CONTEXT, settings.context_length)
    for q in pool:
        chosen = next(c for c in candidates if c.quant == q.quant)
        if chosen.fits:
            return Plan(source.label, target, settings, candidates, chosen, (_why(chosen, candidates, target, settings, quant or (chosen.quant if len(candidates) == 1 else None)),), quant)
        smaller = shrink(source, q, target, settings, floor=keep_floor, parallel_fixed=True) if keep_floor < settings.context_length else None
        if smaller is not None:
            return _shrunk_plan(source, target, settings, candidates, q, smaller, quant)
    if context_fixed and parallel_fixed:
        return Plan(source.label, target, settings, candidates, None, asked=quant)
    floor = settings.context_length if context_fixed else min(MIN_CONTEXT, settings.context_length)
    for q in pool:
        smaller = shrink(source, q, target, settings, floor=floor, parallel_fixed=parallel_fixed)
        if smaller is not None:
            return _shrunk_plan(source, target, settings, candidates, q, smaller, quant)
    return Plan(source.label, target, settings, candidates, None, asked=quant)


def _shrunk_plan(source: ModelSource, target: Target, asked: Settings, candidates: tuple[Candidate, ...], q: QuantFile,
                 smaller: Settings, quant: str | None) -> Plan:
    fitted = candidate(source, q, target, smaller)
    note = f"{q.quant} {SHRUNK} {smaller.describe()} (asked {asked.parallel} x {asked.context_length}) on {target.describe()}"
    return Plan(source.label, target, smaller, tuple(fitted if c.quant == q.quant else c for c in candidates), fitted, (note,), quant)


def shrink(source: ModelSource, quant: QuantFile, target: Target, settings: Settings, *, floor: int, parallel_fixed: bool) -> Settings | None:
    """The largest context (then slot count) from ``floor`` up to the requested one that fits."""
    for parallel in [settings.parallel] if parallel_fixed else range(settings.parallel, 0, -1):
        trial = replace(settings, parallel=parallel)
        if not candidate(source, quant, target, replace(trial, context_length=floor)).fits:
            continue
        low, high = floor, settings.context_length  # low fits; find the largest fitting step below high
        if candidate(source, quant, target, replace(trial, context_length=high)).fits:
            return replace(trial, context_length=high)
        while high - low > CONTEXT_STEP:
            middle = low + (high - low) // 2 // CONTEXT_STEP * CONTEXT_STEP or low + CONTEXT_STEP
            if candidate(source, quant, target, replace(trial, context_length=middle)).fits:
                low = middle
            else:
                high = middle
        return replace(trial, context_length=low)
    return None


def _why(chosen: Candidate, candidates: Sequence[Candidate], target: Target, settings: Settings, asked: str | None) -> str:
    if asked:
        return f"{chosen.breakdown(settings)}; fits {target.describe()}"
    better = [c for c in candidates[: candidates.index(chosen)] if c.quant not in FULL_PRECISION]
    reason = f"{chosen.quant}: the best quant that fits {target.describe()} ({gib(chosen.needed_bytes)} needed)"
    if better:
        reason += "; " + ", ".join(f"{c.quant} would need {gib(c.needed_bytes)}" for c in better[-2:])
    return reason


def refusal(plan: Plan) -> str:
    """Why nothing can be served, with the numbers, and what to change."""
    named = [c for c in plan.candidates if c.quant == plan.asked]
    asked = named[0] if named else min(plan.candidates, key=lambda c: c.needed_bytes, default=None)
    if asked is None:
        return f"{plan.model} offers no GGUF quant to plan for"
    where = plan.target.describe()
    # --quant picks among a Hub repo's files; a local file is served as it is.
    smaller = "use a smaller quantization of this model (another .gguf file)" if plan.local else f"choose a smaller {setting_flag('quant')}"
    lower = f"lower {setting_flag('context_length')} or {setting_flag('parallel')}"
    if asked.estimate.compute_bytes * 2 > asked.estimate.total_bytes:  # the compute buffer is most of it
        lower = f"lower {setting_flag('n_ubatch')}, {setting_flag('context_length')} or {setting_flag('parallel')}"
    if plan.target.on_gpu:
        advice = f"{lower}, {smaller}, or offload fewer layers ({setting_flag('n_gpu_layers')})"
    else:
        advice = f"{lower}, or {smaller}"
    return f"{asked.breakdown(plan.settings)} ({gib(asked.needed_bytes)} on {'the GPU' if plan.target.on_gpu else 'this machine'}), but {where}: {advice}"
