"""The `vramsupply` command line: thin commands that parse flags and call into the package.

Commands never catch errors: every user-facing error is a ``VramsupplyError`` (see
``vramsupply/errors.py``), and ``main`` is the one place that prints it as one line and exits with
its code. ``fail`` is for the few checks a command makes on its own arguments.
"""

from __future__ import annotations

# Importing a module registers its commands on the app, in this order in `--help`.
from . import serve, market, machine, models, service  # noqa: F401  isort: skip
from .app import app, main

__all__ = ["app", "main"]
