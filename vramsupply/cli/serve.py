"""`vramsupply serve`: every setting as a flag, then the serve lifecycle.

Before the lifecycle starts, ``--demo`` is refused with a flag it would ignore. The same settings
from the environment or the config file are there for serving for real (``vramsupply login`` stores
the API key in that file), not for the demo: it runs anyway and says, in one line, that it ignores
them.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from vramsupply.config import DEFAULT_DECODE_NICE, MAX_NICE, EngineKind, LoadedSettings, Settings, load_settings
from vramsupply.errors import ConfigError

from .app import CACHE_DIR_OPTION, QUANT_OPTION, app

if TYPE_CHECKING:
    from vramsupply.serve.hooks import ServeHook


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A local .gguf path or org/model on HuggingFace (default: the model setting)."),
    quant: Optional[str] = QUANT_OPTION,
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default: the host setting, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port to listen on; 0 picks a free one (default: the port setting, 8080)."),
    context_length: Optional[int] = typer.Option(None, "--context-length", "--max-model-len", help="Context window per request, in tokens (vLLM's --max-model-len)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Slots: requests decoded concurrently, 1 to 256."),
    kv_per_slot: Optional[bool] = typer.Option(None, "--kv-per-slot/--no-kv-per-slot", help="A KV cache of the whole context per slot (parallel times the memory) instead of one shared by all slots."),
    n_gpu_layers: Optional[int] = typer.Option(None, "--n-gpu-layers", help="Layers offloaded to the GPU (-1: all)."),
    n_batch: Optional[int] = typer.Option(None, "--n-batch", help="Maximum tokens per decode step (default 2048)."),
    n_ubatch: Optional[int] = typer.Option(None, "--n-ubatch", help="Physical micro-batch size (default 512)."),
    flash_attention: Optional[str] = typer.Option(None, "--flash-attention", help="auto, on or off (default auto: on, except off for a model on the CPU alone of an Intel CPU with AMX)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for decoding and prompts, pinned (default: the physical cores, within a cgroup CPU quota, for both, and fewer while other programs keep them busy)."),
    decode_nice: Optional[int] = typer.Option(None, "--decode-nice", help=f"Nice levels the decode runs below the agent, 0 to {MAX_NICE} (default {DEFAULT_DECODE_NICE}; 0: the same priority, for a machine busy with other programs)."),
    cache_type_k: Optional[str] = typer.Option(None, "--cache-type-k", help="KV cache type for keys: f16, q8_0 or q4_0."),
    cache_type_v: Optional[str] = typer.Option(None, "--cache-type-v", help="KV cache type for values: f16, q8_0 or q4_0 (quantized needs flash attention)."),
    split_mode: Optional[str] = typer.Option(None, "--split-mode", help="Split across GPUs by layer, row, or none."),
    main_gpu: Optional[int] = typer.Option(None, "--main-gpu", help="The GPU for the whole model with --split-mode none."),
    tensor_split: Optional[str] = typer.Option(None, "--tensor-split", help="Share of the model per GPU, e.g. 3,1."),
    devices: Optional[str] = typer.Option(None, "--devices", help="GPUs to use, e.g. CUDA0,CUDA1 (vramsupply doctor lists them)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests that may wait for a slot before new ones get 429."),
    stall_timeout: Optional[float] = typer.Option(None, "--stall-timeout", help="Seconds a decode step may run while requests wait before the engine counts as failed (default 600)."),
    cache_ram: Optional[int] = typer.Option(None, "--cache-ram", help="Most MiB of RAM for the prompt cache, which keeps what its restores reach within it (default: 1/4 of free RAM, within a cgroup memory limit, at most 8192; 0: off)."),
    draft_max: Optional[int] = typer.Option(None, "--draft-max", help="Tokens prompt lookup may draft per step for a lone request (default 0 = off)."),
    backend_sampling: Optional[bool] = typer.Option(None, "--backend-sampling/--no-backend-sampling", help="Sample on the device, so logits never cross to the host (for GPUs)."),
    stream_interval_ms: Optional[float] = typer.Option(None, "--stream-interval-ms", help="Milliseconds between SSE writes of mid-answer tokens (default 30; 0: every decode step)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="llama.cpp (default), vllm, sglang, or upstream (a running OpenAI-compatible server)."),
    upstream_url: Optional[str] = typer.Option(None, "--upstream-url", help="The running server's base URL, for --engine upstream."),
    upstream_api_key: Optional[str] = typer.Option(None, "--upstream-api-key", help="API key the upstream server requires."),
    upstream_model: Optional[str] = typer.Option(None, "--upstream-model", help="The model's name at the upstream, or the weights repo vLLM/SGLang load."),
    engine_command: Optional[str] = typer.Option(None, "--engine-command", help="Command that starts vLLM/SGLang (default: vllm serve / python3 -m sglang.launch_server)."),
    engine_args: Optional[str] = typer.Option(None, "--engine-args", help="Extra arguments for vLLM/SGLang, as one quoted string."),
    tensor_parallel_size: Optional[int] = typer.Option(None, "--tensor-parallel-size", "--tp", help="GPUs the model is split across (vLLM/SGLang)."),
    pipeline_parallel_size: Optional[int] = typer.Option(None, "--pipeline-parallel-size", help="Pipeline stages across GPUs or Ray nodes (vLLM)."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", help="Nodes an SGLang deployment spans."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This node's rank (SGLang multi-node)."),
    dist_init_addr: Optional[str] = typer.Option(None, "--dist-init-addr", help="SGLang's rank-0 address, host:port."),
    engine_start_timeout: Optional[float] = typer.Option(None, "--engine-start-timeout", help="Seconds vLLM/SGLang may take to become ready (default 1800)."),
    drain_timeout: Optional[float] = typer.Option(None, "--drain-timeout", help="Seconds in-flight requests may take to finish on stop (default 30)."),
    no_register: Optional[bool] = typer.Option(None, "--no-register/--register", help="Serve locally only: do not register with the platform."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help="Public base URL the platform routes buyers to (required to register)."),
    tunnel: Optional[str] = typer.Option(None, "--tunnel", help="Get a public URL from a tunnel tool instead of --endpoint-url: cloudflared."),
    input_price: Optional[int] = typer.Option(None, "--input-price", help="Input price, cents per million tokens (default 100)."),
    output_price: Optional[int] = typer.Option(None, "--output-price", help="Output price, cents per million tokens (default 200)."),
    context_length_offered: Optional[int] = typer.Option(None, "--context-length-offered", help="Context advertised to buyers (default: the served context)."),
    heartbeat_interval: Optional[float] = typer.Option(None, "--heartbeat-interval", help="Seconds between heartbeats (default 30)."),
    platform_url: Optional[str] = typer.Option(None, "--platform-url", help="Platform API base URL (default https://vram.supply)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="vram.supply API key (default: the one `vramsupply login` stored; a flag is visible to every user in `ps`, the stored key or VRAM_SUPPLY_API_KEY is not)."),
    cache_dir: Optional[str] = CACHE_DIR_OPTION,  # str: typer makes "" the current directory, Path(".")
    log_level: Optional[str] = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    demo: bool = typer.Option(False, "--demo", help="Run a local reference platform in-process, serve the bundled tiny model, register and buy one answer."),
) -> None:
    """Serve a model (a GGUF with llama.cpp, or through vLLM, SGLang or a running server) until Ctrl-C or SIGTERM."""
    flags = dict(locals())  # every parameter is named after the setting it overrides
    flags.pop("demo")
    loaded = load_settings(flags)
    if demo:
        refuse_with_demo(loaded, flags)
    from vramsupply.serve import run_serve
    from vramsupply.server import loop

    warnings = demo_ignores(loaded) if demo else []
    settings = demo_model(loaded) if demo else loaded.settings
    with demo_data_dir() if demo else contextlib.nullcontext():
        loop.run(run_serve(settings, hook=demo_hook() if demo else None, warnings=warnings))


def demo_hook() -> ServeHook:
    """The demo's in-process platform, imported only for ``--demo``: the reference platform's
    modules (its store, payments and relay) are of no use to an agent serving for real, which
    imported them at start (about 1.3 MB of its RSS once ready)."""
    from vramsupply.devplatform.demo import DemoHook

    return DemoHook()


@contextlib.contextmanager
def demo_data_dir() -> Iterator[None]:
    """``--demo`` keeps its registration record, ledger and lock in a folder of its own, removed at
    its end: its bought answer is no row of the provider's earnings, and it runs beside the
    provider's own agent (on another port: ``--port 0`` picks a free one)."""
    from vramsupply.config import use_data_dir

    with tempfile.TemporaryDirectory(prefix="vramsupply-demo-") as folder:
        use_data_dir(Path(folder))
        try:
            yield
        finally:
            use_data_dir(None)


