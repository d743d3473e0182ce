"""The agent's side of the vram.supply marketplace: API client, offer, register/heartbeat lifecycle.
"""

from __future__ import annotations

from vramsupply.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "vramsupply.platform.backoff": ("Backoff",),
        "vramsupply.platform.client": ("ApiKeyRejected", "PlatformClient", "PlatformError", "PlatformUnavailable", "RequestRejected", "UnexpectedAnswer", "UnknownProvider"),
        "vramsupply.platform.lifecycle": ("ProviderLifecycle", "ServingStats"),
        "vramsupply.platform.offer": ("Offer", "OfferError", "build_offer", "check_endpoint_url", "price_summary"),
        "vramsupply.platform.options": ("MarketOptions",),
        "vramsupply.platform.session": ("MarketplaceSession",),
        "vramsupply.platform.state": ("Phase", "RegistrationState", "default_state_path", "read_state"),
        "vramsupply.platform.token": ("resolve_endpoint_token",),
    },
)
