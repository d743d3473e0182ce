"""The marketplace side of `vramsupply serve`, in the order serve needs it.

``MarketplaceSession.prepare`` runs before the model loads and refuses a configuration that could
never register (no API key, no usable endpoint URL) without any network call; ``start`` registers
once the server answers; ``drain`` and ``stop`` take the instance off the market on shutdown, each
bounded by a deadline so a dead platform never holds up the exit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vramsupply.config import Settings
from vramsupply.logging import register_secret
from vramsupply.platform.client import PlatformClient, PlatformError
from vramsupply.platform.lifecycle import ProviderLifecycle, ServingStats
from vramsupply.platform.offer import ModelIdentity, OfferError, build_offer, check_endpoint_url, price_summary
from vramsupply.platform.state import Phase, default_state_path
from vramsupply.platform.token import resolve_endpoint_token

DRAIN_NOTICE_TIMEOUT = 3.0
"""Seconds to wait for the platform to acknowledge that we drain before draining anyway."""
DEREGISTER_TIMEOUT = 10.0
"""Seconds the DELETE may take on shutdown (systemd's stop margin beyond the drain is 30 s)."""


class MarketplaceSession:
    def __init__(self, settings: Settings, api_key: str, endpoint_token: str, *, local_ok: bool, state_path: Path) -> None:
        self.settings = settings
        self.endpoint_token = endpoint_token
        self.local_ok = local_ok
        self._api_key = api_key
        self._state_path = state_path
        self.lifecycle: ProviderLifecycle | None = None

    @classmethod
    def prepare(cls, settings: Settings, *, local_ok: bool = False, state_path: Path | None = None) -> MarketplaceSession | None:
        """None with ``no_register``; otherwise check what registering needs, before any call.

        ``local_ok`` (the demo) accepts a localhost endpoint without a warning.
        """
        if settings.no_register:
            return None
        if settings.api_key is None or not settings.api_key.get_secret_value():
            raise PlatformError("no API key to register with: run `vramsupply login`, set VRAM_SUPPLY_API_KEY, or pass --no-register to serve locally only")
        check_endpoint_url(settings.endpoint_url, local_ok=local_ok)
        if settings.context_length_offered is not None and settings.context_length_offered > settings.context_length:
            raise OfferError(f"context_length_offered ({settings.context_length_offered}) is larger than context_length ({settings.context_length})")
        token = resolve_endpoint_token(settings)
        register_secret(token)
        return cls(settings, settings.api_key.get_secret_value(), token, local_ok=local_ok, state_path=state_path or default_state_path())

    def summary(self, model: ModelIdentity, served_context: int) -> list[str]:
        """Startup lines: what is offered where, the earnings after the fee, and any warnings."""
        offer = build_offer(self.settings, model, served_context, self.endpoint_token, local_ok=self.local_ok)
        request = offer.request
        return [
            f"offering {request.model} at {request.endpoint_url} on {self.settings.platform_url} (context {request.context_length_offered})",
            price_summary(request.input_price_per_million, request.output_price_per_million),
            *(f"warning: {warning}" for warning in offer.warnings),
        ]

    def start(self, model: ModelIdentity, served_context: int, stats: Callable[[], ServingStats]) -> ProviderLifecycle:
        """Register in the background and keep heartbeating; call once the server answers."""
        offer = build_offer(self.settings, model, served_context, self.endpoint_token, local_ok=self.local_ok)
        client = PlatformClient(self.settings.platform_url, self._api_key, attempts=1)
        self.lifecycle = ProviderLifecycle(
            client, offer.request, stats, heartbeat_interval=self.settings.heartbeat_interval, state_path=self._state_path
        )
        self.lifecycle.start()
        return self.lifecycle

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
