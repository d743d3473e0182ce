"""What `vramsupply demand`, `rails` and `status` do, so the CLI only parses flags and prints.

Every function raises ``PlatformError`` (one readable line) for anything the user must fix.

`status` believes the registration record only while it is fresh: an agent that heartbeats rewrites
it at every heartbeat, accepted or failed, so a record of a heartbeating phase that has not been
rewritten for a few intervals no longer says what the platform lists (the agent cannot write it, a
full disk, or its lifecycle stalled). ``stale_after`` says how old is too old.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.table import Table
from rich.text import Text

from vramsupply.config import ConfigError, Settings
from vramsupply.platform import api
from vramsupply.platform.advice import asked_price, consistent, count_text
from vramsupply.platform.api_key import ApiKeySource
from vramsupply.platform.client import ApiKeyRejected, PlatformClient
from vramsupply.display import FitTable, plain, shown
from vramsupply.errors import MissingSetting
from vramsupply.platform.retry_wait import SILENT_OFFLINE_SECONDS
from vramsupply.platform.state import KeptLeftover, Phase, RegistrationState

T = TypeVar("T")
MAX_WARNINGS_SHOWN = 10
CLOCK_SLACK_SECONDS = 60
SECONDS_PER_YEAR = 365 * 24 * 3600
SERVING_STATUSES = frozenset({"ok", "degraded"})
"""/health statuses of an agent that serves buyers ("degraded": served, but the earnings ledger records nothing)."""
HEARTBEATING_PHASES = frozenset({Phase.registered, Phase.offline})
"""Phases the lifecycle rewrites the record in at every heartbeat (the others wait out backoffs of up to minutes)."""
STALE_AFTER_INTERVALS = 3
HEARTBEAT_CALL_SECONDS = 10.0
"""How long one heartbeat call may take, its retries included (``PlatformClient``'s timeout): the
record is rewritten once it is answered or given up."""
RAIL_BUYERS = {
    "accepts_stripe": "buyers paying with an API key (Bearer sk-…), Stripe payouts",
    "accepts_tempo": "buyers paying per token with MPP (Payment), Tempo payouts",
}


def api_key_of(settings: Settings) -> str:
    """The account's API key; without one, a missing setting (exit 2), said before any call."""
    if settings.api_key is None or not settings.api_key.get_secret_value():
        raise MissingSetting("no API key: run `vramsupply login` or set VRAM_SUPPLY_API_KEY")
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


def apply_rails(settings: Settings, update: api.RailsUpdate | None) -> dict[str, bool | None]:
    """The account's rails after ``update`` (or as they are, when there is nothing to change), by
    field name; None for one the platform's answer to a change does not show."""
    if update is None:
        return asyncio.run(_with_client(settings, lambda client: client.rails())).model_dump()
    shown = asyncio.run(_with_client(settings, lambda client: client.set_rails(update)))
    return shown.model_dump() if shown is not None else update.model_dump()


async def _with_client(settings: Settings, call: Callable[[PlatformClient], Awaitable[T]]) -> T:
    key = api_key_of(settings)
    async with PlatformClient(settings.platform_url, key) as client:
        try:
            return await call(client)
        except ApiKeyRejected:
            raise ApiKeyRejected(ApiKeySource.of(key).rejected_once()) from None


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
    table = FitTable(title="Market demand (prices per million tokens)", caption="★ a model you could serve" if mine_listed else None)
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


def rails_table(rails: dict[str, bool | None]) -> Table:
    table = FitTable(title="Payment rails (who can be routed to you)")
    for column in ("rail", "enabled", "buyers"):
        table.add_column(column)
    for name, label in (("accepts_stripe", "Stripe"), ("accepts_tempo", "Tempo (MPP)")):
        table.add_row(label, _enabled(rails.get(name)), RAIL_BUYERS[name])
    return table


def _enabled(enabled: bool | None) -> Text:
    if enabled is None:  # a change of the other rail, whose answer did not show this one
        return Text("unchanged (not shown)", style="dim")
    return Text("yes" if enabled else "no", style="green" if enabled else "red")


@dataclass(frozen=True)
class AgentStatus:
    """The local agent's /health answer and the registration state its lifecycle recorded.
    ``stale_after``: seconds after which a heartbeating record is no longer believed (``stale_after()``)."""

    url: str
    health: dict[str, Any] | None
    health_error: str | None
    registration: RegistrationState | None
    registration_current: bool
    unreadable_record: str | None = None  # why a registration file is there but gives no record (``record_problem``)
    stale_after: float = SILENT_OFFLINE_SECONDS

    @property
    def healthy(self) -> bool:
        return self.health is not None and self.health.get("status") == "ok"

    @property
    def serving(self) -> bool:
        """It answers buyers: healthy, or degraded (the warning says what is wrong)."""
        return self.health is not None and self.health.get("status") in SERVING_STATUSES

    @property
    def record_age(self) -> float | None:
        """Seconds since the running agent last rewrote its record (None: no record of the running agent)."""
        if self.registration is None or not self.registration_current:
            return None
        return time.time() - self.registration.updated_at

    @property
    def registration_stale(self) -> bool:
        """A heartbeating record older than ``stale_after`` (or dated in the future: written before the
        clock was set back, and not rewritten since)."""
        age = self.record_age
        if age is None or self.registration is None or self.registration.phase not in HEARTBEATING_PHASES:
            return False
        return age > self.stale_after or age < -CLOCK_SLACK_SECONDS

    def as_json(self) -> dict[str, Any]:
        registration = self.registration
        return {
            "agent": {"url": self.url, "healthy": self.healthy, "serving": self.serving, "health": self.health, "error": self.health_error},
            "registration": None
            if registration is None
            else {
                **registration.model_dump(mode="json"), "current": self.registration_current, "stale": self.registration_stale,
                # what the table's "left listed" counts: the kept leftovers and the instance a killed run named
                "waiting_to_delete": [left.model_dump(mode="json") for left in _waiting(registration)],
            },
            "registration_error": self.unreadable_record,
        }


def stale_after(heartbeat_interval: float) -> float:
    """How old a heartbeating record may be before `status` stops believing it.

    A working agent rewrites it at least every ``heartbeat_interval`` plus one call's timeout; three
    intervals forgive a heartbeat or two made late by a busy machine without calling a healthy agent
    stale, and catch a record nobody rewrites within minutes. Never more than the platform's own
    limit: after that long without a heartbeat it lists the agent offline, whatever the record says."""
    return min(STALE_AFTER_INTERVALS * heartbeat_interval + HEARTBEAT_CALL_SECONDS, SILENT_OFFLINE_SECONDS)


@dataclass(frozen=True)
class Earning:
    """What the provider earns: the prices the running agent asks (None: it offers nothing, or none
    runs) and the last 24 h of its local ledger (``day``: ``Totals`` of ``ledger.report``; None,
    with ``ledger_error``, when the ledger cannot be read). ``input_from``: "agent" when its record
    holds the input price, "settings" when only the configured one is known."""

    output_price: int | None
    input_price: int | None
    input_from: str
    day: Any
    ledger_error: str | None = None
    no_prices: str = "no agent runs"
    """Why there are no prices in force (no ``output_price``): no agent runs, or it offers nothing."""

    def as_json(self) -> dict[str, Any]:
        prices = None if self.output_price is None else {
            "output_price": self.output_price, "input_price": self.input_price, "input_price_from": self.input_from,
            "output_earned_per_million_cents": api.net_cents(self.output_price),
        }  # fmt: skip
        day = None if self.day is None else {
            name: getattr(self.day, name)
            for name in ("requests", "cut_requests", "prompt_tokens", "completion_tokens", "gross_nanocents", "earned_nanocents")
        }  # fmt: skip
        return {"prices": prices, **({} if prices else {"no_prices": self.no_prices}), "last_24h": day, "ledger_error": self.ledger_error}


def status_table(status: AgentStatus, earning: Earning | None = None) -> Table:
    """Every value in it came from outside (the agent's /health, the state file): shown as plain text."""
    table = FitTable(title="vramsupply status", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("state")
    if status.health is not None:
        _health_rows(table, status)
    else:
        table.add_row("agent", shown(status.health_error or "not running", style="red"))
    _registration_rows(table, status)
    if earning is not None:
        _earning_rows(table, earning)
    return table


def _earning_rows(table: Table, earning: Earning) -> None:
    from vramsupply.ledger.money import dollars_text
    from vramsupply.platform.offer import format_cents

    if earning.output_price is None:
        table.add_row("prices", f"none: {earning.no_prices}")
    else:
        output = f"output {format_cents(earning.output_price)} (you earn {format_cents(api.net_cents(earning.output_price))})"
        source = "" if earning.input_from == "agent" else " (configured: the agent's record holds only its output price)"
        price_in = f"input {format_cents(earning.input_price)}{source}" if earning.input_price is not None else "input unknown"
        table.add_row("prices", f"per million tokens: {output}, {price_in}")
    day = earning.day
    if day is None:
        table.add_row("last 24 h", Text(f"unknown: {earning.ledger_error}", style="yellow"))
        return
    cut = f" ({day.cut_requests:,} cut short, unpaid)" if day.cut_requests else ""
    unpaid = f", {dollars_text(day.cut_earned_nanocents)} of it recorded by an older vramsupply on cut requests, which no buyer paid" if day.cut_earned_nanocents else ""
    table.add_row(
        "last 24 h",
        f"{day.requests:,} request{'' if day.requests == 1 else 's'}{cut}, {day.prompt_tokens:,} prompt + {day.completion_tokens:,} completion tokens, "
        f"earned {dollars_text(day.earned_nanocents)}{unpaid} (from the local ledger)",
    )


def _health_rows(table: Table, status: AgentStatus) -> None:
    health = status.health or {}
    state = shown(health.get("status", "?"), style="green" if status.healthy else "yellow")  # degraded: yellow, with its warning
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
    current, stale = status.registration_current, status.registration_stale
    phase = registration.phase.value if current else f"{registration.phase.value} (left by an earlier run: process {registration.pid} is not running)"
    if stale:
        phase = f"{registration.phase.value} ({_stale_reason(status)})"
    trusted = registration.phase is Phase.registered and current and not stale
    table.add_row("registration", Text(phase, style="green" if trusted else "yellow"))
    table.add_row("provider id", shown(registration.provider_id or "-"))
    table.add_row("platform", shown(registration.platform_url))
    table.add_row("endpoint", shown(registration.endpoint_url))
    table.add_row("last heartbeat", _ago(registration.last_heartbeat_at))
    table.add_row("detail", shown(registration.message))
    waiting = _waiting(registration)
    if waiting:
        table.add_row("left listed", Text(_leftovers_line(registration, waiting, current), style="yellow"))


def _waiting(record: RegistrationState) -> list[KeptLeftover]:
    """The instances the next start deletes: those the record keeps (``leftovers``) and, when the
    run that wrote it ended without deregistering, the one it names (``leftovers.left_by``: the
    next start adds it to them), waiting since that run last wrote its record."""
    from vramsupply.platform.leftovers import left_by

    kept, left = list(record.leftovers), left_by(record)
    if left is not None and all(k.provider_id != left.provider_id for k in kept):
        kept.append(left.model_copy(update={"noted_at": record.updated_at}))
    return kept


def _leftovers_line(record: RegistrationState, kept: list[KeptLeftover], current: bool) -> str:
    """The instances waiting to be deleted (``_waiting``): how many, since when, by what, and who retries them."""
    from vramsupply.platform.leftovers import owned_by
    from vramsupply.platform.phase_log import _clock_time

    retired = sum(left.retired for left in kept)
    one = len(kept) == 1
    line = (
        f"{len(kept)} instance{'' if one else 's'} left listed ({_how_left(len(kept) - retired, retired)}) wait{'s' if one else ''} to be deleted from the "
        f"platform (since {_clock_time(min(left.noted_at for left in kept))})"
    )
    others = 0 if record.account is None else sum(not owned_by(left, record.platform_url, record.account) for left in kept)
    if others == len(kept):
        return line + f"; registered with another platform or API key than the agent's: only an agent using that one deletes {'it' if one else 'them'}"
    own = _own(len(kept), others)
    if not current:
        line += f"; the agent is not running: it retries {own} when it next starts"
    elif record.phase is Phase.not_registering:
        line += f"; this agent serves without registering: the next agent that registers deletes {own}"
    else:
        line += f"; the agent retries {own} while it serves" if others else "; the agent retries while it serves"
    if others:
        line += f"; {others} of them {'was' if others == 1 else 'were'} registered with another platform or API key: only an agent using that one deletes {'it' if others == 1 else 'them'}"
    return line


def _own(waiting: int, others: int) -> str:
    """Those of the ``waiting`` instances the agent deletes itself: all, or the ones not another account's."""
    if not others:
        return "it" if waiting == 1 else "them"
    return "the one of its own" if waiting - others == 1 else f"the {waiting - others} of its own"


def _how_left(killed: int, retired: int) -> str:
    # A run that was killed, or one that stopped but whose DELETE failed (the platform down at the stop).
    by_killed = "by an earlier run" if killed == 1 else "by earlier runs"
    at_old = "at an old endpoint URL" if retired == 1 else "at old endpoint URLs"
    if killed and retired:
        return f"{killed} {by_killed}, {retired} {at_old}"
    return by_killed if killed else at_old


def _stale_reason(status: AgentStatus) -> str:
    age = status.record_age or 0.0
    written = "recorded in the future: not rewritten since the clock was set back" if age < 0 else f"not rewritten for {age:.0f}s"
    return (
        f"stale: {written}, while the agent rewrites it at every heartbeat (stale after {status.stale_after:.0f}s); it cannot "
        "write it (a full disk?) or its heartbeats stalled, and the platform may no longer list it"
    )


def _no_record(unreadable: str | None) -> Text:
    if unreadable is None:
        return Text("none recorded (no agent has tried to register, or one could not write its record: a full or read-only data dir)")
    return Text(f"none recorded: {plain(unreadable)}")


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    age = time.time() - timestamp
    if age < -CLOCK_SLACK_SECONDS:
        return "recorded as in the future (the clock was set back since?)"
    return f"{max(0.0, age):.0f}s ago" if age < SECONDS_PER_YEAR else "over a year ago"
