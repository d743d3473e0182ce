"""The marketplace from the provider's side: demand, earnings, payment rails, the agent's status, and the local reference platform.

What these commands print comes largely from outside (the platform, the state file, the agent's
/health): it is printed as ``Text`` or through ``vramsupply.display``, never as rich markup.
"""

from __future__ import annotations

import asyncio
import math
import shlex
from typing import TYPE_CHECKING, Optional

import typer
from rich.text import Text

from .app import app, console, fail, settings_from

if TYPE_CHECKING:
    from vramsupply.platform.commands import AgentStatus, Earning
    from vramsupply.platform.state import RegistrationState


@app.command()
def demand(
    as_json: bool = typer.Option(False, "--json", help="Print the platform's JSON (plus `advice`) instead of tables."),
    output_price: Optional[int] = typer.Option(
        None, "--output-price", help="Advise on this output price, cents per million tokens (default: what the running agent asks, else the configured price)."
    ),
) -> None:
    """Show market demand per model, and pricing advice for the models you could serve."""
    from vramsupply.hub import CacheStatus, default_cache_dir, list_cached, model_id_of
    from vramsupply.platform.advice import advice_lines, advise
    from vramsupply.platform.commands import demand_view, fetch_demand, servable_models
    from vramsupply.platform.state import running_offer
    from vramsupply.display import json_text
    from vramsupply.throughput import measured_speeds

    settings = settings_from({} if output_price is None else {"output_price": output_price})  # no key: fetch_demand's MissingSetting
    market = fetch_demand(settings)
    cached = [m.model_id for m in list_cached(settings.cache_dir or default_cache_dir()) if m.status is CacheStatus.verified]
    configured = model_id_of(settings.model) if settings.model else None
    running = running_offer()
    servable = servable_models(configured, [*cached, *([running.model] if running is not None else [])])
    price, price_from = (
        (settings.output_price, "--output-price") if output_price is not None
        else (running.output_price, "what your running agent asks") if running is not None
        else (settings.output_price, "")
    )  # fmt: skip
    input_price = running.input_price if running is not None and running.input_price is not None else settings.input_price
    offering = running.model if running is not None else None
    advice = advise(market, servable, price, measured_speeds(), price_from, offering, input_price)
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
    from vramsupply.cli.local_agent import service_data
    from vramsupply.ledger import default_ledger_path
    from vramsupply.ledger import LedgerError
    from vramsupply.ledger.report import By, dumps, earnings_report, parse_since, render

    if by not in By.__members__:
        fail(f"--by {by!r}: choose model or day")
    try:
        parse_since(since)  # a bad window is a bad flag (exit 2), said before the ledger is opened
    except LedgerError as exc:
        fail(str(exc))
    path = default_ledger_path()
    report = earnings_report(path, since)
    service = service_data("earnings") if not path.exists() else None  # the system service's ledger is elsewhere
    if as_json:
        print(dumps({**report.as_json(), **({"service": service.as_json()} if service is not None else {})}))
    else:
        console.print(render(report, By(by), path), highlight=False, markup=False)  # model names in the ledger are no markup
        if service is not None:
            console.print(service.line("earnings ledger"), highlight=False, markup=False, soft_wrap=True)


@app.command()
def rails(
    stripe: Optional[bool] = typer.Option(None, "--stripe/--no-stripe", help="Accept buyers paying with an API key (Stripe payouts)."),
    tempo: Optional[bool] = typer.Option(None, "--tempo/--no-tempo", help="Accept buyers paying per token with MPP (Tempo payouts)."),
) -> None:
    """Show or change which buyer payment rails are routed to you (at least one stays enabled)."""
    from vramsupply.platform.commands import apply_rails, rails_table, rails_update

    update = rails_update(stripe, tempo)  # both off is refused first: it is refused whatever the key
    current = apply_rails(settings_from({}), update)
    console.print(rails_table(current))


STATUS_SERVING, STATUS_NOT_SERVING, STATUS_NOT_LISTED = 0, 1, 3
"""`vramsupply status`'s exit codes. 0: the agent serves (also degraded: buyers are served, the
warning says what is wrong) and is listed on the platform (or serves with --no-register, as asked).
1: no agent serves (none answers, or it is loading, draining, failed). 3: it serves but is not known
to be listed: not listed (registering, rejected, platform unreachable, or no record of its
registration), or its record is stale (not rewritten for a few heartbeat intervals): it serves, so
not 1, but nothing says the platform still lists it, so not 0. Not 2: that is every command's code
for an invalid flag or setting."""


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show the local agent's health, its registration with the platform, its prices and the last 24 h it earned.

    Exit 0 when it serves and is listed (or serves with --no-register), 1 when no agent serves,
    3 when it serves but is not listed on the platform (rejected, unreachable, registering) or its
    registration record is stale."""
    from vramsupply.cli.local_agent import service_data
    from vramsupply.platform.commands import status_table
    from vramsupply.display import json_text

    report, note = _agent_report()
    earning = _earning(report)
    service = service_data("status") if _found_nothing(report) else None
    if as_json:
        extra = {"service": service.as_json()} if service is not None else {}
        console.print(json_text({**report.as_json(), "earnings": earning.as_json(), **extra}), soft_wrap=True)
    else:
        table = status_table(report, earning)
        if note:
            table.add_row("record", Text(note, style="yellow"))
        console.print(table)
        if service is not None:  # below the table, whole: the command is to be copied
            console.print(Text(service.line("agent or registration record"), style="yellow"), soft_wrap=True)
    raise typer.Exit(_status_code(report))


def _found_nothing(report: AgentStatus) -> bool:
    """No agent answers, none is starting, and none ever left a record in this user's data dir."""
    from vramsupply.instance_lock import lock_holder

    return report.registration is None and report.unreadable_record is None and report.health is None and lock_holder() is None


