"""Exact usage for every forwarded request, whatever the upstream reports.

Buyers are billed from ``usage``, so every answer must carry one. The front asks the upstream for it
(``stream_options.include_usage`` on every stream) and takes its counts: vLLM, SGLang, llama-server,
Ollama's ``/v1`` and LM Studio all report them. An upstream that gives none (``llama_cpp.server``
streams carry no usage) is counted with the model's own tokenizer, through the upstream's tokenize
endpoint (``/extras/tokenize`` of llama_cpp.server, ``/tokenize`` of llama-server and vLLM):

- completion tokens: each choice's text as it continues a prompt, i.e. the tokens of ``"\n" + text``
  minus those of ``"\n"`` (a text tokenized on its own gets a leading-space token a continuation
  never has, and BOS; the anchor cancels both). On the tiny test model this matched the server's
  own non-streamed counts in every case tried. A choice the model's end-of-sequence token ended
  (or a stop token id) generated that token too, which no text shows: llama-server, vLLM and SGLang
  count it (llama-server answers 1 completion token for an answer that is only its EOS), so it is
  added, one a choice, where the tokenizer is theirs (``/tokenize``); llama_cpp.server
  (``/extras/tokenize``) stops before counting it, and nothing is added there;
- prompt tokens of ``/v1/completions``: each prompt as the server tokenizes it (with BOS: llama-server's
  ``/tokenize`` adds it only when asked, ``add_special``), or the length of a token-id prompt;
- prompt tokens of a chat: only the server knows its chat template, so the same messages are replayed
  once without streaming and with ``max_tokens`` 1 after the stream ended; its ``usage.prompt_tokens``
  is the exact count, and the replay is served from the server's prompt cache.

Counting needs the upstream, which may have just died (the stream it cut is counted after). A
counting request on a connection the upstream dropped is asked again at once (``post_counting``); a
failure that asking again later may mend (no connection, no answer in time, a 5xx) is
``UpstreamUnavailable``, and the request is counted again once the upstream answers
(``exchange``); an answer that cannot count it (no tokenize endpoint, an implausible or oversized
count) is ``CountImpossible``. A request that cannot be counted at all is recorded with an
``estimate`` from its text (bytes / 4) rather than not at all.

An upstream's own usage is passed on with its details (``prompt_tokens_details``,
``completion_tokens_details``: reasoning tokens, audio, predictions), each checked as a count.

``Usage.source`` says which method counted a request: "upstream", "tokenizer" or "estimate".
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vramsupply.upstream.client import PROBE_TIMEOUT, UpstreamClient, UpstreamUnavailable, describe

log = logging.getLogger("vramsupply.upstream")

CONTINUATION_ANCHOR = "\n"


class CountImpossible(UpstreamUnavailable):
    """The upstream answered, but not with anything that counts this request: asking again will not help."""


@dataclass(frozen=True)
class CountedUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    source: str = "upstream"
    prompt_details: dict[str, int] = field(default_factory=dict)
    completion_details: dict[str, int] = field(default_factory=dict)
    """The upstream's own details (``usage_of``), passed on to the buyer as it gave them."""

    def as_json(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        prompt_details = {**self.prompt_details, **({"cached_tokens": self.cached_tokens} if self.cached_tokens else {})}
        if prompt_details:
            usage["prompt_tokens_details"] = prompt_details
        if self.completion_details:
            usage["completion_tokens_details"] = dict(self.completion_details)
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
        prompts = prompts_of(body)
        n = body.get("n") if _count(body.get("n")) and body.get("n") else 1
        return cls(prompt=context * prompts, completion=context * prompts * min(n, 1024))


def prompts_of(body: dict[str, Any]) -> int:
    """The prompts of a request: a /v1/completions batch (a list of texts or of token lists), else 1."""
    prompt = body.get("prompt")
    return len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1


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
    prompt_details, completion_details = _details(details, prompt), _details(usage.get("completion_tokens_details"), completion)
    return CountedUsage(prompt, completion, cached or 0, prompt_details=prompt_details, completion_details=completion_details)


DETAIL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_DETAILS = 16


def _details(details: Any, most: int) -> dict[str, int]:
    """The upstream's usage details worth passing on: named counts of at most ``most`` tokens (a
    part of the total they detail); anything else in them (text, nesting, floats) is dropped."""
    if not isinstance(details, dict):
        return {}
    counts = {k: v for k, v in details.items() if isinstance(k, str) and DETAIL_NAME.fullmatch(k) and _count(v, most)}
    return dict(list(counts.items())[:MAX_DETAILS])


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

    async def count(self, session: aiohttp.ClientSession, text: str, *, special: bool) -> int:
        """Tokens in ``text``; with ``special`` as the server counts a prompt (BOS included)."""
        endpoint = await self._find(session)
        tokens = await self._tokenize(session, endpoint, text)
        if special:
            return tokens
        return max(0, tokens - await self._special_count(session, endpoint))

    async def counts_end_tokens(self, session: aiohttp.ClientSession) -> bool:
        """Whether the server counts the end-of-sequence token a choice ended with (see the module docstring)."""
        return await self._find(session) != "/extras/tokenize"

    async def count_continuation(self, session: aiohttp.ClientSession, text: str) -> int:
        """Tokens ``text`` adds when it continues a prompt (see the module docstring)."""
        if not text:
            return 0
        if self._anchor is None:
            self._anchor = await self.count(session, CONTINUATION_ANCHOR, special=True)
        return max(0, await self.count(session, CONTINUATION_ANCHOR + text, special=True) - self._anchor)

    async def _find(self, session: aiohttp.ClientSession) -> str:
        async with self._lock:
            if self._endpoint is None:
                failures: list[UpstreamUnavailable] = []
                for endpoint in self.ENDPOINTS:
                    try:
                        await self._tokenize(session, endpoint, "")
                    except UpstreamUnavailable as exc:
                        failures.append(exc)
                        continue
                    self._endpoint = endpoint
                    break
                else:
                    reasons = "; ".join(str(exc) for exc in failures)
                    if all(isinstance(exc, CountImpossible) for exc in failures):
                        raise CountImpossible(f"the upstream reports no usage (or one it cannot have counted) and has no tokenize endpoint ({reasons})")
                    raise UpstreamUnavailable(f"the upstream's tokenizer did not answer ({reasons})")
            return self._endpoint

    async def _special_count(self, session: aiohttp.ClientSession, endpoint: str) -> int:
        """Tokens the endpoint adds to any text (BOS): what an empty string tokenizes to."""
        if self._special_tokens is None:
            self._special_tokens = await self._tokenize(session, endpoint, "")
        return self._special_tokens

    async def _tokenize(self, session: aiohttp.ClientSession, endpoint: str, text: str) -> int:
        # llama-server reads "content" and adds BOS only with "add_special"; vLLM reads "prompt" (BOS by default)
        body = {"input": text} if endpoint == "/extras/tokenize" else {"content": text, "add_special": True, "prompt": text, "model": self._model}
        url = self._client.root_url + endpoint
        try:
            status, answer = await post_counting(session, url, body, PROBE_TIMEOUT)
            if status != 200:
                raise unanswered(status, f"{url} answered {status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamUnavailable(f"{url}: {describe(exc)}") from None
        except ValueError as exc:
            raise CountImpossible(f"{url}: {describe(exc)}") from None
        if isinstance(answer, dict) and "count" in answer:
            if not _count(answer["count"]):
                raise CountImpossible(f"{url} returned an implausible count")
            return int(answer["count"])
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise CountImpossible(f"{url} did not return tokens")
        return len(tokens)


def open_session(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """``session``, unless the agent closed it as it stopped: counting ends there, and a new session
    (the upstream client makes one on demand) would outlive the agent."""
    if session.closed:
        raise UpstreamUnavailable("the agent is stopping")
    return session


DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)
"""How a connection the server had closed fails a request sent on it (or answered on it, cut)."""


async def post_counting(session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> tuple[int, Any]:
    """A counting request (a tokenize, the 1-token replay): its status, and its JSON answer when 200.
    Asked again once when the connection dropped: a pooled one the server had just closed
    (``client``'s module docstring), which aiohttp then discards. Both requests only read what the
    server counts: asking twice changes nothing. A connection refused is a server down: not asked again."""
    try:
        return await _post_json(session, url, body, timeout)
    except DROPPED as exc:
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise
        log.debug("%s: %s; asking again", url, describe(exc))
    return await _post_json(session, url, body, timeout)


async def _post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> tuple[int, Any]:
    async with open_session(session).post(url, json=body, timeout=timeout) as reply:
        return reply.status, (await json_capped(reply, url) if reply.status == 200 else None)


def unanswered(status: int, message: str) -> UpstreamUnavailable:
    """A status other than 200: a server error or overload may pass, any other answer will not."""
    return UpstreamUnavailable(message) if status >= 500 or status in (408, 429) else CountImpossible(message)


COUNTING_ANSWER_MAX_BYTES = 16 << 20
"""A tokenize or replay answer, decompressed: a long prompt's token list is a few MB at most."""


async def json_capped(reply: aiohttp.ClientResponse, url: str) -> Any:
    """The answer's JSON, or CountImpossible once it grows past ``COUNTING_ANSWER_MAX_BYTES``
    (an upstream answering a count with a gigabyte, or a gzip bomb, must not fill our memory)."""
    body = bytearray()
    async for chunk in reply.content.iter_any():
        body += chunk
        if len(body) > COUNTING_ANSWER_MAX_BYTES:
            raise CountImpossible(f"{url}'s answer is larger than {COUNTING_ANSWER_MAX_BYTES} bytes")
    return json.loads(body)


class UsageCounter:
    """Counts a request the upstream gave no usage for (see the module docstring), through
    ``session``: the one its answer came through, which closes when the agent stops."""

    def __init__(self, client: UpstreamClient, tokenizer: Tokenizer, session: aiohttp.ClientSession) -> None:
        self._client = client
        self._tokenizer = tokenizer
        self._session = session

    @property
    def closed(self) -> bool:
        """The agent is stopping: nothing can be counted through the upstream any more."""
        return self._session.closed

    async def count(self, path: str, body: dict[str, Any], texts: list[str], ended: int, bounds: UsageBounds) -> CountedUsage:
        """``texts``: each choice's generated text; ``ended``: the choices an end-of-sequence token ended."""
        completion = await self.completion_tokens(texts, ended)
        prompt = await self._prompt_tokens(path, body, bounds)
        if not (_count(prompt, bounds.prompt) and _count(completion, bounds.completion)):
            raise CountImpossible(f"the tokenizer counted an implausible {prompt} prompt and {completion} completion tokens")
        return CountedUsage(prompt, completion, source="tokenizer")

    async def completion_tokens(self, texts: list[str], ended: int) -> int:
        """Every choice's generated tokens, each as it continues its prompt, and the end-of-sequence
        token of the ``ended`` choices where the server counts it."""
        text_tokens = sum([await self._tokenizer.count_continuation(self._session, text) for text in texts])
        return text_tokens + (ended if ended and await self._tokenizer.counts_end_tokens(self._session) else 0)

    async def with_completion_counted(self, usage: CountedUsage, texts: list[str], ended: int, bounds: UsageBounds) -> CountedUsage:
        """``usage``'s prompt counts, with every choice's completion tokens counted here (an upstream
        whose usage counts one choice of several: ``FrontState.one_choice_usage``)."""
        completion = await self.completion_tokens(texts, ended)
        if not _count(completion, bounds.completion):
            raise CountImpossible(f"the tokenizer counted an implausible {completion} completion tokens")
        return CountedUsage(usage.prompt_tokens, completion, usage.cached_tokens, "tokenizer", dict(usage.prompt_details))

    async def _prompt_tokens(self, path: str, body: dict[str, Any], bounds: UsageBounds) -> int:
        prompts = completion_prompts(body.get("prompt")) if path == "/completions" else None
        if prompts is None:
            return await self._replayed_prompt_tokens(path, body, bounds)
        counts = [len(p) if isinstance(p, list) else await self._tokenizer.count(self._session, p, special=True) for p in prompts]
        return sum(counts)

    async def _replayed_prompt_tokens(self, path: str, body: dict[str, Any], bounds: UsageBounds) -> int:
        """The server's own prompt count for these messages: one non-streamed 1-token replay."""
        replay = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n", "max_tokens", "max_completion_tokens")}
        replay.update(max_tokens=1, stream=False)
        url = self._client.base_url + path
        try:
            status, answer = await post_counting(self._session, url, replay, aiohttp.ClientTimeout(total=120))
            if status != 200:
                raise unanswered(status, f"counting the prompt failed: {url} answered {status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamUnavailable(f"counting the prompt failed: {describe(exc)}") from None
        except ValueError as exc:
            raise CountImpossible(f"counting the prompt failed: {describe(exc)}") from None
        usage = usage_of(answer, bounds) if isinstance(answer, dict) else None
        if usage is None:
            raise CountImpossible("the upstream reports no usage (or one it cannot have counted) even for a non-streamed request")
        return usage.prompt_tokens


def completion_prompts(prompt: Any) -> list[str | list[int]] | None:
    """The prompts of a ``/v1/completions`` request, each a text or token ids (a batch is a list of
    either), counted one by one; None for anything else (the replay counts it, as the server does)."""
    if isinstance(prompt, str) or _token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        return list(prompt)
    return None


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


ESTIMATE_BYTES_PER_TOKEN = 4


def estimate(path: str, body: dict[str, Any], texts: list[str], bounds: UsageBounds) -> CountedUsage:
    """A request no tokenizer could count, estimated rather than left out of the ledger: UTF-8 bytes
    / ``ESTIMATE_BYTES_PER_TOKEN`` of its generated texts and of its prompt's text (a token-id prompt
    by its length). Only text is weighed: message roles, tools and images are not."""
    asked = body.get("prompt") if path == "/completions" else [m.get("content") for m in body.get("messages") or [] if isinstance(m, dict)]
    prompt = min(_estimated(asked), bounds.prompt)
    completion = min(sum(_estimated(text) for text in texts), bounds.completion)
    return CountedUsage(prompt, completion, source="estimate")


def _estimated(value: Any) -> int:
    """Tokens in a prompt, a message's content (a text, or parts with "text"), token ids, or lists of them."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += -(-len(item.encode("utf-8", "replace")) // ESTIMATE_BYTES_PER_TOKEN)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += 1  # a token id
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict) and item.get("type", "text") == "text":
            stack.append(item.get("text"))
    return total
