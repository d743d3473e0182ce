"""`vramsupply serve`: the lifecycle (``lifecycle``), the typed options it builds for each part
(``options``), the hooks the CLI may plug in (``hooks``), stop signals and status rendering."""

from vramsupply.serve.hooks import ServeHook
from vramsupply.serve.lifecycle import run_serve
from vramsupply.serve.status import Snapshot, Throughput

__all__ = ["ServeHook", "Snapshot", "Throughput", "run_serve"]
