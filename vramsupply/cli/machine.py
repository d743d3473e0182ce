"""What this machine can do: `doctor` (ready to serve?), `plan` (what fits in memory), `bench` (how fast)."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Optional

import typer

from vramsupply.config import DEFAULT_DECODE_NICE, MAX_NICE

from .app import JSON_OPTION, app, console, err_console, settings_from

if TYPE_CHECKING:
    from vramsupply.config import Settings


@app.command()
def doctor(as_json: bool = JSON_OPTION) -> None:
    """Check this machine for serving: GPU build, driver, a 1-token decode, memory, disk, port, platform, key, endpoint, clock."""
    from vramsupply.gpu.doctor import doctor_text, run_checks

    results = run_checks(settings_from({}))
    if as_json:
        typer.echo(json.dumps({"checks": [r.as_json() for r in results]}, indent=2))
    else:
        for line in doctor_text(results):
            console.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


@app.command()
def plan(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A local .gguf path or org/model on HuggingFace (default: the model setting)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Plan for this quant only (default: choose the best that fits)."),
    context_length: Optional[int] = typer.Option(None, "--context-length", help="Context window per request, in tokens."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Slots: requests decoded concurrently, 1 to 256."),
    kv_per_slot: Optional[bool] = typer.Option(None, "--kv-per-slot/--no-kv-per-slot", help="Plan a KV cache per slot instead of one shared by all slots."),
    n_gpu_layers: Optional[int] = typer.Option(None, "--n-gpu-layers", help="Layers offloaded to the GPU (-1: all; 0: plan for the CPU alone)."),
    n_batch: Optional[int] = typer.Option(None, "--n-batch", help="Maximum tokens per decode step (default 2048)."),
    n_ubatch: Optional[int] = typer.Option(None, "--n-ubatch", help="Physical micro-batch size (default 512)."),
    flash_attention: Optional[str] = typer.Option(None, "--flash-attention", help="auto, on or off (default auto)."),
    cache_type_k: Optional[str] = typer.Option(None, "--cache-type-k", help="KV cache type for keys: f16, q8_0 or q4_0."),
    cache_type_v: Optional[str] = typer.Option(None, "--cache-type-v", help="KV cache type for values: f16, q8_0 or q4_0 (quantized needs flash attention)."),
    devices: Optional[str] = typer.Option(None, "--devices", help="GPUs to plan for, e.g. CUDA0,CUDA1 (vramsupply doctor lists them)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show the memory each quant needs on this machine's devices and which fits, before any download (exit 1: nothing fits, or the model or a device cannot be read; 2: no model, or an invalid setting)."""
    # The serve flags the plan's numbers depend on, each named after its setting and passed as serve
    # passes them: the plan is serve's, and its advice (`use --cache-type-k f16`) can be followed here.
    flags = dict(locals())
    flags.pop("as_json")
    from vramsupply.gpu.planning import plan_for, plan_summary, plan_table

    settings = settings_from(flags)
    explicit = settings.model_fields_set
    result = plan_for(settings, quant_explicit="quant" in explicit, context_explicit="context_length" in explicit, parallel_explicit="parallel" in explicit)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
    else:
        console.print(plan_table(result))
        for line in plan_summary(result):
            console.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if result.chosen is not None else 1)


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to measure (default: the model setting)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Quantization, e.g. Q4_K_M (default: the quant setting)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Slots to fill in the second phase (default: the parallel setting)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for decoding and prompts, as serve takes them (default: the threads setting)."),
    decode_nice: Optional[int] = typer.Option(None, "--decode-nice", help=f"Nice levels the decode runs below this process, 0 to {MAX_NICE} (default: the decode_nice setting, {DEFAULT_DECODE_NICE})."),
    seconds: float = typer.Option(30.0, "--seconds", help="About how long the whole measurement takes, 3 to 600."),
    as_json: bool = typer.Option(False, "--json", help="Print the new result as JSON (it is stored too)."),
    beside_agent: bool = typer.Option(False, "--beside-agent", help="Measure on the GPU while an agent serves on this machine (a second copy of the model can run the GPU out of memory)."),
) -> None:
    """Measure this machine's tokens per second for the model, at 1 stream and with every slot busy; serve reports it."""
    from vramsupply.throughput import default_bench_path, run_bench

    if not 3.0 <= seconds <= 600.0:  # also false for nan, which a min/max option lets through as "over 600"
        raise typer.BadParameter(f"{seconds:g} is not a number of seconds from 3 to 600", param_hint="'--seconds'")
    settings = settings_from({"model": model, "quant": quant, "parallel": parallel, "threads": threads, "decode_nice": decode_nice})
    _beside_a_running_agent(settings, beside_agent)
    result = asyncio.run(run_bench(settings, seconds, progress=lambda line: err_console.print(f"bench: {line}", highlight=False)))
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    slots = "1 slot" if result.parallel == 1 else f"{result.parallel} slots"
    console.print(
        f"{result.model}: {result.single_stream_tokens_per_second:,.1f} tok/s with 1 stream, "
        f"{result.all_slots_tokens_per_second:,.1f} tok/s with {slots} busy; saved to {default_bench_path()}",
        highlight=False,
        soft_wrap=True,
    )


def _beside_a_running_agent(settings: Settings, beside_agent: bool) -> None:
    """An agent serving on this machine shares what bench measures: said in one line before
    measuring, and on the GPU refused unless ``--beside-agent``: the benchmark loads a second copy of
    the model there, which can run the GPU out of memory under the agent's buyers."""
    from vramsupply.cli.local_agent import agent_beside
    from vramsupply.gpu import devices
    from vramsupply.throughput import BenchError

    pid = agent_beside()
    if pid is None:
        return
    on_gpu = settings.n_gpu_layers != 0 and devices.build_has_gpu_backend()
    if on_gpu and not beside_agent:
        raise BenchError(
            f"a vramsupply agent (pid {pid}) is serving on this machine: a second copy of the model on the GPU can run it out of "
            "memory under its buyers, and the figure would be lowered by its traffic; stop the agent first, or pass --beside-agent to measure anyway"
        )
    shares = "the GPU, CPU and memory" if on_gpu else "the CPU and memory"
    err_console.print(
        f"warning: a vramsupply agent (pid {pid}) is serving on this machine: this measurement shares {shares} with it, so the result "
        "is lower than the machine can do (and an agent serving this model offers it as its capacity); stop the agent first for a true figure",
        highlight=False,
        soft_wrap=True,
    )
