"""The `vramsupply` command line: thin commands that parse flags and call into the package.

Commands never catch errors: every user-facing error is a ``VramsupplyError`` (see
``vramsupply/errors.py``), and ``main`` is the one place that prints it as one line and exits with
its code. ``fail`` is for the few checks a command makes on its own arguments.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vramsupply import __version__
from vramsupply.config import Settings, config_path, display_value, load_settings, write_config_values
from vramsupply.errors import Interrupted, VramsupplyError

app = typer.Typer(
    name="vramsupply",
    help="Serve GGUF models on the vram.supply marketplace.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
service_app = typer.Typer(help="Run the agent as a systemd service.", no_args_is_help=True)
app.add_typer(service_app, name="service")
models_app = typer.Typer(help="Find, download and manage GGUF models in the shared HuggingFace cache.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)


def report(message: str) -> None:
    """One readable line on stderr (printed as text: brackets in a message are not markup)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Refuse a command's own arguments: one line on stderr and a non-zero exit."""
    report(message)
    raise typer.Exit(code)


def settings_from(flags: dict[str, Any]) -> Settings:
    return load_settings(flags).settings


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"vramsupply {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """vramsupply: the provider agent of the vram.supply inference marketplace."""


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show every effective setting and where it came from (secrets masked)."""
    loaded = load_settings()
    rows = [(name, display_value(loaded.settings, name), loaded.sources[name]) for name in Settings.model_fields]
    if as_json:
        console.print_json(json.dumps({name: {"value": value, "source": source} for name, value, source in rows}))
        return
    table = Table(title=f"vramsupply settings (config file: {config_path()})")
    for column in ("setting", "value", "source"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
def login(
    api_key: Optional[str] = typer.Option(None, "--api-key", help="API key; prompted for (hidden) when omitted."),
) -> None:
    """Store your vram.supply API key in the config file (mode 0600)."""
    key = api_key if api_key is not None else typer.prompt("vram.supply API key", hide_input=True)
    key = key.strip()
    if not key or any(ch.isspace() for ch in key):
        fail("the API key must be a single non-empty word")
    path = config_path()
    write_config_values(path, {"api_key": key})
    console.print(f"API key saved to {path} (mode 0600).")


USER_UNIT_OPTION = typer.Option(False, "--user", help="The per-user service (systemctl --user) instead of the system one.")
UNIT_DIR_OPTION = typer.Option(None, "--unit-dir", help="Directory for the unit file (default: systemd's own).")
ENV_FILE_OPTION = typer.Option(None, "--env-file", help="Settings file the unit reads (default: /etc/vramsupply/env; with --user ~/.config/vramsupply/env).")


@service_app.command("install")
def service_install(user: bool = USER_UNIT_OPTION, unit_dir: Optional[Path] = UNIT_DIR_OPTION, env_file: Optional[Path] = ENV_FILE_OPTION) -> None:
    """Write the systemd unit and an env file (0600) from the current settings, then enable and start it."""
    from vramsupply.service.installer import install, service_target

    install(service_target(user, unit_dir, env_file), typer.echo)


@service_app.command("uninstall")
def service_uninstall(
    user: bool = USER_UNIT_OPTION,
    unit_dir: Optional[Path] = UNIT_DIR_OPTION,
    env_file: Optional[Path] = ENV_FILE_OPTION,
    purge: bool = typer.Option(False, "--purge", help="Also remove the env file with your settings."),
) -> None:
    """Stop and disable the service and remove its unit (the env file stays unless --purge)."""
    from vramsupply.service.installer import service_target, uninstall

    uninstall(service_target(user, unit_dir, env_file), purge, typer.echo)


@service_app.command("status")
def service_status(user: bool = USER_UNIT_OPTION) -> None:
    """Show the service's state (systemctl status)."""
    from vramsupply.service.installer import passthrough, service_target, status_command

    raise typer.Exit(passthrough(status_command(service_target(user))))


@service_app.command("logs")
def service_logs(
    user: bool = USER_UNIT_OPTION,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: Optional[int] = typer.Option(None, "--lines", "-n", min=0, help="Show only the last N lines."),
) -> None:
    """Show the service's log (journalctl)."""
    from vramsupply.service.installer import logs_command, passthrough, service_target

    raise typer.Exit(passthrough(logs_command(service_target(user), follow, lines)))


@app.command()
def demand(as_json: bool = typer.Option(False, "--json", help="Print the platform's JSON (plus `advice`) instead of tables.")) -> None:
    """Show market demand per model, and pricing advice for the models you could serve."""
    from vramsupply.hub import CacheStatus, default_cache_dir, list_cached, model_id_of
    from vramsupply.platform.advice import advice_lines, advise
    from vramsupply.platform.commands import demand_view, fetch_demand, servable_models
    from vramsupply.throughput import measured_speeds

    settings = settings_from({})
    market = fetch_demand(settings)
    cached = [m.model_id for m in list_cached(settings.cache_dir or default_cache_dir()) if m.status is CacheStatus.verified]
    configured = model_id_of(settings.model) if settings.model else None
    servable = servable_models(configured, cached)
    advice = advise(market, servable, settings.output_price, measured_speeds())
    if as_json:
        console.print_json(json.dumps({**market.model_dump(mode="json"), "advice": [a.as_json() for a in advice]}))
        return
    console.print(demand_view(market, servable))
    for item in advice:
        console.print("\n".join(advice_lines(item)), highlight=False, soft_wrap=False)


@app.command()
def earnings(
    since: str = typer.Option("30d", "--since", help="Window to report: 24h, 7d, 30d (any number of h or d)."),
    by: str = typer.Option("model", "--by", help="Table rows: model or day."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (exact money amounts) instead of a table and chart."),
) -> None:
    """Show what this agent served and earned, from its local ledger: a table and a per-day chart."""
    from vramsupply.ledger import default_ledger_path
    from vramsupply.ledger.report import By, dumps, earnings_report, render

    if by not in By.__members__:
        fail(f"--by {by!r}: choose model or day")
    path = default_ledger_path()
    report = earnings_report(path, since)
    if as_json:
        print(dumps(report.as_json()))
    else:
        console.print(render(report, By(by), path), highlight=False)


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to measure (default: the model setting)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Quantization, e.g. Q4_K_M (default: the quant setting)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Slots to fill in the second phase (default: the parallel setting)."),
    seconds: float = typer.Option(30.0, "--seconds", min=3.0, max=600.0, help="About how long the whole measurement takes."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored result as JSON."),
) -> None:
    """Measure this machine's tokens per second for the model, at 1 stream and with every slot busy; serve reports it."""
    from vramsupply.throughput import default_bench_path, run_bench

    settings = settings_from({"model": model, "quant": quant, "parallel": parallel})
    result = asyncio.run(run_bench(settings, seconds, progress=lambda line: err_console.print(f"bench: {line}", highlight=False)))
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    console.print(
        f"{result.model}: {result.single_stream_tokens_per_second:,.1f} tok/s with 1 stream, "
        f"{result.all_slots_tokens_per_second:,.1f} tok/s with {result.parallel} slots busy; saved to {default_bench_path()}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def rails(
    stripe: Optional[bool] = typer.Option(None, "--stripe/--no-stripe", help="Accept buyers paying with an API key (Stripe payouts)."),
    tempo: Optional[bool] = typer.Option(None, "--tempo/--no-tempo", help="Accept buyers paying per token with MPP (Tempo payouts)."),
) -> None:
    """Show or change which buyer payment rails are routed to you (at least one stays enabled)."""
    from vramsupply.platform.commands import apply_rails, rails_table, rails_update

    current = apply_rails(settings_from({}), rails_update(stripe, tempo))
    console.print(rails_table(current))


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show the local agent's health and its registration with the platform (exit 1 when not serving)."""
    from vramsupply.platform import default_state_path
    from vramsupply.platform.commands import agent_status, status_table

    report = agent_status(settings_from({}), default_state_path())
    if as_json:
        console.print_json(json.dumps(report.as_json()))
    else:
        console.print(status_table(report))
    raise typer.Exit(0 if report.healthy else 1)


@app.command()
def devplatform(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8787, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Accept this API key instead of generating one (survives restarts)."),
    health_interval: float = typer.Option(60.0, "--health-interval", min=0.05, help="Seconds between health checks of providers."),
) -> None:
    """Run the local reference platform (in memory) and print its URL and a generated API key."""
    from vramsupply.devplatform import DevPlatform, PlatformOptions, serve_forever

    platform = DevPlatform(api_key=api_key, options=PlatformOptions(health_interval=health_interval))

    def announce(url: str) -> None:
        console.print(f"reference platform listening on {url}", highlight=False)
        console.print(f"API key: {platform.api_key}", highlight=False)
        console.print(f"use it with: export VRAM_SUPPLY_PLATFORM_URL={url} VRAM_SUPPLY_API_KEY={platform.api_key}", highlight=False, soft_wrap=True)
        console.print("Ctrl-C stops it (all state is in memory).", highlight=False)

    asyncio.run(serve_forever(platform, host, port, announce))
    console.print("reference platform stopped")


QUANT_OPTION = typer.Option(None, "--quant", help="Quantization, e.g. Q4_K_M (default: the quant setting).")
CACHE_DIR_OPTION = typer.Option(None, "--cache-dir", help="HuggingFace cache dir (default: the cache_dir setting, else the shared HF cache).")
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


@models_app.command("resolve")
def models_resolve(
    model: str = typer.Argument(..., help="org/model, or the id of a GGUF repo."),
    quant: Optional[str] = QUANT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show which GGUF repo, commit and file(s) a model and quant resolve to, without downloading."""
    from vramsupply.hub import HubAccess, is_local_path, resolve
    from vramsupply.hub.views import resolved_json, resolved_table

    if is_local_path(model):
        fail(f"{model} is a local file: only HuggingFace ids are resolved (serve and models pull accept local paths)")
    settings = settings_from({"quant": quant})
    resolved = resolve(model, settings.quant, access=HubAccess.from_env(settings.download_timeout), publishers=settings.gguf_publishers)
    if as_json:
        console.print_json(json.dumps(resolved_json(resolved)))
    else:
        console.print(resolved_table(resolved))


@models_app.command("pull")
def models_pull(
    model: str = typer.Argument(..., help="org/model, a GGUF repo id, or a local .gguf path (checked only)."),
    quant: Optional[str] = QUANT_OPTION,
    cache_dir: Optional[Path] = CACHE_DIR_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Download and verify a model into the cache (resumes an interrupted download)."""
    from vramsupply.hub import prepare_configured
    from vramsupply.hub.views import local_model_json

    settings = settings_from({"quant": quant, "cache_dir": cache_dir})
    local = prepare_configured(model, settings, progress=True)
    if as_json:
        console.print_json(json.dumps(local_model_json(local)))
    else:
        console.print(" ".join(filter(None, (local.model_id, local.quant, "ready:", str(local.path)))), highlight=False, soft_wrap=True)


@models_app.command("list")
def models_list(cache_dir: Optional[Path] = CACHE_DIR_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List the models vramsupply downloaded, with sizes and whether they are verified."""
    from vramsupply.hub import default_cache_dir, list_cached
    from vramsupply.hub.views import cached_json, cached_table

    cache = settings_from({"cache_dir": cache_dir}).cache_dir or default_cache_dir()
    models = list_cached(cache)
    if as_json:
        console.print_json(json.dumps(cached_json(models)))
    elif not models:
        console.print(f"no models downloaded by vramsupply in {cache}", highlight=False)
    else:
        console.print(cached_table(models, cache))


@models_app.command("rm")
def models_rm(
    model: Optional[str] = typer.Argument(None, help="org/model or GGUF repo id to remove (all its quants)."),
    remove_all: bool = typer.Option(False, "--all", help="Remove every model vramsupply downloaded."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    cache_dir: Optional[Path] = CACHE_DIR_OPTION,
) -> None:
    """Remove downloaded models from the cache; files other tools still use are kept."""
    from rich.filesize import decimal

    from vramsupply.hub import default_cache_dir, list_cached, remove_cached

    if (model is None) == (not remove_all):
        fail("name one model (org/model or GGUF repo id) or pass --all")
    cache = settings_from({"cache_dir": cache_dir}).cache_dir or default_cache_dir()
    doomed = list_cached(cache, model)
    if not doomed:
        if remove_all:
            console.print(f"no models downloaded by vramsupply in {cache}", highlight=False)
            return
        fail(f"no downloaded model matches {model}; `vramsupply models list` shows what is in {cache}")
    if not yes:
        if not sys.stdin.isatty():
            fail("refusing to delete models without confirmation: pass --yes")
        for item in doomed:
            console.print(f"  {item.model_id} {item.quant} ({item.repo_id}, {decimal(item.on_disk)})", highlight=False)
        if not typer.confirm(f"Remove {len(doomed)} model(s) from {cache}?"):
            fail("nothing removed")
    removed = remove_cached(cache, model)
    for item in removed:
        console.print(f"removed {item.model_id} {item.quant} ({item.repo_id}, {decimal(item.on_disk)})", highlight=False)


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
    context_length: Optional[int] = typer.Option(None, "--context-length", help="Context window per slot, in tokens."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Slots: requests decoded concurrently."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show the memory each quant needs on this machine's devices and which fits, before any download (exit 1: nothing fits)."""
    from vramsupply.gpu.planning import plan_for, plan_summary, plan_table

    settings = settings_from({"model": model, "quant": quant, "context_length": context_length, "parallel": parallel})
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
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A local .gguf path or org/model on HuggingFace (default: the model setting)."),
    quant: Optional[str] = QUANT_OPTION,
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default: the host setting, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port to listen on; 0 picks a free one (default: the port setting, 8080)."),
    context_length: Optional[int] = typer.Option(None, "--context-length", "--max-model-len", help="Context window per request, in tokens (vLLM's --max-model-len)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Slots: requests decoded concurrently."),
    n_gpu_layers: Optional[int] = typer.Option(None, "--n-gpu-layers", help="Layers offloaded to the GPU (-1: all)."),
    n_batch: Optional[int] = typer.Option(None, "--n-batch", help="Maximum tokens per decode step (default 2048)."),
    n_ubatch: Optional[int] = typer.Option(None, "--n-ubatch", help="Physical micro-batch size (default 512)."),
    flash_attention: Optional[str] = typer.Option(None, "--flash-attention", help="auto, on or off (default auto)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for decoding and prompts (default: physical cores to decode, all CPUs for prompts)."),
    cache_type_k: Optional[str] = typer.Option(None, "--cache-type-k", help="KV cache type for keys: f16, q8_0 or q4_0."),
    cache_type_v: Optional[str] = typer.Option(None, "--cache-type-v", help="KV cache type for values: f16, q8_0 or q4_0 (quantized needs flash attention)."),
    split_mode: Optional[str] = typer.Option(None, "--split-mode", help="Split across GPUs by layer, row, or none."),
    main_gpu: Optional[int] = typer.Option(None, "--main-gpu", help="The GPU for the whole model with --split-mode none."),
    tensor_split: Optional[str] = typer.Option(None, "--tensor-split", help="Share of the model per GPU, e.g. 3,1."),
    devices: Optional[str] = typer.Option(None, "--devices", help="GPUs to use, e.g. CUDA0,CUDA1 (vramsupply doctor lists them)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests that may wait for a slot before new ones get 429."),
    stall_timeout: Optional[float] = typer.Option(None, "--stall-timeout", help="Seconds a decode step may run while requests wait before the engine counts as failed (default 600)."),
    cache_ram: Optional[int] = typer.Option(None, "--cache-ram", help="MiB of RAM for the prompt cache (default: 1/4 of free RAM, at most 8192; 0: off)."),
    draft_max: Optional[int] = typer.Option(None, "--draft-max", help="Tokens prompt lookup may draft per step for a lone request (default: 8 on a GPU, 0 = off on a CPU)."),
    backend_sampling: Optional[bool] = typer.Option(None, "--backend-sampling", help="Sample on the device, so logits never cross to the host (for GPUs)."),
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
    no_register: Optional[bool] = typer.Option(None, "--no-register", help="Serve locally only: do not register with the platform."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help="Public base URL the platform routes buyers to (required to register)."),
    tunnel: Optional[str] = typer.Option(None, "--tunnel", help="Get a public URL from a tunnel tool instead of --endpoint-url: cloudflared."),
    input_price: Optional[int] = typer.Option(None, "--input-price", help="Input price, cents per million tokens (default 100)."),
    output_price: Optional[int] = typer.Option(None, "--output-price", help="Output price, cents per million tokens (default 200)."),
    context_length_offered: Optional[int] = typer.Option(None, "--context-length-offered", help="Context advertised to buyers (default: the served context)."),
    heartbeat_interval: Optional[float] = typer.Option(None, "--heartbeat-interval", help="Seconds between heartbeats (default 30)."),
    platform_url: Optional[str] = typer.Option(None, "--platform-url", help="Platform API base URL (default https://vram.supply)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="vram.supply API key (default: the one `vramsupply login` stored)."),
    cache_dir: Optional[Path] = CACHE_DIR_OPTION,
    log_level: Optional[str] = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    demo: bool = typer.Option(False, "--demo", help="Run a local reference platform in-process, serve the bundled tiny model, register and buy one answer."),
) -> None:
    """Serve a model (a GGUF with llama.cpp, or through vLLM, SGLang or a running server) until Ctrl-C or SIGTERM."""
    flags = dict(locals())  # every parameter is named after the setting it overrides
    flags.pop("demo")
    from vramsupply.devplatform.demo import DemoHook
    from vramsupply.serve import run_serve

    from vramsupply.devplatform.demo import DemoHook
    from vramsupply.serve import run_serve
    from vramsupply.server import loop

    loop.run(run_serve(settings_from(flags), hook=DemoHook() if demo else None))


def main() -> None:
    """The CLI's one error boundary: a known error becomes one line on stderr and its exit code.

    Usage errors (unknown flag, bad type) are typer's, formatted and exited (2) inside ``app()``.
    An interrupt that reaches here arrived outside any command's own signal handling (while
    Python was still importing, say): exit 130 quietly, as a shell expects.
    """
    try:
        app()
    except VramsupplyError as exc:
        report(str(exc))
        sys.exit(exc.exit_code)
    except OSError as exc:  # the system refused something no module turned into a VramsupplyError
        report(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc))
        sys.exit(1)
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(Interrupted.exit_code)
