"""What the marketplace side needs to know, as one typed value built by the serve lifecycle.

``platform/`` never reads ``Settings`` for serving: serve picks the fields below out of the
configuration (as it builds ``EngineOptions`` for the engine), so this package can be used and
tested without the whole configuration, and a setting's name can change without touching it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MarketOptions:
    """The provider's terms and where to register them.

    ``api_key`` and ``endpoint_url`` may be missing here: ``MarketplaceSession.prepare`` refuses
    them with a line that says what to set. ``planned_context`` is the context the agent intends
    to serve (checked against ``context_length_offered`` before anything loads); None when it is
    only known once the engine answers. ``local_ok`` (the demo) accepts a loopback endpoint URL
    without a warning.
    """

    platform_url: str
    api_key: str | None
    endpoint_url: str | None
    input_price: int
    output_price: int
    context_length_offered: int | None = None
    planned_context: int | None = None
    heartbeat_interval: float = 30.0
    endpoint_token: str | None = None
    local_ok: bool = False
    tunnel: str | None = None
    """A tunnel tool (``--tunnel``) makes ``endpoint_url`` once serving; it replaces ``endpoint_url``."""
