"""What this agent offers the market: the register payload, built and checked before any call.

Bad offers (a non-http(s) endpoint, one ending in /v1 where the platform wants the base URL, more
context than is served) are refused here with one clear line; doubtful ones (an endpoint buyers on the internet cannot reach) produce warnings, kept as data
on the ``Offer`` for the caller to show however it shows warnings.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from vramsupply import __version__
from vramsupply.config.urls import endpoint_url_problem
from vramsupply.errors import ConfigError
from vramsupply.platform import api
from vramsupply.platform.options import MarketOptions


class OfferError(ConfigError):
    """The offer cannot be registered as configured; the message says what to change."""


class ModelIdentity(Protocol):
    """The served model as the hub resolved it (``hub.LocalModel`` satisfies this)."""

    @property
    def model_id(self) -> str: ...
    @property
    def repo_id(self) -> str | None: ...
    @property
    def filename(self) -> str | None: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def quant(self) -> str | None: ...


def check_endpoint_url(url: str | None, *, local_ok: bool = False) -> list[str]:
    """Refuse a missing or unusable endpoint (``config.endpoint_url_problem``: the same rule the
    settings apply whenever the URL is given); warn when buyers on the internet cannot reach it."""
    if not url:
        raise OfferError("an endpoint URL is required to register: pass --endpoint-url or set VRAM_SUPPLY_ENDPOINT_URL (or --no-register)")
    problem = endpoint_url_problem(url)
    if problem is not None:
        raise OfferError(f"endpoint URL {url!r} {problem}")
    hostname = urlsplit(url).hostname or ""
    if local_ok or not is_local_host(hostname):
        return []
    if is_cgnat(hostname):
        return [f"endpoint URL {url} is a carrier-grade NAT address (100.64.0.0/10): {CGNAT}"]
    return [f"endpoint URL {url} points at a local or private address: the platform and buyers on the internet cannot reach it"]


CGNAT = "your provider shares one public address among many customers, so port forwarding cannot work here: use --tunnel cloudflared"
CGNAT_NETWORK = ipaddress.ip_network("100.64.0.0/10")


def local_base_url(host: str, port: int) -> str:
    """Where this machine reaches a server bound to ``host:port`` (a wildcard becomes loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """Whether an address (a listen host, or a URL's host) is this machine alone: nothing from
    another machine, a router's port forward included, reaches it."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def loopback_listen_warning(endpoint_url: str | None, listen_host: str) -> str | None:
    """An agent listening on loopback only, registered at an address of another host: a port
    forward cannot reach it (a reverse proxy on this machine can, so this warns, never refuses)."""
    endpoint_host = urlsplit(endpoint_url).hostname if endpoint_url else None
    if endpoint_host is None or is_loopback_host(endpoint_host) or not is_loopback_host(listen_host):
        return None
    return (
        f"the agent listens on {listen_host} only, which a port forward from your router cannot reach: for buyers to reach it at "
        f"{endpoint_url}, serve with --host 0.0.0.0 (VRAM_SUPPLY_HOST), or keep {listen_host} behind a reverse proxy on this machine"
    )


def is_local_host(hostname: str) -> bool:
    name = hostname.lower().rstrip(".")
    if name == "localhost" or name.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    # not is_global: also the shared (carrier-grade NAT) range 100.64.0.0/10, which is not is_private
    return not address.is_global or address.is_loopback or address.is_link_local or address.is_unspecified


def is_cgnat(hostname: str) -> bool:
    try:
        return ipaddress.ip_address(hostname) in CGNAT_NETWORK
    except ValueError:
        return False


@dataclass(frozen=True)
class Offer:
    """The register payload, built once, and what is doubtful about it (one sentence each)."""

    request: api.RegisterRequest
    warnings: list[str]
    platform_url: str

    def summary(self) -> list[str]:
        """Startup lines: what is offered where, and the earnings after the fee (warnings are separate)."""
        request = self.request
        return [
            f"offering {request.model} at {request.endpoint_url} on {self.platform_url} (context {request.context_length_offered})",
            price_summary(request.input_price_per_million, request.output_price_per_million),
        ]


def build_offer(
    options: MarketOptions,
    model: ModelIdentity,
    served_context: int,
    endpoint_token: str,
    *,
    capacity: api.Capacity | None = None,
    hardware: dict[str, Any] | None = None,
) -> Offer:
    """The register payload: the provider's terms, plus the model's identity, our token, the
    measured capacity (when `vramsupply bench` measured this model) and where the model runs."""
    warnings = check_endpoint_url(options.endpoint_url, local_ok=options.local_ok)
    offered = options.context_length_offered or served_context
    if offered > served_context:
        raise OfferError(f"context_length_offered ({offered}) is larger than the context this agent serves ({served_context})")
    request = api.RegisterRequest(
        provider_type="agent",
        endpoint_url=options.endpoint_url,
        model=model.model_id,
        input_price_per_million=options.input_price,
        output_price_per_million=options.output_price,
        context_length_offered=offered,
        gguf_repo=model.repo_id,
        gguf_file=model.filename,
        gguf_sha256=model.sha256,
        quant=model.quant,
        agent_version=__version__,
        endpoint_token=endpoint_token,
        **({"capacity": capacity} if capacity is not None else {}),
        **({"hardware": hardware} if hardware is not None else {}),
    )
    return Offer(request, warnings, options.platform_url)


def format_cents(cents: float) -> str:
    """Dollars, to the cent; a price of under a dollar whose share after the fee is a fraction of a
    cent (7 ¢ earns 6.65 ¢) keeps its fraction: rounded, the earnings would read as the price."""
    if abs(cents - round(cents)) < 1e-9:
        return f"${cents / 100:,.2f}"
    return f"${cents / 100:,.4f}".rstrip("0")


def price_summary(input_price: int, output_price: int) -> str:
    """The startup line: list prices and what the provider keeps after the platform fee."""
    fee = f"{api.PLATFORM_FEE:.0%}"
    return (
        f"prices per million tokens: input {format_cents(input_price)}, output {format_cents(output_price)}; "
        f"you earn {format_cents(api.net_cents(input_price))} / {format_cents(api.net_cents(output_price))} after the {fee} platform fee"
    )
