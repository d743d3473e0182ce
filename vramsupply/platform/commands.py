"""What `vramsupply demand`, `rails` and `status` do, so the CLI only parses flags and prints.

Every function raises ``PlatformError`` (one readable line) for anything the user must fix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.table import Table
from rich.text import Text

from vramsupply.config import ConfigError, Settings
from vramsupply.platform import api
from vramsupply.platform.advice import asked_price, consistent, count_text
from vramsupply.platform.client import PlatformClient, PlatformError
from vramsupply.display import plain, shown
from vramsupply.platform.state import Phase, RegistrationState

T = TypeVar("T")
MAX_WARNINGS_SHOWN = 10
CLOCK_SLACK_SECONDS = 60
SECONDS_PER_YEAR = 365 * 24 * 3600
RAIL_BUYERS = {
    "accepts_stripe": "buyers paying with an API key (Bearer sk-…), Stripe payouts",
    "accepts_tempo": "buyers paying per token with MPP (Payment), Tempo payouts",
}


def api_key_of(settings: Settings) -> str:
    if settings.api_key is None or not settings.api_key.get_secret_value():
        raise PlatformError("no API key: run `vramsupply login` or set VRAM_SUPPLY_API_KEY")
    return settings.api_key.get_secret_value()


def fetch_demand(settings: Settings) -> api.DemandResponse:
    return asyncio.run(_with_client(settings, lambda client: client.demand()))


def rails_update(stripe: bool | None, tempo: bool | None) -> api.RailsUpdate | None:
    """The change asked for on the command line; refusing both-off here, before any API call."""
    if stripe is False and tempo is False:
        raise ConfigError("refusing to disable both payment rails: at least one of Stripe and Tempo must stay enabled, or no buyer can reach you")
    if stripe is None and tempo is None:
        return None
    return api.RailsUpdate(accepts_stripe=stripe, accepts_tempo=tempo)


def apply_rails(settings: Settings, update: api.RailsUpdate | None) -> api.Rails:
    """The account's rails after ``update`` (or as they are, when there is nothing to change)."""
    if update is None:
        return asyncio.run(_with_client(settings, lambda client: client.rails()))
    return asyncio.run(_with_client(settings, lambda client: client.set_rails(update)))


async def _with_client(settings: Settings, call: Callable[[PlatformClient], Awaitable[T]]) -> T:
    async with PlatformClient(settings.platform_url, api_key_of(settings)) as client:
        return await call(client)


def servable_models(configured: str | None, cached: Iterable[str]) -> set[str]:
    """Marketplace ids this provider could serve: the configured model's and the ``cached`` ones."""
    return {model_id.lower() for model_id in (*cached, *([configured] if configured else []))}


def _price_range(prices: api.PriceRange | None) -> Text | str:
    if prices is None:
        return "-"
    if not consistent(prices):  # the numbers are shown in the advice (servable models) and in --json
        return Text("inconsistent", style="yellow")
    if prices.min == prices.max:
        return asked_price(prices.min)
    return f"{asked_price(prices.min)}–{asked_price(prices.max)}"


def demand_view(demand: api.DemandResponse, servable: set[str]) -> Table | Text:
    """Models you could serve first (starred), then by requests in the last 24 h."""
    if not demand.models:
        return Text("The platform reports no demand yet: no model has providers or requests.")
    mine_listed = any(entry.model.lower() in servable for entry in demand.models)
    table = Table(title="Market demand (prices per million tokens)", caption="★ a model you could serve" if mine_listed else None)
    table.add_column("model")
    for column in ("requests 24h", "online providers", "input price", "output price"):
        table.add_column(column, justify="right")
    rows = sorted(demand.models, key=lambda m: (m.model.lower() not in servable, -m.requests_24h, m.model))
    for entry in rows:
        mine = entry.model.lower() in servable
        table.add_row(
            Text(("★ " if mine else "  ") + plain(entry.model), style="bold green" if mine else ""),
            count_text(entry.requests_24h),
            count_text(entry.online_providers),
            _price_range(entry.input_price_per_million),
            _price_range(entry.output_price_per_million),
        )
    return table


