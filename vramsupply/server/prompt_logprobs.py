"""An echoed prompt's logprobs on ``/v1/completions`` (``echo`` with ``logprobs``), in the legacy
completions' shape, as OpenAI's and vLLM's write them: the prompt's tokens come first in the
choice's ``logprobs``, the first with ``null`` for its logprob and its alternatives (nothing
precedes it), each later one with what the model gave it after the tokens before it
(``GenerationRequest.prompt_logprobs``); the completion's tokens follow. Evaluation tools score
loglikelihood tasks this way (lm-evaluation-harness's ``local-completions``: temperature 0, ``echo``,
``logprobs: 1``, ``max_tokens`` 1 or 0).

``text_offset`` counts from the start of the echoed text. A prompt sent as text may have been
tokenized with a leading space the text does not have ("Hello" as "▁Hello"); its tokens' offsets
are then taken back by that space, so that each offset still points into the echoed text. A text
that begins with the BOS text ("<s>...") has it as its BOS token's.

Its models widen the shared ones (``responses.py``) where the prompt's first token has ``null``.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.logprobs_out import top_dict
from vramsupply.server.responses import TextChoice, TextCompletion, TextLogprobs

TokenBytes = Callable[[int], bytes]


class EchoTextLogprobs(TextLogprobs):
    """``TextLogprobs`` whose first prompt token has no logprob and no alternatives (``null``)."""

    token_logprobs: list[float | None]  # type: ignore[assignment]
    top_logprobs: list[dict[str, float] | None]  # type: ignore[assignment]


class EchoTextChoice(TextChoice):
    logprobs: EchoTextLogprobs | None  # type: ignore[assignment]


class EchoTextCompletion(TextCompletion):
    choices: list[EchoTextChoice]  # type: ignore[assignment]


def prompt_logprobs(
    tokens: Sequence[int], scores: Sequence[TokenLogprob], echoed: str, token_bytes: TokenBytes, text_bytes: TokenBytes
) -> EchoTextLogprobs:
    """The prompt's part of a choice's logprobs: ``scores`` are those of ``tokens[1:]``.
    ``token_bytes``: a token as logprobs show it; ``text_bytes``: as its text shows it."""
    scored = list(scores[: max(len(tokens) - 1, 0)])
    return EchoTextLogprobs(
        tokens=[_text(token_bytes(t)) for t in tokens],
        token_logprobs=[None, *(s.logprob for s in scored)],
        top_logprobs=[None, *(top_dict(s, token_bytes) for s in scored)],
        text_offset=_offsets(tokens, echoed, token_bytes, text_bytes),
    )


def _offsets(tokens: Sequence[int], echoed: str, token_bytes: TokenBytes, text_bytes: TokenBytes) -> list[int]:
    """A text prompt may begin with the BOS text itself ("<s>Once", as lm-evaluation-harness's
    ``add_bos_token`` sends it; tokenized with that one BOS): that text is the BOS token's, and
    the other tokens' offsets count from after it."""
    shown = _text(token_bytes(tokens[0])) if tokens and not text_bytes(tokens[0]) else ""
    if shown and echoed.startswith(shown):
        return [0, *(len(shown) + start for start in prompt_offsets(tokens[1:], echoed[len(shown) :], text_bytes))]
    return prompt_offsets(tokens, echoed, text_bytes)


def prompt_offsets(tokens: Sequence[int], echoed: str, text_bytes: TokenBytes) -> list[int]:
    """Where each prompt token's text starts in ``echoed`` (see the module docstring)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    starts, length = [], 0
    for token in tokens:
        starts.append(length)
        length += len(decoder.decode(text_bytes(token)))
    length += len(decoder.decode(b"", final=True))
    shift = max(length - len(echoed), 0)  # a leading space the tokenizer added
    return [min(max(start - shift, 0), len(echoed)) for start in starts]


def joined(prompt: EchoTextLogprobs | None, completion: TextLogprobs) -> EchoTextLogprobs:
    """The prompt's part (if any) and then the completion's, its offsets already after the echo."""
    head = prompt or EchoTextLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    return EchoTextLogprobs(
        tokens=head.tokens + completion.tokens,
        token_logprobs=head.token_logprobs + list(completion.token_logprobs),
        top_logprobs=head.top_logprobs + list(completion.top_logprobs),
        text_offset=head.text_offset + completion.text_offset,
    )


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")
