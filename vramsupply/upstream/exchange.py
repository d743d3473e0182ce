"""One forwarded request: what it asked, the text that came back, and the usage it is billed for.

The text is kept for counting (an upstream without usage is counted with its tokenizer, see
``usage``), so every answer and chunk is checked on its way through: ``choices`` a list of
objects whose text, message, delta and tool calls have the types OpenAI gives them. Anything else
is ``BadAnswer`` (502, or an error event on a stream), never a crash of ours halfway through a
buyer's answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from vramsupply.server.accounting import FinishedRequest
from vramsupply.server.responses import new_id
from vramsupply.upstream.client import UpstreamUnavailable, describe
from vramsupply.upstream.front import FrontState
from vramsupply.upstream.limits import BadAnswer
from vramsupply.upstream.usage import CountedUsage, UsageBounds, UsageCounter

log = logging.getLogger("vramsupply.upstream")

SETTLE_AFTER_FAILURE_SECONDS = 15.0
"""Counting a failed stream may need the upstream (its tokenizer): not longer than this."""


@dataclass
class Exchange:
    state: FrontState
    path: str
    body: dict[str, Any]
    buyer_wants_usage: bool
    texts: dict[int, str] = field(default_factory=dict)
    usage: CountedUsage | None = None
    request_id: str = ""
    complete: bool = True
    """False for a stream that failed, or ended without ``[DONE]``: billed for what was sent."""

    @property
    def bounds(self) -> UsageBounds:
        return UsageBounds.of(self.state.n_ctx, self.body)

    def collect(self, chunk: dict[str, Any], *, whole: bool = False) -> None:
        """Keep the answer's id and each choice's generated text, in case the upstream reports no usage."""
        if not self.request_id and isinstance(chunk.get("id"), str):
            self.request_id = chunk["id"][:200]
        choices = chunk.get("choices")
        if choices is None and not whole:
            return
        if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
            raise BadAnswer("its answer has malformed choices")
        for choice in choices:
            index = choice.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1 << 16:
                raise BadAnswer("its answer has a malformed choice index")
            self.texts[index] = self.texts.get(index, "") + text_of(choice)

    async def settle(self) -> CountedUsage | None:
        """The usage to bill: the upstream's, else counted with the tokenizer; recorded once."""
        if self.usage is None:
            counter = UsageCounter(self.state.client, self.state.tokenizer)
            try:
                self.usage = await counter.count(self.path, self.body, [self.texts[i] for i in sorted(self.texts)], self.bounds)
            except UpstreamUnavailable as exc:  # the answer was delivered; an uncounted request is logged, not failed
                log.warning("could not count the usage of a %s answer: %s", self.path, describe(exc))
                return None
        record(self.state, self.usage)
        await self.state.accounts.record(self.finished(self.usage))
        return self.usage

    async def settle_failed(self) -> None:
        """A stream that failed part way: bill what was sent, without waiting long for a tokenizer."""
        self.complete = False
        if self.usage is None and not any(self.texts.values()):
            return
        try:
            await asyncio.wait_for(self.settle(), SETTLE_AFTER_FAILURE_SECONDS)
        except asyncio.TimeoutError:
            log.warning("could not count the usage of a failed %s stream within %gs", self.path, SETTLE_AFTER_FAILURE_SECONDS)

    def finished(self, usage: CountedUsage) -> FinishedRequest:
        """The earnings ledger's record, written before the buyer receives the last byte."""
        return FinishedRequest(
            request_id=self.request_id or new_id("req"),
            model=self.state.model_id,
            choices=max(1, len(self.texts)),
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            complete=self.complete,
            token_presented=self.state.endpoint_token is not None,
        )


def text_of(choice: dict[str, Any]) -> str:
    """The generated text of a choice or delta: ``text``, or the message's content, reasoning and tool calls."""
    if choice.get("text") is not None:
        return text(choice, "text")
    message = choice.get("delta", choice.get("message"))
    if message is None:
        return ""
    if not isinstance(message, dict):
        raise BadAnswer("its answer has a malformed message")
    parts = [text(message, "reasoning_content"), text(message, "content")]
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(isinstance(call, dict) for call in calls)):
        raise BadAnswer("its answer has malformed tool calls")
    for call in calls or []:
        function = call.get("function")
        if function is None:
            continue
        if not isinstance(function, dict):
            raise BadAnswer("its answer has a malformed tool call")
        arguments = function.get("arguments")  # an object from some servers: counted as its JSON
        parts += [text(function, "name"), arguments if isinstance(arguments, str) or arguments is None else json.dumps(arguments)]
    return "".join(part for part in parts if part)


def text(fields: dict[str, Any], name: str) -> str:
    """A text field: a string, or absent (null); anything else is a malformed answer."""
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadAnswer(f"its answer has a malformed {name}")
    return value


def record(state: FrontState, usage: CountedUsage) -> None:
    counters = state.counters
    counters.requests_total += 1
    counters.prompt_tokens_total += usage.prompt_tokens
    counters.completion_tokens_total += usage.completion_tokens
    counters.cached_tokens_total += usage.cached_tokens
    counters.usage_sources[usage.source] = counters.usage_sources.get(usage.source, 0) + 1
    # /metrics reads these counters at scrape time (FrontState.stats), as heartbeats do.
