"""Exact usage for every forwarded request, whatever the upstream reports.

Buyers are billed from ``usage``, so every answer must carry one. The front asks the upstream for it
(``stream_options.include_usage`` on every stream) and takes its counts: vLLM, SGLang, llama-server,
Ollama's ``/v1`` and LM Studio all report them. An upstream that gives none (``llama_cpp.server``
streams carry no usage) is counted with the model's own tokenizer, through the upstream's tokenize
endpoint (``/extras/tokenize`` of llama_cpp.server, ``/tokenize`` of llama-server and vLLM):

- completion tokens: each choice's text as it continues a prompt, i.e. the tokens of ``"\n" + text``
  minus those of ``"\n"`` (a text tokenized on its own gets a leading-space token a continuation
  never has, and BOS; the anchor cancels both). On the tiny test model this matched the server's
  own non-streamed counts in every case tried;
- prompt tokens of ``/v1/completions``: the prompt as the server tokenizes it (with BOS), or the
  length of a token-id prompt;
- prompt tokens of a chat: only the server knows its chat template, so the same messages are replayed
  once without streaming and with ``max_tokens`` 1 after the stream ended; its ``usage.prompt_tokens``
  is the exact count, and the replay is served from the server's prompt cache.

``Usage.source`` says which method counted a request: "upstream" or "tokenizer".
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from vramsupply.upstream.client import PROBE_TIMEOUT, UpstreamClient, UpstreamUnavailable, describe

log = logging.getLogger("vramsupply.upstream")

CONTINUATION_ANCHOR = "\n"


@dataclass(frozen=True)
class CountedUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    source: str = "upstream"

    def as_json(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


MAX_TOKENS_ANY_REQUEST = 1 << 31
"""The bound when the served context is not known yet: far above any real request, far below
what the ledger (SQLite's 64-bit integers) or a heartbeat could not hold."""


@dataclass(frozen=True)
class UsageBounds:
    """The most tokens one request can use: its prompts within the context, each choice within it."""

    prompt: int = MAX_TOKENS_ANY_REQUEST
    completion: int = MAX_TOKENS_ANY_REQUEST

    @classmethod
    def of(cls, n_ctx: int, body: dict[str, Any]) -> UsageBounds:
        context = n_ctx if n_ctx > 0 else MAX_TOKENS_ANY_REQUEST
        prompt = body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        n = body.get("n") if _count(body.get("n")) and body.get("n") else 1
        return cls(prompt=context * prompts, completion=context * prompts * min(n, 1024))


def usage_of(payload: dict[str, Any], bounds: UsageBounds | None = None) -> CountedUsage | None:
    """The upstream's own usage in a response or chunk; None when absent or implausible: counts
    that are not non-negative integers, past what the request could use, or more cached prompt
    tokens than prompt tokens. Buyers are billed from it, so a bad one is never taken."""
    bounds = bounds or UsageBounds()
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (_count(prompt, bounds.prompt) and _count(completion, bounds.completion)):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is not None and not _count(cached, prompt):
        return None
    return CountedUsage(prompt, completion, cached or 0)


def _count(value: Any, most: int = MAX_TOKENS_ANY_REQUEST) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


class Tokenizer:
    """The upstream's tokenize endpoint, found on first use: the model's own tokenizer, remotely."""

    ENDPOINTS = ("/extras/tokenize", "/tokenize")

    def __init__(self, client: UpstreamClient, model: str) -> None:
        self._client = client
        self._model = model
        self._endpoint: str | None = None
        self._special_tokens: int | None = None
        self._lock = asyncio.Lock()
        self._anchor: int | None = None

    async def count(self, text: str, *, special: bool) -> int:
        """Tokens in ``text``; with ``special`` as the server counts a prompt (BOS included)."""
        endpoint = await self._find()
        tokens = await self._tokenize(endpoint, text)
        if special:
            return tokens
        return max(0, tokens - await self._special_count(endpoint))

    async def count_continuation(self, text: str) -> int:
        """Tokens ``text`` adds when it continues a prompt (see the module docstring)."""
        if not text:
            return 0
        if self._anchor is None:
            self._anchor = await self.count(CONTINUATION_ANCHOR, special=True)
        return max(0, await self.count(CONTINUATION_ANCHOR + text, special=True) - self._anchor)

    async def _find(self) -> str:
        async with self._lock:
            if self._endpoint is None:
                reasons = []
                for endpoint in self.ENDPOINTS:
                    try:
                        await self._tokenize(endpoint, "")
                    except UpstreamUnavailable as exc:
                        reasons.append(str(exc))
                        continue
                    self._endpoint = endpoint
                    break
                else:
                    raise UpstreamUnavailable(f"the upstream reports no usage and has no tokenize endpoint ({'; '.join(reasons)})")
            return self._endpoint

    async def _special_count(self, endpoint: str) -> int:
        """Tokens the endpoint adds to any text (BOS): what an empty string tokenizes to."""
        if self._special_tokens is None:
            self._special_tokens = await self._tokenize(endpoint, "")
        return self._special_tokens

    async def _tokenize(self, endpoint: str, text: str) -> int:
        body = {"input": text} if endpoint == "/extras/tokenize" else {"content": text, "prompt": text, "model": self._model}
        url = self._client.root_url + endpoint
        try:
            async with self._client.session.post(url, json=body, timeout=PROBE_TIMEOUT) as reply:
                if reply.status != 200:
                    raise UpstreamUnavailable(f"{url} answered {reply.status}")
                answer = await json_capped(reply, url)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(f"{url}: {describe(exc)}") from None
        if isinstance(answer, dict) and "count" in answer:
            if not _count(answer["count"]):
                raise UpstreamUnavailable(f"{url} returned an implausible count")
            return int(answer["count"])
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise UpstreamUnavailable(f"{url} did not return tokens")
        return len(tokens)


COUNTING_ANSWER_MAX_BYTES = 16 << 20
"""A tokenize or replay answer, decompressed: a long prompt's token list is a few MB at most."""


async def json_capped(reply: aiohttp.ClientResponse, url: str) -> Any:
    """The answer's JSON, or UpstreamUnavailable once it grows past ``COUNTING_ANSWER_MAX_BYTES``
    (an upstream answering a count with a gigabyte, or a gzip bomb, must not fill our memory)."""
    body = bytearray()
    async for chunk in reply.content.iter_any():
        body += chunk
        if len(body) > COUNTING_ANSWER_MAX_BYTES:
            raise UpstreamUnavailable(f"{url}'s answer is larger than {COUNTING_ANSWER_MAX_BYTES} bytes")
    return json.loads(body)


class UsageCounter:
    """Counts a request the upstream gave no usage for (see the module docstring)."""

    def __init__(self, client: UpstreamClient, tokenizer: Tokenizer) -> None:
        self._client = client
        self._tokenizer = tokenizer

    async def count(self, path: str, body: dict[str, Any], texts: list[str], bounds: UsageBounds) -> CountedUsage:
        """``texts``: each choice's generated text."""
        completion = sum([await self._tokenizer.count_continuation(text) for text in texts])
        prompt = await self._prompt_tokens(path, body, bounds)
        if not (_count(prompt, bounds.prompt) and _count(completion, bounds.completion)):
            raise UpstreamUnavailable(f"the tokenizer counted an implausible {prompt} prompt and {completion} completion tokens")
        return CountedUsage(prompt, completion, source="tokenizer")

    async def _prompt_tokens(self, path: str, body: dict[str, Any], bounds: UsageBounds) -> int:
        prompt = body.get("prompt")
        if path == "/completions" and isinstance(prompt, str):
            return await self._tokenizer.count(prompt, special=True)
        if path == "/completions" and isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        return await self._replayed_prompt_tokens(path, body, bounds)

    async def _replayed_prompt_tokens(self, path: str, body: dict[str, Any], bounds: UsageBounds) -> int:
        """The server's own prompt count for these messages: one non-streamed 1-token replay."""
        replay = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n", "max_tokens", "max_completion_tokens")}
        replay.update(max_tokens=1, stream=False)
        url = self._client.base_url + path
        try:
            async with self._client.session.post(url, json=replay, timeout=aiohttp.ClientTimeout(total=120)) as reply:
                answer = await json_capped(reply, url) if reply.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(f"counting the prompt failed: {describe(exc)}") from None
        usage = usage_of(answer, bounds) if isinstance(answer, dict) else None
        if usage is None:
            raise UpstreamUnavailable("the upstream reports no usage even for a non-streamed request")
        return usage.prompt_tokens
