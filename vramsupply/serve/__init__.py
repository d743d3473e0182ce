"""`vramsupply serve`: the lifecycle (``lifecycle``), the typed options it builds for each part
(``options``), the hooks the CLI may plug in (``hooks``), stop signals and status rendering.
"""

from __future__ import annotations

from vramsupply.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "vramsupply.serve.hooks": ("ServeHook",),
        "vramsupply.serve.lifecycle": ("run_serve",),
        "vramsupply.serve.status": ("Snapshot", "Throughput"),
    },
)
