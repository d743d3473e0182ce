"""The two generation routes: turn a validated body into engine requests and the engine's output
into an OpenAI response, whole or as server-sent events.

A request with ``n`` choices submits ``n`` generations (``submission.py``). Whatever ends the handler (normal end,
an error, the client hanging up, which cancels the handler task), every generation still running
is cancelled in a ``finally`` block, so a departed client never keeps a slot busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from aiohttp import web

from vramsupply.engine import (
    ChatPrompt,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
    SamplingParams,
)
from vramsupply.server.accounting import Bill
from vramsupply.server.batch import batch_usage, check_choices, check_echo
from vramsupply.server.errors import ApiError, completion_id, internal_error
from vramsupply.server.grammar import answer_grammar, chat_grammar, free_thought, holds_answer
from vramsupply.server.logprobs_out import StreamedLogprobs
from vramsupply.server.metrics import ChoiceTiming, RequestClock
from vramsupply.server.chat_shape import ChatShape, forced_call
from vramsupply.server.chunks import sse_event
from vramsupply.server.text_shape import ResponseShape, TextShape, system_fingerprint
from vramsupply.server.responses import (
    FinishReason,
    UsageOut,
    now,
)
from vramsupply.server.schemas import ChatCompletionBody, CompletionBody
from vramsupply.server.submission import engine_error, submit_all
from vramsupply.server.state import BUYER_LEFT, SERVER_STATE, ServerState
from vramsupply.server.vllm_fields import check_fields

INLINE_TOKENIZE_MAX_BYTES = 8192
COSTLY_LOGPROBS = 2000
"""Logprob entries past which a whole answer is built on a worker thread (``_costly_to_shape``)."""
COSTLY_TEXT_CHARS = 1 << 20
T = TypeVar("T")
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

log = logging.getLogger("vramsupply.server")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    state = request.app[SERVER_STATE]
    engine = state.ready_engine()
    body = await state.parse(request, ChatCompletionBody)
    check_fields(body)
    chat = await _tokenize(request, engine.prepare_chat, body.chat_request(), param="messages")
    shape = ChatShape(
        id=completion_id(request, "chatcmpl"),
        created=now(),
        model=state.model_id,
        include_usage=body.include_usage,
        prompt=chat,
        token_bytes=engine.token_bytes,
        forced=forced_call(body.tool_choice, body.tools),
        held_answer=holds_answer(body),
        system_fingerprint=system_fingerprint(engine),
    )
    requests = await chat_generation_requests(body, chat)
    return await _complete(request, state, engine, requests, body.stream, shape, RequestClock(started), body.token_limit_param)


async def completions(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    state = request.app[SERVER_STATE]
    engine = state.ready_engine()
    body = await state.parse(request, CompletionBody)
    check_fields(body)
    check_choices(body)
    check_echo(body)
    prompts = [p if isinstance(p, list) else await _tokenize(request, engine.tokenize_prompt, p, param="prompt") for p in body.prompts]
    check_tokens(prompts)
    shape = TextShape(
        id=completion_id(request, "cmpl"), created=now(), model=state.model_id, include_usage=body.include_usage, token_bytes=engine.token_bytes,
        system_fingerprint=system_fingerprint(engine), per_prompt=body.n, echo=body.prompts if body.echo else (), detokenize=engine.detokenize,
        scored=prompts if body.wants_prompt_logprobs is not None else (), text_bytes=engine.text_bytes,
    )
    first = await generation_requests(body, prompts[0])  # one grammar for all; choice i * n + j is prompt i's j-th
    requests = [dataclasses.replace(r, prompt=prompt) for prompt in prompts for r in first]
    return await _complete(request, state, engine, requests, body.stream, shape, RequestClock(started), per_prompt=body.n)


def check_tokens(prompts: list[list[int]]) -> None:
    """An empty text prompt is the BOS token alone, as at OpenAI; a model that adds none leaves
    nothing to continue from."""
    for index, tokens in enumerate(prompts):
        if not tokens:
            which = "the prompt" if len(prompts) == 1 else f"prompt {index}"
            raise ApiError(400, f"{which} is empty and this model adds no BOS token to a text prompt: send some text", param="prompt", code="invalid_value")


async def _tokenize(request: web.Request, tokenize: Callable[[T], list[int]], value: T, *, param: str) -> list[int]:
    """Tokenize a small body inline and a large one on a thread.

    A short prompt takes microseconds, while a thread hop lets a burst of requests reach the
    engine one decode step apart. A long prompt or chat can take milliseconds, which would stall
    every stream the event loop serves.
    """
    try:
        size = request.content_length
        if size is not None and size <= INLINE_TOKENIZE_MAX_BYTES:
            return tokenize(value)
        return await asyncio.to_thread(tokenize, value)
    except EngineError as exc:
        raise engine_error(exc, param) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param=getattr(exc, "param", param), code=getattr(exc, "code", "invalid_value")) from None


async def generation_requests(
    body: ChatCompletionBody | CompletionBody, prompt: list[int], extra_stop: tuple[str, ...] = ()
) -> list[GenerationRequest]:
    """One engine request per choice; with a seed, each choice its own (``choice_seed``), so choices
    differ yet reproduce as far as a seed can (the README's Sampling: logits differ in their last
    bits with the batch and the prompt cache).

    ``extra_stop`` holds stop strings the chat template needs (the chat prompt's ``stop``).
    """
    try:
        return _generation_requests(body, await answer_grammar(body), prompt, (*body.stop, *extra_stop))
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None


async def chat_generation_requests(body: ChatCompletionBody, chat: ChatPrompt) -> list[GenerationRequest]:
    """A chat's requests: the template's stop strings and marker tokens, and the grammar of its
    calls, its JSON response_format, or either (``grammar.chat_grammar``)."""
    requests = await generation_requests(body, chat.tokens, extra_stop=chat.stop)
    grammar = chat_grammar(chat, requests[0].sampling.grammar)
    thought = free_thought(chat, grammar)
    try:
        return [
            dataclasses.replace(r, preserve=chat.preserve, sampling=dataclasses.replace(r.sampling, **grammar), thought=thought)
            for r in requests
        ]
    except ValueError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None


RANDOM_SEED = -1
"""llama-server's way to ask for a random seed: every choice draws its own."""


def choice_seed(seed: int, index: int) -> int | None:
    """Choice ``index``'s seed (None: a random one). The first choice takes the request's seed as
    it is, as with ``n`` 1; a later one a seed hashed from both, so the choices of nearby seeds
    share no samples (seed + index made choice 1 of seed 100 choice 0 of seed 101, and the later
    choices of -1 no random seeds at all, but 0, 1, ...)."""
    if seed == RANDOM_SEED:
        return None
    if index == 0:
        return seed
    whole = f"{seed}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(whole, digest_size=4, person=b"vramsupply-n").digest(), "little") % (2**32 - 1)


def _generation_requests(
    body: ChatCompletionBody | CompletionBody, grammar: str | None, prompt: list[int], stop: tuple[str, ...]
) -> list[GenerationRequest]:
    given = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repeat_penalty": body.repeat_penalty if body.repeat_penalty is not None else body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "grammar": grammar,
    }
    sampling = SamplingParams(**{name: value for name, value in given.items() if value is not None}, logit_bias=body.logit_bias)
    return [
        GenerationRequest(
            prompt=prompt,
            sampling=sampling if body.seed is None else dataclasses.replace(sampling, seed=choice_seed(body.seed, i)),
            max_tokens=body.token_limit,
            stop=stop,
            ignore_eos=body.ignore_eos,
            logprobs=body.wants_logprobs,
            prompt_logprobs=body.wants_prompt_logprobs,
            stop_token_ids=frozenset(body.stop_token_ids),
            include_stop=body.include_stop_str_in_output,
            kept_stop=frozenset(body.stop) if body.include_stop_str_in_output else frozenset(),
            min_tokens=body.min_tokens,
        )
        for i in range(body.n)
    ]


