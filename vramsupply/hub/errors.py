"""Errors of model resolution and download. Every message is one readable line for the CLI."""

from __future__ import annotations

from vramsupply.errors import VramsupplyError


class HubError(VramsupplyError):
    """Base class: the model could not be made available locally; the message says why and what to do."""


class InvalidModelSpec(HubError):
    """The model argument (or the quant) is malformed: neither an `org/model` id the Hub accepts nor
    a local path. A usage error, exit 2 as for an invalid setting: no download, retry or file put in
    place later makes it work, where a well-formed id the Hub lacks is ModelNotFound (exit 1)."""

    exit_code = 2


class ModelFileError(HubError):
    """A local model path names no usable .gguf file: nothing there, unreadable, or not GGUF. Exit 1,
    as for a Hub id the Hub lacks: the path is well-formed, what is on disk is wrong."""


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
