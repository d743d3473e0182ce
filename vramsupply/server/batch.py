"""Several prompts in one ``/v1/completions`` request, and ``echo`` (with its prompt's logprobs, and
``max_tokens`` 0), as OpenAI's legacy endpoint and vLLM take them.

A batch of P prompts with ``n`` choices each is P·n generations, submitted all or none: choice
``i * n + j`` is prompt ``i``'s ``j``-th, and the ``n`` choices of one prompt share its decoded
prompt (``Engine.submit``'s ``shares_prompt_with``), while different prompts are requests of their
own to the engine. Usage therefore adds up per prompt: each prompt counts once, however many
choices it has (as a lone request's does), and every choice's completion counts. The earnings
ledger gets the same sum (``accounting.Bill``), so a batch is billed exactly what its buyer sees.
"""

from __future__ import annotations

from collections.abc import Sequence

from vramsupply.engine import Usage
from vramsupply.server.errors import ApiError
from vramsupply.server.responses import PromptTokensDetails, UsageOut
from vramsupply.server.schemas import MAX_CHOICES, CompletionBody


def check_choices(body: CompletionBody) -> None:
    """Prompts × ``n`` choices stay within ``MAX_CHOICES``, as ``n`` alone does."""
    prompts = len(body.prompts)
    if prompts * body.n > MAX_CHOICES:
        raise ApiError(
            400,
            f"Invalid value for 'n': {prompts} prompts with n={body.n} make {prompts * body.n} choices; a request may have up to {MAX_CHOICES}.",
            param="n", code="invalid_value",
        )


def check_echo(body: CompletionBody) -> None:
    """``max_tokens`` 0 generates nothing: it is for scoring a prompt (OpenAI's and vLLM's way),
    so it takes ``echo``; alone it would bill a prompt for an empty answer."""
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400,
            "Invalid value for 'max_tokens': 0 generates nothing, so it needs echo (the prompt back, scored with logprobs); send max_tokens of 1 or more, or echo: true.",
            param="max_tokens", code="invalid_value",
        )


def batch_usage(usages: Sequence[Usage | None], per_prompt: int) -> UsageOut | None:
    """The usage of choices in prompt order, ``per_prompt`` to a prompt: each prompt counted once
    (``UsageOut.combine``), the prompts summed. None when no choice reported its usage."""
    groups = [[u for u in usages[i : i + per_prompt] if u is not None] for i in range(0, len(usages), max(per_prompt, 1))]
    combined = [UsageOut.combine(group) for group in groups if group]
    if not combined:
        return None
    if len(combined) == 1:
        return combined[0]
    prompt = sum(u.prompt_tokens for u in combined)
    completion = sum(u.completion_tokens for u in combined)
    return UsageOut(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(u.prompt_tokens_details.cached_tokens for u in combined)),
    )