async def _complete(
    request: web.Request,
    state: ServerState,
    engine: Engine,
    requests: list[GenerationRequest],
    stream: bool,
    shape: ResponseShape,
    clock: RequestClock,
    limit_param: str = "max_tokens",
    per_prompt: int | None = None,
) -> web.StreamResponse:
    generations = await submit_all(engine, requests, shape.prompt_param, limit_param, per_prompt)
    shape.track(generations)
    prompts = requests[:: per_prompt or max(1, len(requests))]  # each prompt once, as usage counts it
    bill = state.accounts.bill(
        shape.id, state.model_id, len(generations), token_presented=state.endpoint_token is not None, per_prompt=per_prompt,
        generations=generations, prompt_tokens=sum(len(r.prompt) for r in prompts),
    )
    try:
        if stream:
            return await _stream(request, state, generations, shape, clock, requests[0].logprobs is not None, bill)
        texts = await asyncio.gather(*(_collect(state, clock, i, g, bill) for i, g in enumerate(generations)))
        usage = _usage(generations, bill.per_prompt)
        await bill.settle(usage)
        logprobs = [g.logprobs if r.logprobs is not None else None for g, r in zip(generations, requests)]
        finishes = [_finish(g) for g in generations]
        respond = functools.partial(shape.response, texts, finishes, usage, logprobs)
        body = await asyncio.to_thread(respond) if _costly_to_shape(texts, logprobs) else respond()
        return web.Response(text=body, content_type="application/json")
    except EngineError as exc:
        if not stream:  # a stream's error event follows what was sent, and that is billed
            bill.void()
        raise engine_error(exc, shape.prompt_param, limit_param) from None
    finally:
        for generation in generations:
            generation.cancel()
        bill.abandon(generations)
        for index, generation in enumerate(generations):
            timing = clock.choices.get(index, ChoiceTiming())
            state.metrics.observe_choice(generation.usage, timing.first_token_at, timing.last_token_at)


