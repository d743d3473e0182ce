"""The marketplace from the provider's side: demand, earnings, payment rails, the agent's status, and the local reference platform.

What these commands print comes largely from outside (the platform, the state file, the agent's
/health): it is printed as ``Text`` or through ``vramsupply.display``, never as rich markup.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import typer
from rich.text import Text

from .app import app, console, fail, settings_from


@app.command()
def demand(as_json: bool = typer.Option(False, "--json", help="Print the platform's JSON (plus `advice`) instead of tables.")) -> None:
    """Show market demand per model, and pricing advice for the models you could serve."""
    from vramsupply.hub import CacheStatus, default_cache_dir, list_cached, model_id_of
    from vramsupply.platform.advice import advice_lines, advise
    from vramsupply.platform.commands import demand_view, fetch_demand, servable_models
    from vramsupply.display import json_text
    from vramsupply.throughput import measured_speeds

    settings = settings_from({})
    market = fetch_demand(settings)
    cached = [m.model_id for m in list_cached(settings.cache_dir or default_cache_dir()) if m.status is CacheStatus.verified]
    configured = model_id_of(settings.model) if settings.model else None
    servable = servable_models(configured, cached)
    advice = advise(market, servable, settings.output_price, measured_speeds())
    if as_json:
        console.print(json_text({**market.model_dump(mode="json"), "advice": [a.as_json() for a in advice]}), soft_wrap=True)
        return
    console.print(demand_view(market, servable))
    for item in advice:
        console.print(Text("\n".join(advice_lines(item))), soft_wrap=False)


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
        console.print(render(report, By(by), path), highlight=False, markup=False)  # model names in the ledger are no markup


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
    from vramsupply.display import json_text

    report = agent_status(settings_from({}), default_state_path())
    if as_json:
        console.print(json_text(report.as_json()), soft_wrap=True)
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

    def announce(url: str) -> None:  # the key is the user's own text (--api-key): no markup
        console.print(f"reference platform listening on {url}", highlight=False, markup=False)
        console.print(f"API key: {platform.api_key}", highlight=False, markup=False)
        console.print(f"use it with: export VRAM_SUPPLY_PLATFORM_URL={url} VRAM_SUPPLY_API_KEY={platform.api_key}", highlight=False, markup=False, soft_wrap=True)
        console.print("Ctrl-C stops it (all state is in memory).", highlight=False)

    asyncio.run(serve_forever(platform, host, port, announce))
    console.print("reference platform stopped")
