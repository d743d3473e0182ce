"""Errors of model resolution and download. Every message is one readable line for the CLI."""

from __future__ import annotations

from vramsupply.errors import VramsupplyError


class HubError(VramsupplyError):
    """Base class: the model could not be made available locally; the message says why and what to do."""


class InvalidModelSpec(HubError):
    """The model argument is neither an `org/model` id nor a usable local .gguf file."""


class ModelNotFound(HubError):
    """No GGUF repository was found for the requested model."""


class QuantNotFound(HubError):
    """GGUF repositories exist, but none holds the requested quantization."""


class HubAuthError(HubError):
    """The Hub refused access (HTTP 401/403): gated or private repository."""


class HubUnreachable(HubError):
    """The Hub could not be reached (network error, offline mode or a server error)."""


class HubOffline(HubError):
    """Offline (or the Hub is unreachable) and no verified cached copy exists."""


class DownloadError(HubError):
    """A file transfer failed for good (stalled past the timeout, or an HTTP error)."""


class ChecksumMismatch(DownloadError):
    """Downloaded bytes do not match the Hub's sha256; the file has been deleted."""


class InsufficientDiskSpace(HubError):
    """The cache's file system lacks room for the download."""
