"""`vramsupply doctor`'s marketplace checks: the platform answers, accepts the key, can reach this
agent, and agrees on the time.

Registered after this machine's checks (``doctor.py`` imports this module last), so the screen
reads from the machine outwards. The platform is probed once (``Context.platform``) for the
reachability, key and clock checks together, and not at all for an agent that serves locally only
(``no_register``): those checks then pass as not needed.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import time

from vramsupply.gpu.checkup import Context, Result, check

MAX_CLOCK_SKEW = 60.0
LOCAL_ONLY = Result(True, "not needed: serving locally only (no_register)")
"""What each marketplace check says with ``no_register``: the agent never talks to the platform, so
neither its answer, its verdict on a key nor its clock can stop anything (and it is not probed)."""
ENDPOINT_FIX = "set VRAM_SUPPLY_ENDPOINT_URL=https://your.host (serve: --endpoint-url), or VRAM_SUPPLY_TUNNEL=cloudflared (serve: --tunnel)"
"""Doctor checks the settings serve would start with, from the environment and the config file: it
takes no serve flags, so its fixes name the setting to set, and serve's flag for a one-off run."""


@check("platform")
def platform_reachable(ctx: Context) -> Result:
    if ctx.settings.no_register:
        return LOCAL_ONLY
    probe = ctx.platform
    if probe.status is None:
        return Result(False, f"{ctx.settings.platform_url} cannot be reached: {probe.error}", "check the network, a proxy (HTTPS_PROXY) or VRAM_SUPPLY_PLATFORM_URL")
    return Result(True, f"{ctx.settings.platform_url} answered in {probe.seconds * 1000:.0f} ms")


@check("api key")
def api_key_accepted(ctx: Context) -> Result:
    if ctx.settings.no_register:
        return LOCAL_ONLY
    if ctx.settings.api_key is None:
        return Result(False, "no API key configured", "run vramsupply login (or set VRAM_SUPPLY_API_KEY)")
    status = ctx.platform.status
    if status is None:
        return Result(False, "cannot check: the platform is unreachable", "fix the platform check first")
    if status in (401, 403):
        return Result(False, f"the platform rejected the API key (HTTP {status})", "run vramsupply login with a current key")
    if status >= 400:
        return Result(False, f"the platform answered HTTP {status}", "try again later; if it persists, contact vram.supply")
    return Result(True, "the platform accepts the API key")


@check("endpoint url")
def endpoint_url_set(ctx: Context) -> Result:
    if ctx.settings.no_register:
        return LOCAL_ONLY
    if ctx.settings.tunnel and not ctx.settings.endpoint_url:
        return Result(True, f"made by the {ctx.settings.tunnel} tunnel when serve starts")
    if not ctx.settings.endpoint_url:
        return Result(False, "no public endpoint URL: the agent cannot register", ENDPOINT_FIX)
    from vramsupply.platform.offer import OfferError, check_endpoint_url

    try:
        warnings = check_endpoint_url(ctx.settings.endpoint_url)
    except OfferError as exc:
        return Result(False, str(exc), "set VRAM_SUPPLY_ENDPOINT_URL to the public http(s) base URL")
    if warnings:
        return Result(False, warnings[0], "use the public address buyers reach this machine at")
    return Result(True, ctx.settings.endpoint_url)


@check("reachability")
def platform_can_reach_agent(ctx: Context) -> Result:
    """Retrace the platform's path to {endpoint_url}/health hop by hop; the first failing hop is named."""
    from vramsupply.platform.offer import local_base_url
    from vramsupply.platform.reachability import check_configured
    from vramsupply.serve.options import market_options

    settings = ctx.settings
    options = None if settings.no_register else market_options(settings)
    probe = asyncio.run(check_configured(options, local_base_url(settings.host, settings.port), settings.host))
    if probe.ok:
        return Result(True, probe.message)
    return Result(False, f"{probe.hop}: {probe.message}", "see the detail: it names the hop and what to do")


@check("clock")
def clock_in_sync(ctx: Context) -> Result:
    if ctx.settings.no_register:
        return LOCAL_ONLY
    date = ctx.platform.date
    if not date:
        return Result(False, "cannot compare: no answer with a Date header from the platform", "fix the platform check first; keep NTP on (timedatectl set-ntp true)")
    platform_time = _http_date(date)
    if platform_time is None:
        return Result(False, f"cannot compare: the platform's Date header {date[:64]!r} is not a date", "keep NTP on (timedatectl set-ntp true); if the platform keeps sending it, contact vram.supply")
    skew = time.time() - platform_time
    detail = f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the platform's clock"
    if abs(skew) > MAX_CLOCK_SKEW:
        return Result(False, detail, "turn on time synchronisation: timedatectl set-ntp true")
    return Result(True, detail)


def _http_date(text: str) -> float | None:
    """An HTTP Date header as a Unix time, or None if it is not one. HTTP dates are UTC: a zone
    given as -0000 makes Python return a naive datetime, which is UTC too, not local time."""
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)).timestamp()
