"""The marketplace side of `vramsupply serve`, in the order serve needs it.

``MarketplaceSession.prepare`` runs before the model loads and refuses a configuration that could
never register (no API key, no usable endpoint URL) without any network call; ``offer`` builds the
register payload once the served context is known; ``start`` registers it once the server answers;
``drain`` and ``stop`` take the instance off the market on shutdown, each bounded by a deadline so a
dead platform never holds up the exit.

``prepare`` also notes what the running agent needs from before it started: where the API key came
from (``api_key``: what a rejection says, and whether a new key can be picked up without a
restart), and the instance the previous run left listed, read before this run's first record
replaces the one that names it and kept with those earlier runs left whose DELETE failed
(``leftovers``), all deleted before registering (always, not only when the endpoint URL changed: a
dead run's instance is a ghost whatever its URL, one DELETE costs nothing, and a platform need not
replace an instance at the same URL as the reference one does) and retried while serving.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vramsupply.errors import MissingSetting
from vramsupply.logging import register_secret
from vramsupply.platform import api
from vramsupply.platform.api_key import ApiKeySource
from vramsupply.platform.capacity import CapacityWatch, MeasuredCapacity, offered_capacity
from vramsupply.platform.client import PlatformClient
from vramsupply.platform.leftovers import PendingLeftovers
from vramsupply.platform.lifecycle import ProviderLifecycle, ServingStats
from vramsupply.platform.offer import ModelIdentity, Offer, OfferError, build_offer, check_endpoint_url
from vramsupply.platform.options import MarketOptions
from vramsupply.platform.state import Phase, default_state_path
from vramsupply.platform.token import resolve_endpoint_token

log = logging.getLogger("vramsupply.platform")

DRAIN_NOTICE_TIMEOUT = 3.0
"""Seconds to wait for the platform to acknowledge that we drain before draining anyway."""
DEREGISTER_TIMEOUT = 10.0
"""Seconds the last heartbeat and the DELETE may take together on shutdown, the heartbeat at most
half (systemd's stop margin beyond the drain is 30 s)."""


__all__ = ["MarketplaceSession", "MeasuredCapacity"]


class MarketplaceSession:
    def __init__(self, options: MarketOptions, api_key: str, endpoint_token: str, *, state_path: Path) -> None:
        self.options = options
        self.endpoint_token = endpoint_token
        self._api_key = api_key
        self._state_path = state_path
        self.lifecycle: ProviderLifecycle | None = None
        self.local_url: str | None = None  # where this machine reaches the agent, once it listens
        self.capacity: api.Capacity | None = None
        self.hardware: dict[str, Any] | None = None  # where the model runs, with CPU-fallback warnings
        self.api_key_source = ApiKeySource.of(api_key)
        self.leftovers: PendingLeftovers | None = None  # the instances killed earlier runs left listed
        self._capacity_watch: CapacityWatch | None = None
        self._pending: tuple[ModelIdentity, int, Callable[[], ServingStats]] | None = None

    @classmethod
    def prepare(cls, options: MarketOptions, *, state_path: Path | None = None) -> MarketplaceSession:
        """Check what registering needs, before any call; resolve (or create) the endpoint token."""
        if not options.api_key:
            raise MissingSetting("no API key to register with: run `vramsupply login`, set VRAM_SUPPLY_API_KEY, or pass --no-register to serve locally only")
        if options.tunnel and options.endpoint_url:
            raise OfferError(f"pass either --endpoint-url or --tunnel, not both: the {options.tunnel} tunnel makes the endpoint URL")
        if not options.tunnel:
            check_endpoint_url(options.endpoint_url, local_ok=options.local_ok)
        offered, planned = options.context_length_offered, options.planned_context
        if offered is not None and planned is not None and offered > planned:
            raise OfferError(f"context_length_offered ({offered}) is larger than context_length ({planned})")
        token = resolve_endpoint_token(options.endpoint_token)
        register_secret(token)
        session = cls(options, options.api_key, token, state_path=state_path or default_state_path())
        session.leftovers = PendingLeftovers.at_start(session._state_path)
        return session

    def offer(self, model: ModelIdentity, served_context: int) -> Offer:
        """The register payload for the model as served; raises OfferError when it cannot be offered."""
        return build_offer(self.options, model, served_context, self.endpoint_token, capacity=self.capacity, hardware=self.hardware)

    def start(self, offer: Offer, stats: Callable[[], ServingStats]) -> ProviderLifecycle:
        """Register ``offer`` in the background and keep heartbeating; call once the server answers."""
        client = PlatformClient(self.options.platform_url, self._api_key, attempts=1)
        self.lifecycle = ProviderLifecycle(
            client,
            offer.request,
            stats,
            heartbeat_interval=self.options.heartbeat_interval,
            state_path=self._state_path,
            local_url=self.local_url,
            tunnel=self.options.tunnel,
            api_key_source=self.api_key_source,
            capacity=self._capacity_watch,
            leftovers=self.leftovers,
        )
        self.lifecycle.start()
        return self.lifecycle

    @property
    def waiting_for_url(self) -> bool:
        """A tunnel makes the endpoint URL and has not announced it yet."""
        return self.options.endpoint_url is None

    def start_when_reachable(self, model: ModelIdentity, served_context: int, stats: Callable[[], ServingStats]) -> None:
        """Register as soon as ``use_endpoint_url`` gives the tunnel's public URL."""
        self._pending = (model, served_context, stats)

    def use_endpoint_url(self, url: str) -> None:
        """A tunnel announced its (new) public URL: register it, or register again at it."""
        self.options = dataclasses.replace(self.options, endpoint_url=url)
        if self.lifecycle is not None:
            self.lifecycle.move_endpoint(url)
        elif self._pending is not None:
            (model, served_context, stats), self._pending = self._pending, None
            self.start(self.offer(model, served_context), stats)

    def report_capacity(self, measured: MeasuredCapacity | None) -> None:
        """Offer the throughput `vramsupply bench` stored for the served model (none when never measured)."""
        self.capacity = offered_capacity(measured)

    def watch_capacity(self, path: Path, read: Callable[[], MeasuredCapacity | None]) -> None:
        """Offer the served model's result in ``path`` (``read()``), and follow it: a `vramsupply
        bench` run while the agent serves reaches the next heartbeat (``capacity.CapacityWatch``)."""
        self._capacity_watch = CapacityWatch(path, read)
        self.capacity = self._capacity_watch.capacity

    async def drain(self) -> None:
        if self.lifecycle is not None:
            await self.lifecycle.drain(DRAIN_NOTICE_TIMEOUT)

    async def stop(self) -> bool:
        """Deregister; True when the platform no longer lists this instance."""
        if self.lifecycle is None:
            return True
        return await self.lifecycle.stop(DEREGISTER_TIMEOUT)

    @property
    def phase(self) -> Phase | None:
        return None if self.lifecycle is None else self.lifecycle.phase