DEMO_SETS = {
    "no_register": "the demo registers, with a platform of its own",
    "platform_url": "the demo runs a platform of its own",
    "api_key": "the demo's platform makes its own key",
    "endpoint_url": "the demo registers this machine's loopback URL with its own platform",
}
"""Settings ``--demo`` replaces: as flags with it they would be ignored without a word, so they are
refused; set in the environment or the config file they are most likely there for serving for real,
so the demo runs and says that it ignores them (``demo_ignores``)."""


def refuse_with_demo(loaded: LoadedSettings, flags: dict[str, Any]) -> None:
    """``--demo`` with a flag it replaces, or with settings it cannot serve with, from any source
    (a tunnel would make the demo public; another engine cannot serve its bundled GGUF)."""
    for name, why in DEMO_SETS.items():
        if flags.get(name) not in (None, False):  # --register (no_register False) asks for what the demo does
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"--demo and {flag} do not go together: {why}; drop {flag}")
    settings, sources = loaded.settings, loaded.sources
    if settings.tunnel:
        raise ConfigError(f"--demo and tunnel = {settings.tunnel} (from {sources['tunnel']}) do not go together: the demo stays on this machine")
    if settings.engine is not EngineKind.llama_cpp:
        raise ConfigError(
            f"--demo and engine = {settings.engine.value} (from {sources['engine']}) do not go together: "
            "the demo serves a GGUF with the llama.cpp engine"
        )


