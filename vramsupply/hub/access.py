"""How to reach the Hub: endpoint, token and offline mode, read from the environment at call time.

huggingface_hub reads `HF_ENDPOINT`, `HF_HUB_OFFLINE` and friends once, at import. A daemon, or a
test that starts a fake Hub after the import, needs them read when a model is prepared, so every
Hub call here gets an explicit `endpoint=` and `token=`.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import httpx2
from huggingface_hub import HfApi, get_token, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import build_hf_headers, set_client_factory
from huggingface_hub.utils._http import default_client_factory

from vramsupply import __version__
from vramsupply.config import DEFAULT_DOWNLOAD_TIMEOUT
from vramsupply.hub.errors import HubAuthError, HubError, HubUnreachable

DEFAULT_ENDPOINT = "https://huggingface.co"
# Seconds without a byte (or an answer) before a Hub call or download gives up.
DEFAULT_TIMEOUT = DEFAULT_DOWNLOAD_TIMEOUT
_TRUE = {"1", "on", "yes", "true"}


def auth_help(repo_id: str, endpoint: str) -> str:
    return (
        f"access to {repo_id} was refused: accept the model's licence at {endpoint}/{repo_id} "
        "and set HF_TOKEN to an access token of that account"
    )


@dataclass(frozen=True)
class HubAccess:
    endpoint: str
    token: str | None
    offline: bool
    timeout: float

    @classmethod
    def from_env(cls, timeout: float) -> HubAccess:
        return cls(
            endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=os.environ.get("HF_TOKEN") or get_token(),
            offline=os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
            timeout=timeout,
        )

    def api(self) -> HfApi:
        _bound_hub_client_waits(self.timeout)
        return HfApi(endpoint=self.endpoint, token=self.token or False, library_name="vramsupply", library_version=__version__)

    def file_url(self, repo_id: str, revision: str, path: str) -> str:
        return hf_hub_url(repo_id, path, revision=revision, endpoint=self.endpoint)

    def headers(self) -> dict[str, str]:
        return build_hf_headers(token=self.token or False, library_name="vramsupply", library_version=__version__)


@lru_cache(maxsize=1)
def _bound_hub_client_waits(timeout: float) -> None:
    """huggingface_hub's shared client waits forever by default and `list_models` takes no timeout,
    so a Hub that accepts connections but never answers would hang `serve`; give its client ours."""

    def client_with_timeout() -> httpx2.Client:
        client = default_client_factory()
        client.timeout = httpx2.Timeout(timeout)
        return client

    set_client_factory(client_with_timeout)


@contextmanager
def hub_errors(repo_id: str, access: HubAccess) -> Iterator[None]:
    """Turn huggingface_hub's and httpx2's exceptions into our one-line HubErrors, including those
    of an answer that is not the JSON the Hub sends (a captive portal's HTML page with HTTP 200).

    RepositoryNotFoundError passes through: whether a missing repo is an error depends on the caller.
    """
    try:
        yield
    except GatedRepoError:
        raise HubAuthError(auth_help(repo_id, access.endpoint)) from None
    except RepositoryNotFoundError:
        raise
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise HubAuthError(auth_help(repo_id, access.endpoint)) from None
        if status == 429 or status >= 500:
            asked = retry_after(exc.response.headers)
            later = f" (it asks to wait {asked:.0f} s)" if asked is not None else ""
            raise HubUnreachable(f"the Hub at {access.endpoint} answered HTTP {status} for {repo_id}{later}") from None
        raise HubError(f"the Hub at {access.endpoint} rejected the request for {repo_id}: HTTP {status}") from None
    except (httpx2.RequestError, OfflineModeIsEnabled) as exc:  # RequestError: TooManyRedirects, DecodingError too
        raise HubUnreachable(f"cannot reach the Hub at {access.endpoint} ({type(exc).__name__}: {exc})") from None
    except json.JSONDecodeError as exc:  # a captive portal or proxy answered in the Hub's place
        raise HubError(f"the Hub at {access.endpoint} answered the request for {repo_id} with something that is not JSON ({_short(exc)}); is a proxy or captive portal in the way?") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # huggingface_hub reading an answer of the wrong shape
        raise HubError(f"the Hub at {access.endpoint} sent metadata for {repo_id} that cannot be read ({type(exc).__name__}: {_short(exc)})") from None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds a ``Retry-After`` header asks for (a number of seconds, or an HTTP date); None
    without one, or one that cannot be read."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0) if value.replace(".", "", 1).isdigit() else _until(email.utils.parsedate_to_datetime(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _until(when: datetime.datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
