"""Why the platform cannot reach this agent, told as the hop that fails.

The platform health-checks ``{endpoint_url}/health`` every 60 s and lists an instance that fails
as offline, so it earns nothing. The heartbeat reply only says "offline"; this module turns that
into what to do, and ``probe`` retraces the platform's path from this machine, hop by hop:

1. the endpoint URL is a base URL (not one ending in /v1) and names a public host (not localhost,
   a private address, or a carrier-grade NAT one, where no port can be forwarded);
2. its name resolves (DNS);
3. something accepts a TCP connection at its host and port (port forward, firewall; a forward
   reaches the agent only when it listens beyond loopback, ``--host 0.0.0.0``);
4. ``/health`` there answers 200 with this agent's JSON (not a router page or another server, and
   over the scheme the URL says: an https:// URL whose port speaks plain HTTP fails here);
5. the agent itself answers ``/health`` locally.

A probe from inside the network can pass where the platform still fails (a router that forwards
only traffic from outside, "hairpin NAT"), so a passing probe says so rather than claiming success.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from vramsupply.config.urls import base_of, ends_in_v1
from vramsupply.platform.client import describe_error
from vramsupply.platform.offer import CGNAT, is_cgnat, is_local_host, is_loopback_host
from vramsupply.platform.options import MarketOptions
from vramsupply.timeouts import within
from vramsupply.tunnel import TunnelError, tunnel_tool

PROBE_TIMEOUT_SECONDS = 5.0
LOADING = "answered 503: the model is still loading"
PLAIN_HTTP = "plain HTTP"
FIXES = "forward port {public_port} to port {local_port} of this machine, open the firewall for it, or use --tunnel cloudflared"
LOOPBACK = "; the agent listens on {host} only, which a port forward cannot reach: serve with --host 0.0.0.0 (VRAM_SUPPLY_HOST)"


def public_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def offline_message(endpoint_url: str, local_port: int | None, tunnel: str | None = None) -> str:
    """What the agent says when the heartbeat reply lists it as offline."""
    health = f"{endpoint_url}/health"
    if tunnel:
        return (
            f"the platform cannot reach {health} through the {tunnel} tunnel: the tunnel may still be starting "
            f"(quick tunnels take up to a minute to become reachable) or has lost its connection; it is restarted if it exits"
        )
    fixes = FIXES.format(public_port=public_port(endpoint_url), local_port=local_port if local_port else public_port(endpoint_url))
    return f"the platform cannot reach {health}: {fixes}"


@dataclass(frozen=True)
class Probe:
    """The result of retracing the platform's path: ``hop`` names the first that failed, or "none"."""

    ok: bool
    hop: str
    message: str


async def probe(
    endpoint_url: str,
    local_url: str | None = None,
    *,
    timeout: float = PROBE_TIMEOUT_SECONDS,
    check_address: bool = True,
    listen_host: str | None = None,
) -> Probe:
    """Check each hop from the endpoint URL to this agent; the first that fails is reported.

    ``check_address=False`` skips hop 1, for a reference platform on this machine (and tests).
    ``listen_host``: the address the agent listens on; a loopback one is named in the fix of a
    failing hop, since a port forward cannot reach it (a reverse proxy here can: no hop of its own).
    """
    host, port = urlsplit(endpoint_url).hostname or "", public_port(endpoint_url)
    fixes = FIXES.format(public_port=port, local_port=urlsplit(local_url).port if local_url else port)
    if listen_host is not None and is_loopback_host(listen_host) and not is_loopback_host(host):
        fixes += LOOPBACK.format(host=listen_host)
    failed = (
        _address_problem(endpoint_url, host, fixes, check_address)
        or await _network_problem(host, port, timeout, fixes)
        or await _agent_problem(endpoint_url, local_url, timeout, fixes)
    )
    return failed or Probe(
        True,
        "none",
        f"{endpoint_url}/health answers from this machine. If the platform still lists you offline, your router may forward "
        f"only traffic from inside your network: check from outside it, or use --tunnel cloudflared",
    )