DEMO_MODEL_SETTINGS = ("model", "quant")
"""The demo serves the bundled tiny model, or one given with --model: a model set in the environment
or the config file is there for serving for real (a download of gigabytes, or a Hub the demo may
not reach), so it is ignored and named in the demo's warning line."""


def _set_for_real(loaded: LoadedSettings, name: str) -> bool:
    return getattr(loaded.settings, name) is not None and loaded.sources[name] != "default" and not loaded.sources[name].startswith("flag")


def demo_model(loaded: LoadedSettings) -> Settings:
    """The settings the demo serves with: the model the environment or the config file names, left out."""
    if not _set_for_real(loaded, "model"):
        return loaded.settings
    return loaded.settings.model_copy(update={"model": None})


def demo_ignores(loaded: LoadedSettings) -> list[str]:
    """The one line ``--demo`` says about the settings it replaces that the environment or the
    config file sets (no flag gets here: ``refuse_with_demo``), or none."""
    settings, sources = loaded.settings, loaded.sources
    ignored = [
        f"{name} (from {sources[name]})"
        for name in DEMO_SETS
        # no_register false is what the demo does; the key `login` stored is for serving for real,
        # and using another one surprises nobody (every logged-in provider would get the line)
        if name != "api_key" and getattr(settings, name) not in (None, False) and sources[name] != "default"
    ]
    if _set_for_real(loaded, "model"):
        ignored += [f"{name} (from {sources[name]})" for name in DEMO_MODEL_SETTINGS if _set_for_real(loaded, name)]
    if not ignored:
        return []
    named = ", ".join(ignored[:-1]) + " and " + ignored[-1] if len(ignored) > 1 else ignored[0]
    model = "; it serves the bundled tiny model (--model serves another)" if _set_for_real(loaded, "model") else ""
    return [
        f"--demo ignores {named}: the demo runs a platform of its own on this machine and registers with it{model}; "
        f"serve without --demo uses {'them' if len(ignored) > 1 else 'it'}"
    ]
