"""The OpenAI-compatible HTTP API (aiohttp) in front of the engine; knows nothing of the platform.
"""

from __future__ import annotations

from vramsupply.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "vramsupply.server.app": ("ApiServer", "create_app"),
        "vramsupply.server.errors": ("ApiError",),
        "vramsupply.server.state": ("SERVER_STATE", "ServerState"),
    },
)
