"""The engine's per-token logprobs in OpenAI's two shapes: chat's ``logprobs.content`` list and the
legacy completions' parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).

A legacy ``top_logprobs`` dict holds the ``logprobs`` most likely tokens and the chosen one too
(up to ``logprobs`` + 1 entries), as OpenAI documents it and vLLM writes it: a client can look the
chosen token up in it, and ``logprobs: 0`` still names it. Chat's list stays the top ones only.

An answer that ended on its end-of-text token has that token's entry last, shown by its text
("</s>") as vLLM shows it (``tokenizer.decode`` of its id) and as our echoed prompts show "<s>";
a stream sends it in the chunk with the finish reason (``StreamedLogprobs``).

A logprob of minus infinity (a token the model's own logits give no chance at all, or one that
``min_tokens`` holds back) would be written as JSON ``null``, and OpenAI's SDKs type every logprob
as a number: a client that sums or exponentiates them fails on it. So every value is sent as at
least ``LOWEST_LOGPROB`` (-9999.0), as vLLM sends it, NaN (which no log-softmax should give, and
which JSON cannot carry either) included; each entry passes ``on_the_wire`` once, where the
engine's values become the API's. The legacy echo's first prompt token keeps its ``null``: it
has no value at all (``prompt_logprobs.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vramsupply.engine.generation import Generation
from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.responses import ChoiceLogprobs, TextLogprobs, TokenLogprobOut, TopLogprob

TokenBytes = Callable[[int], bytes]
LOWEST_LOGPROB = -9999.0


def on_the_wire(entry: TokenLogprob) -> TokenLogprob:
    """``entry`` with its own and its alternatives' logprobs at ``LOWEST_LOGPROB`` at least."""
    return TokenLogprob(entry.token, _floored(entry.logprob), tuple((token, _floored(lp)) for token, lp in entry.top))


def _floored(logprob: float) -> float:
    return logprob if logprob >= LOWEST_LOGPROB else LOWEST_LOGPROB  # NaN compares False: floored too


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob], token_bytes: TokenBytes) -> ChoiceLogprobs:
    content = []
    for entry in map(on_the_wire, entries):
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
    for entry in map(on_the_wire, entries):
        tokens.append(_text(token_bytes(entry.token)))
        values.append(entry.logprob)
        tops.append(top_dict(entry, token_bytes))
    return TextLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=list(starts))


def top_dict(entry: TokenLogprob, token_bytes: TokenBytes) -> dict[str, float]:
    """A legacy ``top_logprobs`` entry: the top tokens, then the chosen one where it is not among
    them (see the module docstring). Two tokens shown alike keep the first one's value.
    ``entry`` has passed ``on_the_wire``."""
    top: dict[str, float] = {}
    for token, logprob in entry.top:
        top.setdefault(_text(token_bytes(token)), logprob)
    top.setdefault(_text(token_bytes(entry.token)), entry.logprob)
    return top


class StreamedLogprobs:
    """The logprobs each chunk of a stream carries, the end-of-text token's entry kept for the chunk
    with the finish reason. That entry is the one with no token id (``Outbox._end_token``): once a
    choice is done, an entry beyond its token ids is it. The last text and the end can reach the
    stream in one hand-over; the entry still goes last, with the end, as vLLM's stream sends it."""

    def __init__(self, generations: Sequence[Generation]) -> None:
        self._generations = generations
        self._taken = [0] * len(generations)
        self._held: dict[int, TokenLogprob] = {}

    def for_text(self, index: int) -> list[TokenLogprob]:
        generation = self._generations[index]
        entries = generation.take_logprobs()
        self._taken[index] += len(entries)
        if entries and generation.done and self._taken[index] > len(generation.token_ids):
            self._held[index] = entries.pop()  # once per choice: a done choice's text comes in one piece
        return entries

    def for_finish(self, index: int) -> list[TokenLogprob]:
        held = self._held.pop(index, None)
        return [*([held] if held is not None else []), *self._generations[index].take_logprobs()]
