"""The engine's per-token logprobs in OpenAI's two shapes: chat's ``logprobs.content`` list and the
legacy completions' parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``)."""

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


def text_logprobs(entries: Sequence[TokenLogprob], token_bytes: TokenBytes, offset: int = 0) -> TextLogprobs:
    """``offset`` is where the first token's text starts in the choice's text (for stream chunks)."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = _text(token_bytes(entry.token))
        tokens.append(text)
        values.append(entry.logprob)
        tops.append({_text(token_bytes(t)): lp for t, lp in entry.top})
        offsets.append(offset)
        offset += len(text)
    return TextLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