def _earning(report: AgentStatus) -> Earning:
    """The prices the running agent asks (its record), and the last 24 h of the local ledger; a
    ledger that cannot be read is said in the view, and changes no exit code."""
    from vramsupply.ledger import LedgerError, default_ledger_path
    from vramsupply.ledger.report import earnings_report
    from vramsupply.platform.commands import Earning

    record = report.registration if report.registration_current else None
    output_price = record.output_price if record is not None else None
    recorded_input = record.input_price if record is not None else None  # None from an agent before 2026-12-06
    input_price = recorded_input if recorded_input is not None else settings_from({}).input_price
    try:
        day, error = earnings_report(default_ledger_path(), "24h").total, None
    except LedgerError as exc:
        day, error = None, str(exc)
    offers = "agent" if recorded_input is not None else "settings"
    unread = report.health is not None and report.unreadable_record is not None  # an agent answers, its record cannot be read
    return Earning(output_price, input_price if output_price is not None else None, offers, day, error, _no_prices(record, unread))


def _no_prices(record: RegistrationState | None, unread: bool = False) -> str:
    from vramsupply.platform.state import Phase

    if record is None:
        return "the running agent's record, which holds them, cannot be read (see registration)" if unread else "no agent runs"
    if record.phase is Phase.not_registering:
        return "the running agent serves without registering (--no-register): it offers nothing on the market"
    return "the running agent recorded no price"


def _agent_report() -> tuple[AgentStatus, str | None]:
    """What answers where the running agent listens (from its record, or the settings), and why
    the record is not the running agent's, when it is not."""
    from vramsupply.instance_lock import lock_holder
    from vramsupply.platform.commands import AgentStatus, stale_after
    from vramsupply.platform.state import default_state_path, find_agent, probe_health, record_problem

    settings, path = settings_from({}), default_state_path()
    found = find_agent(path, settings.host, settings.port)
    recorded_url = found.record is not None and found.earlier_run is None  # where the running agent said it listens
    health, error = asyncio.run(probe_health(found.url, vouched=recorded_url))
    note = found.earlier_run
    starting = lock_holder(path.parent) if health is None else None
    if starting is not None and (found.record is None or found.earlier_run is not None):
        error = (
            f"agent process {starting} is starting: not listening yet (downloading or preparing its model), or it could not "
            "record where it listens (a full or read-only data dir: its log says so)"
        )
        note = note and f"{note}; the starting agent replaces it once it listens"
    unreadable = record_problem(path) if found.record is None else None  # a data dir it may not enter too: said, not the end of status
    # The heartbeat interval the agent recorded (a --heartbeat-interval flag given to serve included),
    # else as the agent would read it (environment, config file); stale_after caps the limit at 180 s.
    recorded = found.record.heartbeat_interval if found.record is not None else None
    fresh_for = stale_after(recorded or settings.heartbeat_interval)
    return AgentStatus(found.url, health, error, found.record, found.earlier_run is None, unreadable, fresh_for), note


def _status_code(report: AgentStatus) -> int:
    from vramsupply.platform.state import Phase

    if not report.serving:
        return STATUS_NOT_SERVING
    record = report.registration
    listed = record is not None and report.registration_current and record.phase in (Phase.registered, Phase.not_registering)
    listed = listed and not report.registration_stale
    return STATUS_SERVING if listed else STATUS_NOT_LISTED


MIN_HEALTH_INTERVAL, MAX_HEALTH_INTERVAL = 0.05, 86400.0


@app.command()
def devplatform(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8787, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Accept this API key instead of generating one (survives restarts)."),
    health_interval: float = typer.Option(60.0, "--health-interval", help="Seconds between health checks of providers."),
) -> None:
    """Run the local reference platform (in memory) and print its URL and a generated API key."""
    from vramsupply.devplatform import DevPlatform, PlatformOptions, serve_forever

    if not (math.isfinite(health_interval) and MIN_HEALTH_INTERVAL <= health_interval <= MAX_HEALTH_INTERVAL):  # nan and inf too
        fail(f"--health-interval must be a number of seconds from {MIN_HEALTH_INTERVAL:g} to {MAX_HEALTH_INTERVAL:g}, got {health_interval:g}")
    platform = DevPlatform(api_key=api_key, options=PlatformOptions(health_interval=health_interval))

    def announce(url: str) -> None:  # the key is the user's own text (--api-key): no markup
        console.print(f"reference platform listening on {url}", highlight=False, markup=False)
        console.print(f"API key: {platform.api_key}", highlight=False, markup=False)
        exports = f"VRAM_SUPPLY_PLATFORM_URL={shlex.quote(url)} VRAM_SUPPLY_API_KEY={shlex.quote(platform.api_key)}"  # pasted into a shell
        console.print(f"use it with: export {exports}", highlight=False, markup=False, soft_wrap=True)
        console.print("Ctrl-C stops it (all state is in memory).", highlight=False)

    asyncio.run(serve_forever(platform, host, port, announce))
    console.print("reference platform stopped")
