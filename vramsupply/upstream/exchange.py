"""One forwarded request: what it asked, the text that came back, and the usage it is billed for.

The text is kept for counting (an upstream without usage is counted with its tokenizer, see
``usage``), so every answer and chunk is checked on its way through: ``choices`` a list of
objects whose text, message, delta and tool calls have the types OpenAI gives them. Anything else
is ``BadAnswer`` (502, or an error event on a stream), never a crash of ours halfway through a
buyer's answer.

The text counted is what the model generated: a tool call's name once per call, however often the
upstream repeats it (llama_cpp.server sends it again in every chunk of the call, OpenAI in the
first only), and the stop sequence that ended a choice, which the upstream generated and counts
but never sends (``stop_sequence``). A choice that no stop sequence ended but the model's own end
of sequence (``finish_reason`` "stop" or "tool_calls") generated that token too, sent as no text:
``ended`` counts those choices, and the tokenizer adds their tokens where the upstream counts them
(``usage``).

Counting needs the upstream, which may have just died: the stream it cut is the one to bill. A
request that cannot be counted now is counted again in the background once the upstream answers
(``recount``), for up to ``RECOUNT_FOR_SECONDS``; past that, or when the agent stops first (the
upstream client closes), or when the upstream answers but cannot count it, it is recorded with an
estimate from its text (``usage.estimate``), said in the log: never left out of the ledger. The
shutdown's ledger flush waits for these records as for an abandoned request's.

From its first relayed text until it is billed, a request is in flight in the earnings ledger
(``server.accounting``, ``ledger.in_flight``), under an id of ours (``Exchange.flight_id``), so that an agent killed outright leaves a row of it,
recorded as interrupted at the next start. A request its handler ends unbilled (its buyer hung up,
an answer that was not relayed) loses that row, as nothing of it is recorded; one to be counted
again keeps it until it is billed. Its tokens there are what is known mid-stream (``so_far``), not
a count: the upstream's usage where a chunk carried one for the whole answer (vLLM's
``continuous_usage_stats`` with one choice, or the final usage), which is exact; else the prompt
tokens the upstream reported, or an estimate from the prompt's text (bytes / 4, as ``usage.estimate``:
no template, roles or tools, so mostly under), and one completion token for each piece of text
relayed (a choice's text in one chunk), which is at least one token, exactly one where the
upstream streams a token a chunk, as llama-server, vLLM and SGLang do by default, and counts no
stop sequence or end-of-sequence token: never more than was generated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vramsupply.server.accounting import FinishedRequest, Tracked
from vramsupply.server.responses import new_id
from vramsupply.timeouts import within
from vramsupply.upstream.client import UpstreamUnavailable, describe
from vramsupply.upstream.front import FrontState
from vramsupply.upstream.limits import BadAnswer
from vramsupply.upstream.usage import CountedUsage, CountImpossible, UsageBounds, UsageCounter, estimate, prompts_of

log = logging.getLogger("vramsupply.upstream")

SETTLE_AFTER_FAILURE_SECONDS = 15.0
"""Counting a failed stream may need the upstream (its tokenizer): not longer than this, then in the background."""
RECOUNT_FOR_SECONDS = 300.0
"""How long a request that could not be counted is counted again, before its estimate is recorded."""
RECOUNT_FIRST_DELAY = 1.0
RECOUNT_MAX_DELAY = 30.0
STOPPING_CHECK_SECONDS = 1.0
"""How soon a recount waiting for the upstream notices the agent stopping (then records its estimate)."""


@dataclass
class Exchange:
    state: FrontState
    path: str
    body: dict[str, Any]
    buyer_wants_usage: bool
    texts: dict[int, str] = field(default_factory=dict)
    usage: CountedUsage | None = None
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    """The answer's creation time, the upstream's where its chunks say it (a chunk of our own carries it too)."""
    complete: bool = True
    """False for a stream that failed, or ended without ``[DONE]``: billed for what was sent."""
    tool_names: dict[int, dict[int, str]] = field(default_factory=dict)
    """Per choice, each tool call's name as counted so far (see ``text_of``)."""
    stops: dict[int, str] = field(default_factory=dict)
    """Per choice, the stop sequence that ended it (``stop_sequence``)."""
    ended: set[int] = field(default_factory=set)
    """The choices the model's end-of-sequence token (or a stop token id) ended (see the module docstring)."""
    prompt_usage: CountedUsage | None = None
    """The upstream's usage where only its prompt counts are taken (``take_usage``)."""
    session: aiohttp.ClientSession = field(init=False)
    """The upstream client's session when the request came: counting ends when it closes (the agent stops)."""
    pieces: int = 0
    """Pieces of generated text relayed (a choice's text in one chunk): its completion tokens in flight (``so_far``)."""
    tracked: Tracked | None = None
    """Its row in flight, from its first relayed text (see the module docstring)."""
    flight_id: str = field(default_factory=lambda: new_id("req"))
    """The id its row in flight is kept under: one of ours, as an upstream's ids need not be unique
    (Ollama's are ``chatcmpl-`` and one of 999 numbers), and two requests under one id would share
    one row, which the first to end would take away from the other."""
    prompt_estimate: int | None = None
    recounting: bool = False
    """It is counted again in the background (``recount``): its row in flight stays until it is billed."""

    def __post_init__(self) -> None:
        self.session = self.state.client.session

    @property
    def bounds(self) -> UsageBounds:
        return UsageBounds.of(self.state.n_ctx, self.body)

    def take_usage(self, usage: CountedUsage | None, *, of_a_choice: bool = False) -> CountedUsage | None:
        """The upstream's (plausible) usage as this answer's, or None where it counts one choice's
        completion tokens of several: llama-server's, or one a stream's chunk of choices carries
        (``of_a_choice``: vLLM's ``continuous_usage_stats``, that chunk's choice and prompt alone; the
        final usage chunk counts them all). Only its prompt counts are kept then, and a stream cut
        before any other usage is counted by ``settle``, every choice (the buyer sees that count, billed)."""
        if usage is not None and (self.state.one_choice_usage or of_a_choice) and choices_asked(self.body) > 1:
            self.prompt_usage, usage = usage, None
        if usage is not None:
            self.usage = usage
        return usage

    def collect(self, chunk: dict[str, Any], *, whole: bool = False) -> None:
        """Keep the answer's id and each choice's generated text, in case the upstream reports no usage."""
        if not self.request_id and isinstance(chunk.get("id"), str):
            self.request_id = chunk["id"][:200]
            created = chunk.get("created")
            self.created = created if isinstance(created, int) and not isinstance(created, bool) and created > 0 else self.created
        choices = chunk.get("choices")
        if choices is None and not whole:
            return
        if not isinstance(choices, list) or not all(isinstance(choice, dict) for choice in choices):
            raise BadAnswer("its answer has malformed choices")
        for choice in choices:
            index = choice.get("index", 0)
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1 << 16:
                raise BadAnswer("its answer has a malformed choice index")
            piece = text_of(choice, self.tool_names.setdefault(index, {}))
            self.texts[index] = self.texts.get(index, "") + piece
            self.pieces += 1 if piece else 0
            if choice.get("finish_reason") == "stop":
                self.stops[index] = stop_sequence(choice, self.body)
            if choice.get("finish_reason") in ("stop", "tool_calls") and not self.stops.get(index):
                self.ended.add(index)
        if self.pieces and self.tracked is None:
            self.serving()

    def serving(self) -> None:
        """Its first text is relayed: it is in flight from now on, under an id of ours (``flight_id``)."""
        token = self.state.endpoint_token is not None
        choices = choices_asked(self.body)
        self.tracked = self.state.accounts.track(self.flight_id, self.state.model_id, choices, token_presented=token, counts=self.so_far)
        self.tracked.serving()

    def so_far(self) -> tuple[int, int]:
        """Its prompt and completion tokens in flight, as well as they are known (see the module docstring)."""
        if self.usage is not None:
            return self.usage.prompt_tokens, max(self.usage.completion_tokens, self.pieces)  # a usage the next chunks did not repeat
        if self.prompt_usage is not None:
            return self.prompt_usage.prompt_tokens, self.pieces
        if self.prompt_estimate is None:
            self.prompt_estimate = estimate(self.path, self.body, [], self.bounds).prompt_tokens
        return self.prompt_estimate, self.pieces

    def unbilled(self) -> None:
        """Its handler ended: a row in flight that no record will replace goes (nothing of it is recorded)."""
        if self.tracked is not None and not self.recounting:
            self.tracked.end(recorded=False)

    def generated(self) -> list[str]:
        """Each choice's text as the upstream generated (and counts) it: what it sent, and its stop sequence."""
        return [self.texts[i] + self.stops.get(i, "") for i in sorted(self.texts)]

    async def settle(self) -> CountedUsage | None:
        """The usage to bill: the upstream's, else counted with the tokenizer; recorded once. None
        when it could not be counted now: it is recorded later (see the module docstring), and the
        buyer gets no usage rather than a guess."""
        if self.usage is None:
            try:
                self.usage = await self._count()
            except CountImpossible as exc:
                await self.bill_estimate(describe(exc))
                return None
            except UpstreamUnavailable as exc:
                self.recount_later(describe(exc))
                return None
        await self.bill(self.usage)
        return self.usage

    async def settle_failed(self) -> None:
        """A stream that failed part way: bill what was sent, without waiting long for a tokenizer."""
        self.complete = False
        if self.usage is None and not any(self.texts.values()):
            return
        try:
            await within(self.settle(), SETTLE_AFTER_FAILURE_SECONDS)
        except asyncio.TimeoutError:
            if self.usage is None:  # else it was counted, and its record was on its way
                self.recount_later(f"no count within {SETTLE_AFTER_FAILURE_SECONDS:g}s")

    async def _count(self) -> CountedUsage:
        """The usage counted with the upstream's tokenizer: all of it, or the completion tokens of an
        upstream whose usage counts one choice; a batch's prompts are counted too there, as its usage
        counts one prompt's (llama-server: the first's in a whole answer, each its own in a stream)."""
        counter, ended = self.counter(), len(self.ended)
        if self.prompt_usage is not None and prompts_of(self.body) == 1:
            return await counter.with_completion_counted(self.prompt_usage, self.generated(), ended, self.bounds)
        return await counter.count(self.path, self.body, self.generated(), ended, self.bounds)

    def counter(self) -> UsageCounter:
        return UsageCounter(self.state.client, self.state.tokenizer, self.session)

    async def bill(self, usage: CountedUsage) -> None:
        """The one way a request is billed: the heartbeats' counters, then the earnings ledger.
        Its row in flight, kept under an id of ours, is not the finished row's (which carries the
        upstream's id, as the buyer saw it): the finished row names it (``FinishedRequest.flight_id``)
        and the ledger deletes it in the same commit, as it does our own engine's. Apart, an agent
        killed in between left both, and the next start recorded the sale as interrupted too.
        It stops being in flight first: no tick may write its row again after that commit."""
        record(self.state, usage)
        if self.tracked is not None:
            self.tracked.end(recorded=True)
        await self.state.accounts.record(self.finished(usage))

    async def bill_estimate(self, reason: str) -> None:
        self.usage = usage = estimate(self.path, self.body, self.generated(), self.bounds)
        log.warning(
            "could not count the usage of a %s answer (%s): request %s is recorded with an estimate of %d prompt and %d completion tokens (bytes / 4)",
            self.path, reason, self.request_id or "without an id", usage.prompt_tokens, usage.completion_tokens,
        )
        await self.bill(usage)

    def recount_later(self, reason: str) -> None:
        log.warning(
            "could not count the usage of a %s answer now (%s): counting it again once the upstream answers, for up to %gs",
            self.path, reason, RECOUNT_FOR_SECONDS,
        )
        self.recounting = True
        self.state.accounts.keep(asyncio.create_task(self.recount(reason)))

    async def recount(self, reason: str) -> None:
        """Count again, less and less often, until the upstream answers; else record the estimate."""
        counter, loop = self.counter(), asyncio.get_running_loop()
        give_up, delay = loop.time() + RECOUNT_FOR_SECONDS, RECOUNT_FIRST_DELAY
        while (left := give_up - loop.time()) > 0 and await pause_unless_closed(counter, min(delay, left)):
            try:
                usage = await self._count()
            except CountImpossible as exc:
                reason = describe(exc)
                break
            except UpstreamUnavailable as exc:
                reason, delay = describe(exc), min(2 * delay, RECOUNT_MAX_DELAY)
                continue
            log.info("counted the usage of request %s now that the upstream answers again", self.request_id or "without an id")
            self.usage = usage
            await self.bill(usage)
            return
        await self.bill_estimate("the agent is stopping" if counter.closed else reason)

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
            flight_id=self.flight_id,
        )