def rails_table(rails: api.Rails) -> Table:
    table = Table(title="Payment rails (who can be routed to you)")
    for column in ("rail", "enabled", "buyers"):
        table.add_column(column)
    for name, label in (("accepts_stripe", "Stripe"), ("accepts_tempo", "Tempo (MPP)")):
        enabled = getattr(rails, name)
        table.add_row(label, Text("yes" if enabled else "no", style="green" if enabled else "red"), RAIL_BUYERS[name])
    return table


@dataclass(frozen=True)
class AgentStatus:
    """The local agent's /health answer and the registration state its lifecycle recorded."""

    url: str
    health: dict[str, Any] | None
    health_error: str | None
    registration: RegistrationState | None
    registration_current: bool
    unreadable_record: Path | None = None  # a registration file is there, but holds no record this version reads

    @property
    def healthy(self) -> bool:
        return self.health is not None and self.health.get("status") == "ok"

    def as_json(self) -> dict[str, Any]:
        return {
            "agent": {"url": self.url, "healthy": self.healthy, "health": self.health, "error": self.health_error},
            "registration": None if self.registration is None else {**self.registration.model_dump(mode="json"), "current": self.registration_current},
        }


def status_table(status: AgentStatus) -> Table:
    """Every value in it came from outside (the agent's /health, the state file): shown as plain text."""
    table = Table(title="vramsupply status", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("state")
    if status.health is not None:
        _health_rows(table, status)
    else:
        table.add_row("agent", shown(status.health_error or "not running", style="red"))
    _registration_rows(table, status)
    return table


def _health_rows(table: Table, status: AgentStatus) -> None:
    health = status.health or {}
    state = shown(health.get("status", "?"), style="green" if status.healthy else "yellow")
    table.add_row("agent", Text.assemble(state, "  ", shown(status.url)))
    for key in ("model", "slots_busy", "slots_idle", "queue"):
        if key in health:
            table.add_row(key.replace("_", " "), shown(health[key]))
    placement = health.get("placement")
    if isinstance(placement, dict):
        devices = ", ".join(plain(d.get("name") if isinstance(d, dict) else d) for d in _listed(placement.get("devices")))
        layers = f"{plain(placement.get('layers_on_gpu'))}/{plain(placement.get('layers_total'))}"
        table.add_row("runs on", shown(f"{devices}; {layers} layers on the GPU"))
    warnings = _listed(health.get("warnings"))
    for warning in warnings[:MAX_WARNINGS_SHOWN]:
        table.add_row(Text("WARNING", style="bold red"), shown(warning, style="red"))
    if len(warnings) > MAX_WARNINGS_SHOWN:
        table.add_row("", Text(f"… and {len(warnings) - MAX_WARNINGS_SHOWN:,} more warnings (`vramsupply status --json` lists them)", style="red"))


def _listed(value: object) -> list[object]:
    """A /health list as a list: a single value as one item, nothing as none (never a string's letters)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _registration_rows(table: Table, status: AgentStatus) -> None:
    registration = status.registration
    if registration is None:
        table.add_row("registration", _no_record(status.unreadable_record))
        return
    current = status.registration_current
    phase = registration.phase.value if current else f"{registration.phase.value} (stale: process {registration.pid} is not running)"
    table.add_row("registration", Text(phase, style="green" if registration.phase is Phase.registered and current else "yellow"))
    table.add_row("provider id", shown(registration.provider_id or "-"))
    table.add_row("platform", shown(registration.platform_url))
    table.add_row("endpoint", shown(registration.endpoint_url))
    table.add_row("last heartbeat", _ago(registration.last_heartbeat_at))
    table.add_row("detail", shown(registration.message))


def _no_record(unreadable: Path | None) -> Text:
    if unreadable is None:
        return Text("none recorded (the agent has not tried to register)")
    return Text(
        f"none recorded: {plain(unreadable)} holds no record this version can read (damaged, or written by another "
        "version); an agent of this version rewrites it at its next heartbeat"
    )


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    age = time.time() - timestamp
    if age < -CLOCK_SLACK_SECONDS:
        return "recorded as in the future (the clock was set back since?)"
    return f"{max(0.0, age):.0f}s ago" if age < SECONDS_PER_YEAR else "over a year ago"