def _address_problem(endpoint_url: str, host: str, fixes: str, check_address: bool) -> Probe | None:
    """Hops 0 and 1: what the URL itself says, before anything is asked of the network."""
    if ends_in_v1(endpoint_url):
        return Probe(False, "url", f"{endpoint_url} ends in /v1, so the platform would ask {endpoint_url}/health: the endpoint URL is the base URL, {base_of(endpoint_url)}")
    if check_address and is_cgnat(host):
        return Probe(False, "address", f"{endpoint_url} is a carrier-grade NAT address (100.64.0.0/10) the platform cannot reach: {CGNAT}")
    if check_address and is_local_host(host):
        return Probe(False, "address", f"{endpoint_url} is a local or private address the platform cannot reach: use this network's public address and {fixes}")
    return None


async def _network_problem(host: str, port: int, timeout: float, fixes: str) -> Probe | None:
    """The name resolves, and something accepts connections at the port."""
    try:
        await within(asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return Probe(False, "dns", f"the name {host} does not resolve ({describe_error(exc)}): fix its DNS record or use --tunnel cloudflared")
    try:
        _, writer = await within(asyncio.open_connection(host, port), timeout)
        writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        return Probe(False, "tcp", f"nothing accepts connections at {host}:{port} ({describe_error(exc)}): {fixes}")
    return None


async def _agent_problem(endpoint_url: str, local_url: str | None, timeout: float, fixes: str) -> Probe | None:
    """What answers there: this agent, ready, over the scheme the URL names."""
    parts = urlsplit(endpoint_url)
    remote = await _health(endpoint_url, timeout)
    if remote == LOADING:
        return Probe(False, "agent", f"{endpoint_url}/health reaches this agent, but it is still loading the model")
    if remote == PLAIN_HTTP:
        plain = parts._replace(scheme="http").geturl()
        return Probe(
            False, "tls", f"{parts.hostname or ''}:{public_port(endpoint_url)} answers plain HTTP, not HTTPS: make the endpoint URL {plain}, "
            f"or terminate TLS in front of the agent (a reverse proxy, or --tunnel cloudflared)",
        )
    if remote is not None:
        path = f" (the endpoint URL's path {parts.path} is part of it: is that where the agent is?)" if parts.path.strip("/") else ""
        return Probe(False, "http", f"{endpoint_url}/health {remote}{path}: the port is open but does not lead to this agent; {fixes}")
    if local_url is not None:
        local = await _health(local_url, timeout)
        if local is not None:
            return Probe(False, "agent", f"the agent itself is not ready: {local_url}/health {local}")
    return None


async def _health(base_url: str, timeout: float) -> str | None:
    """None when ``/health`` answers 200 with a vramsupply body, else what it did instead."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, session.get(base_url + "/health") as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):  # a TLS hello answered in plain text
            return PLAIN_HTTP
        return f"did not answer ({describe_error(exc)})"
    if response.status == 503 and isinstance(body, dict) and body.get("status") == "loading":
        return LOADING
    if response.status != 200:
        return f"answered {response.status}"
    if not isinstance(body, dict) or body.get("status") not in ("ok", "degraded"):  # degraded: serving, earnings unrecorded
        return "answered 200 but not with this agent's health JSON"
    return None


async def check_configured(options: MarketOptions | None, local_url: str, listen_host: str | None = None) -> Probe:
    """`vramsupply doctor`'s reachability check for the configured agent (which need not be running).

    ``options`` is None with ``--no-register``; ``local_url`` is where this machine reaches the
    agent, and ``listen_host`` the address it listens on (see ``probe``).
    """
    if options is None:
        return Probe(True, "none", "serving locally only (--no-register): the platform need not reach this agent")
    if options.tunnel:
        try:
            tunnel_tool(options.tunnel).command(local_url)
        except TunnelError as exc:
            return Probe(False, "tunnel", str(exc))
        return Probe(True, "none", f"a {options.tunnel} tunnel makes the public URL when `serve` starts; the platform reaches the agent through it")
    if not options.endpoint_url:
        return Probe(False, "address", "no endpoint URL: set VRAM_SUPPLY_ENDPOINT_URL to your public address (serve: --endpoint-url), or VRAM_SUPPLY_TUNNEL=cloudflared (serve: --tunnel)")
    return await probe(options.endpoint_url, local_url, listen_host=listen_host)