def _costly_to_shape(texts: Sequence[str], logprobs: Sequence[Sequence[object] | None]) -> bool:
    """Whether building a whole answer takes long enough to hold up every other buyer's stream if
    built on the event loop: 16 choices of 1,900 tokens with 20 alternatives each took 5-7 s."""
    return sum(len(entries) for entries in logprobs if entries) > COSTLY_LOGPROBS or sum(map(len, texts)) > COSTLY_TEXT_CHARS


async def _collect(state: ServerState, clock: RequestClock, index: int, generation: Generation, bill: Bill) -> str:
    parts = []
    async for text in generation:
        clock.mark(index, state.metrics)
        bill.serving()
        parts.append(text)
    return "".join(parts)


def _finish(generation: Generation) -> FinishReason:
    return "length" if generation.finish_reason == "length" else "stop"


def _usage(generations: list[Generation], per_prompt: int) -> UsageOut:
    """Exact usage of a finished request (the engine's counters already hold it: /metrics reads them)."""
    return batch_usage([g.usage for g in generations], per_prompt) or UsageOut.combine([])  # finished: never empty


async def _stream(
    request: web.Request,
    state: ServerState,
    generations: list[Generation],
    shape: ResponseShape,
    clock: RequestClock,
    logprobs: bool,
    bill: Bill,
) -> web.StreamResponse:
    """The answer as server-sent events. A buyer who hangs up mid-answer cancels this handler; one
    who leaves while a write that does not wait is under way (the last events, the end of the
    body) makes aiohttp raise ``ConnectionResetError`` instead, which ends the stream quietly: a
    stream cut at its end is no server error (met once in about 600 random requests over HTTP, a
    fifth of them streams cut by their buyers), or while the headers go out (6 % of streams whose
    buyers left within 150 ms, under load: they were 500s, with a traceback each)."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(request)
        try:
            await _send_events(response, state, generations, shape, clock, logprobs, bill)
        except ConnectionResetError:
            raise
        except EngineError as exc:
            await response.write(sse_event(json.dumps(engine_error(exc, shape.prompt_param).body()).encode()))
        except Exception:  # a fault of ours: the buyer still learns that the answer ended badly
            log.exception("unexpected error in the stream of %s", shape.id)
            await response.write(sse_event(json.dumps(internal_error().body()).encode()))
        await response.write_eof()
    except ConnectionResetError:
        log.debug("the buyer of %s hung up before its stream ended", shape.id)
        request[BUYER_LEFT] = True
    return response


async def _send_events(
    response: web.StreamResponse, state: ServerState, generations: list[Generation], shape: ResponseShape, clock: RequestClock, logprobs: bool, bill: Bill
) -> None:
    """Every choice's events as they come, then usage (billed before the buyer can see the end) and [DONE]."""
    for index in range(len(generations)):
        await generations[index].prompt_scored()  # an echo with logprobs carries the prompt's
        opening = shape.opening_chunk(index)
        if opening is not None:
            await response.write(opening)
    streamed = StreamedLogprobs(generations) if logprobs else None
    async for index, text in _interleave(generations):
        if text is None:
            chunks = shape.finish_chunks(index, _finish(generations[index]), None if streamed is None else streamed.for_finish(index))
        else:
            clock.mark(index, state.metrics)
            bill.serving()
            chunks = shape.text_chunks(index, text, None if streamed is None else streamed.for_text(index))
        await response.write(b"".join(chunks))
    usage = _usage(generations, bill.per_prompt)
    await bill.settle(usage)
    if shape.include_usage:
        await response.write(shape.usage_chunk(usage))
    await response.write(b"data: [DONE]\n\n")


async def _interleave(generations: list[Generation]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice index, text) as each choice produces it, then (index, None) when that choice ends."""
    if len(generations) == 1:
        async for text in generations[0]:
            yield 0, text
        yield 0, None
        return
    events: asyncio.Queue[tuple[int, str | None | Exception]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for text in generation:
                events.put_nowait((index, text))
            events.put_nowait((index, None))
        except Exception as exc:
            events.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(generations)
        while running:
            index, event = await events.get()
            if isinstance(event, Exception):
                raise event
            if event is None:
                running -= 1
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
