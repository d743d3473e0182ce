"""The agent's side of the vram.supply marketplace: API client, offer, register/heartbeat lifecycle."""

from vramsupply.platform.backoff import Backoff
from vramsupply.platform.client import (
    ApiKeyRejected,
    PlatformClient,
    PlatformError,
    PlatformUnavailable,
    RequestRejected,
    UnexpectedAnswer,
    UnknownProvider,
)
from vramsupply.platform.lifecycle import ProviderLifecycle, ServingStats
from vramsupply.platform.offer import Offer, OfferError, build_offer, check_endpoint_url, price_summary
from vramsupply.platform.options import MarketOptions
from vramsupply.platform.session import MarketplaceSession
from vramsupply.platform.state import Phase, RegistrationState, default_state_path, read_state
from vramsupply.platform.token import resolve_endpoint_token

__all__ = [
    "ApiKeyRejected",
    "Backoff",
    "MarketOptions",
    "MarketplaceSession",
    "Offer",
    "OfferError",
    "Phase",
    "PlatformClient",
    "PlatformError",
    "PlatformUnavailable",
    "ProviderLifecycle",
    "RegistrationState",
    "RequestRejected",
    "ServingStats",
    "UnexpectedAnswer",
    "UnknownProvider",
    "build_offer",
    "check_endpoint_url",
    "default_state_path",
    "price_summary",
    "read_state",
    "resolve_endpoint_token",
]
