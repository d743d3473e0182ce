"""`vramsupply serve`: the lifecycle (``lifecycle``), the typed options it builds for each part
(``options``), the hooks the CLI may plug in (``hooks``), stop signals and status rendering.

Names are loaded from their modules on first use (``vramsupply.lazy``): importing one module of
the package does not import the rest.
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
