"""Submitting a request's generations to the engine: all of them or none.

Apart from ``completions.py`` (the routes) because admission has cases of its own: the places a
request needs are reserved before its first generation is submitted (``Engine.reserve``), so a
buyer arriving in between cannot make a later one a 429; a refusal cancels those already
admitted and becomes OpenAI's error (``engine_error``); a generation whose sampler is costly to
build (a grammar to parse, a large logit bias) is submitted from a worker thread, and one a buyer
left while it was being submitted is cancelled as soon as it exists (``off_the_loop``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from vramsupply.engine import (
    ContextOverflow,
    Engine,
    EngineClosed,
    EngineError,
    EngineFailed,
    Generation,
    GenerationRequest,
    Overloaded,
)
from vramsupply.server.errors import ApiError
from vramsupply.server.state import failed_error

RETRY_AFTER_SECONDS = "1"
INLINE_LOGIT_BIAS_MAX = 64


def costly_to_submit(request: GenerationRequest) -> bool:
    return request.sampling.grammar is not None or len(request.sampling.logit_bias) > INLINE_LOGIT_BIAS_MAX


def engine_error(exc: EngineError, prompt_param: str, limit_param: str = "max_tokens") -> ApiError:
    if isinstance(exc, Overloaded):
        return ApiError(
            429,
            f"The server is at capacity ({exc}); retry shortly.",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
    if isinstance(exc, ContextOverflow):
        param = prompt_param if exc.max_tokens is None or exc.prompt_tokens >= exc.n_ctx else limit_param
        message = str(exc).replace("max_tokens", limit_param)  # the field the buyer sent
        return ApiError(400, f"This model's context is {exc.n_ctx} tokens: {message}.", param=param, code="context_length_exceeded")
    if isinstance(exc, EngineFailed):
        return failed_error(str(exc))
    if isinstance(exc, EngineClosed):
        return ApiError(503, "The server is shutting down.", type="server_error", code="shutting_down")
    return ApiError(500, str(exc), type="server_error")


async def submit_all(
    engine: Engine, requests: list[GenerationRequest], prompt_param: str, limit_param: str = "max_tokens", per_prompt: int | None = None
) -> list[Generation]:
    """Submit every choice or none: on the first refusal the ones already admitted are cancelled.
    ``per_prompt``: choices to a prompt, when the requests hold several prompts in order (``batch.py``).

    Building a sampler parses the request's grammar and logit bias, which can take milliseconds:
    such requests are submitted from a worker thread, so the event loop keeps streaming meanwhile.
    """
    if len(requests) > engine.capacity:  # never room for them all: not a reason to retry
        raise ApiError(
            400, f"n={len(requests)} is more choices than this server can hold at once ({engine.capacity}: its slots and queue places)."
            if per_prompt in (None, len(requests)) else
            f"{len(requests)} choices (prompts × n) are more than this server can hold at once ({engine.capacity}: its slots and queue places).",
            param="n", code="invalid_value",
        )
    generations: list[Generation] = []
    loop = asyncio.get_running_loop()
    per_prompt = per_prompt or len(requests)
    try:
        if per_prompt < len(requests):  # a batch: a prompt refused after another started would leave its work unbilled
            for first in requests[::per_prompt]:
                engine.check(first)
        # Places for every choice are held first: a request arriving between two of them cannot
        # make the later ones a 429 after the first were admitted.
        with engine.reserve(len(requests)) as places:
            for index, generation_request in enumerate(requests):
                # Every choice shares its prompt's first one's prompt: decoded once, counted once.
                sibling = generations[index - index % per_prompt] if index % per_prompt else None
                submit = functools.partial(
                    engine.submit, generation_request, shares_prompt_with=sibling, loop=loop, choices=per_prompt, reservation=places,
                    later_prompt=index >= per_prompt,
                )
                generations.append(await off_the_loop(submit) if costly_to_submit(generation_request) else submit())
    except BaseException as exc:
        for generation in generations:
            generation.cancel()
        if isinstance(exc, EngineError):
            raise engine_error(exc, prompt_param, limit_param) from None
        if isinstance(exc, ValueError):
            raise ApiError(400, str(exc), param=_refused_field(str(exc), prompt_param), code="invalid_value") from None
        raise
    return generations


async def off_the_loop(submit: Callable[[], Generation]) -> Generation:
    """``submit`` in a worker thread. A buyer who leaves meanwhile cancels this wait, not the
    thread: the generation it then starts is cancelled as soon as it exists (nobody reads it)."""
    submitted = asyncio.ensure_future(asyncio.to_thread(submit))
    try:
        return await asyncio.shield(submitted)
    except asyncio.CancelledError:
        submitted.add_done_callback(_cancel_unread)
        raise


def _cancel_unread(submitted: asyncio.Future[Generation]) -> None:
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result().cancel()


def _refused_field(message: str, prompt_param: str) -> str | None:
    """The request field a refusal names first (the engine's messages begin with it: "logit_bias
    token 600 is not in the vocabulary", "ignore_eos cannot be combined ...", "prompt token 99999
    is not in the vocabulary", "the prompt must be ...")."""
    field = message.split(" ", 1)[0]
    if field in ("logit_bias", "ignore_eos", "stop_token_ids", "min_tokens"):
        return field
    return prompt_param if message.startswith(("prompt ", "the prompt ")) else None