async def pause_unless_closed(counter: UsageCounter, seconds: float) -> bool:
    """Wait ``seconds``, or less when the agent stops: whether counting may go on."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while not counter.closed and (left := until - loop.time()) > 0:
        await asyncio.sleep(min(left, STOPPING_CHECK_SECONDS))
    return not counter.closed


def choices_asked(body: dict[str, Any]) -> int:
    """The choices a request asks for: ``n`` for each of its prompts (a list of texts or of token lists)."""
    n = body.get("n")
    return (n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1) * prompts_of(body)


def text_of(choice: dict[str, Any], tool_names: dict[int, str]) -> str:
    """The generated text of a choice or delta: ``text``, or the message's content, reasoning and
    tool calls; ``tool_names``: the choice's tool-call names counted so far, by the call's index.
    A call's name is counted also where the server wrote it itself (a ``tool_choice`` naming the
    function): its arguments, tokenized again, come to fewer tokens than it generated (against
    llama_cpp.server: 28 for 30), and the name's few make up for that, so a buyer is billed
    for what was generated or a little more, not less."""
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
    for position, call in enumerate(calls or []):
        function = call.get("function")
        if function is None:
            continue
        if not isinstance(function, dict):
            raise BadAnswer("its answer has a malformed tool call")
        index = call.get("index", position)
        index = index if isinstance(index, int) and not isinstance(index, bool) else position
        arguments = function.get("arguments")  # an object from some servers: counted as its JSON
        arguments = arguments if isinstance(arguments, str) or arguments is None else json.dumps(arguments)
        parts += [new_name(tool_names, index, text(function, "name")), arguments]
    return "".join(part for part in parts if part)


def new_name(tool_names: dict[int, str], index: int, name: str) -> str:
    """What ``name`` adds to call ``index``'s name: nothing when it repeats the name so far (a whole
    name sent again), else the piece it is (a name sent in pieces, as arguments are)."""
    so_far = tool_names.get(index, "")
    if not name or name == so_far:
        return ""
    tool_names[index] = so_far + name
    return name


def stop_sequence(choice: dict[str, Any], body: dict[str, Any]) -> str:
    """The stop sequence of the request that ended ``choice``: generated and counted by the upstream,
    never sent. The one the upstream names (vLLM's ``stop_reason``, SGLang's ``matched_stop``; a
    token id there is the model's end of sequence: nothing to add), else, as llama_cpp.server names
    none, the shortest the request gave: the least it can be. "" when the request gave none (the
    model's end of sequence, which llama.cpp does not count). Counting the shortest when the model's
    own end of sequence stopped a request that gave stop sequences too is the one error this makes,
    of that sequence's few tokens, against always missing them."""
    stop = body.get("stop")
    given = [s for s in ([stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []) if isinstance(s, str) and s]
    for key in ("stop_reason", "matched_stop"):
        if key in choice:
            return choice[key] if choice[key] in given else ""
    return min(given, key=len, default="")


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
