"""vramsupply: the provider agent of the vram.supply inference marketplace."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vramsupply")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"
