"""vramsupply: the provider agent of the vram.supply inference marketplace.

``__version__`` is read from the installed metadata on first use, not at import: every command
imports this package first, and `serve`'s early stop handler (``__main__``) should be in place as
soon after the process starts as it can be (importlib.metadata alone took about 40 ms).
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module 'vramsupply' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("vramsupply")
    except PackageNotFoundError:
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
