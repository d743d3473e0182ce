"""The engine's per-token logprobs in OpenAI's two shapes: chat's ``logprobs.content`` list and the
legacy completions' parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

A legacy ``top_logprobs`` dict holds the ``logprobs`` most likely tokens and the chosen one too
(up to ``logprobs`` + 1 entries), as OpenAI documents it and vLLM writes it: a client can look the
chosen token up in it, and ``logprobs: 0`` still names it. Chat's list stays the top ones only."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.responses import ChoiceLogprobs, TextLogprobs, TokenLogprobOut, TopLogprob

TokenBytes = Callable[[int], bytes]


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob], token_bytes: TokenBytes) -> ChoiceLogprobs:
    content = []
    for entry in entries:
        data = token_bytes(entry.token)
        top = [TopLogprob(token=_text(b), logprob=lp, bytes=list(b)) for b, lp in ((token_bytes(t), lp) for t, lp in entry.top)]
        content.append(TokenLogprobOut(token=_text(data), logprob=entry.logprob, bytes=list(data), top_logprobs=top))
    return ChoiceLogprobs(content=content, refusal=None)


def text_logprobs(entries: Sequence[TokenLogprob], token_bytes: TokenBytes, starts: Sequence[int]) -> TextLogprobs:
    """``starts``: where each token's text starts in the choice's text, from the engine's own
    account of which token brought which text (``Generation.token_text_ends``). The tokens' shown
    strings cannot say it: a control token is shown by name but adds no text, and each half of a
    split UTF-8 character shows a replacement character."""
    tokens, values, tops = [], [], []
    for entry in entries:
        tokens.append(_text(token_bytes(entry.token)))
        values.append(entry.logprob)
        tops.append(top_dict(entry, token_bytes))
    return TextLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=list(starts))


def top_dict(entry: TokenLogprob, token_bytes: TokenBytes) -> dict[str, float]:
    """A legacy ``top_logprobs`` entry: the top tokens, then the chosen one where it is not among
    them (see the module docstring). Two tokens shown alike keep the first one's value."""
    top: dict[str, float] = {}
    for token, logprob in entry.top:
        top.setdefault(_text(token_bytes(token)), logprob)
    top.setdefault(_text(token_bytes(entry.token)), entry.logprob)
    return top
