"""The URLs a provider writes in settings: the endpoint URL the platform calls, the platform's own.

Apart from ``settings.py`` because each rule is also the platform side's (``platform/offer.py``,
``platform/reachability.py``): a URL a parser would rewrite is refused, never mended, so the
address called is the one written.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import AnyHttpUrl, TypeAdapter, ValidationError

HTTP_URL = TypeAdapter(AnyHttpUrl)
URL_CHARACTERS = "a URL has no spaces, control characters or backslashes (URL parsers drop or rewrite them, so another address would be called)"


def url_characters_ok(url: str) -> bool:
    return not any(ch.isspace() or not ch.isprintable() or ch == "\\" for ch in url)


def endpoint_url_problem(url: str) -> str | None:
    """What keeps ``url`` from being an endpoint URL (the base the platform adds ``/health`` and
    ``/v1/...`` to, exactly as registered), or None. Phrased to follow "endpoint URL 'x' ".

    Anything a URL parser would change is refused rather than registered: the platform and the
    buyers' clients would call the address the parser made of it, not the one the provider wrote.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if not url_characters_ok(url):
        return "must not contain spaces, control characters or backslashes (URL parsers drop or rewrite them, so another address would be called)"
    if "?" in url or "#" in url:
        return "must be a base URL without ?query or #fragment"
    if "@" in parts.netloc:
        return "must not carry a user name or password: the platform authenticates with the endpoint token"
    if ends_in_v1(url):
        return f"must be the base URL, without /v1 (the platform adds /health and /v1/...): use {base_of(url)}"
    try:
        if parts.port == 0:  # raises for a port that is no number or out of range
            raise ValueError("port 0")
        normal = str(HTTP_URL.validate_python(url)).rstrip("/")
    except (ValueError, ValidationError):
        return "must have a valid host and a port from 1 to 65535"
    if not url.isascii() or urlsplit(normal).path.rstrip("/") != parts.path.rstrip("/"):
        return f"is read by URL parsers as {normal}: write it that way"
    return None


def platform_url_problem(url: str) -> str | None:
    """What keeps ``url`` from being the platform's base URL, the one the agent adds ``/v1/...`` to,
    or None. Refused, not mended: the provider copied it from somewhere that says otherwise (a
    buyer's OpenAI base URL, the platform's API docs), and a URL rewritten without a word would
    leave that copy wrong for whatever else reads it."""
    if "?" in url or "#" in url:
        return "must be the platform's base URL, without ?query or #fragment (the agent adds /v1/... to it)"
    if ends_in_v1(url):
        return f"must be the platform's base URL, without /v1 (the agent adds /v1/... to it): drop the /v1 and use {base_of(url)}"
    return None


def ends_in_v1(url: str) -> bool:
    """The agent prints its URLs with /v1; the endpoint URL is the base the platform adds paths to."""
    return urlsplit(url).path.rstrip("/").lower().endswith("/v1")


def base_of(url: str) -> str:
    """``url`` without its trailing /v1."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return parts._replace(path=path[: -len("/v1")]).geturl()
