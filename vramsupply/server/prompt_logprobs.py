"""An echoed prompt's logprobs on ``/v1/completions`` (``echo`` with ``logprobs``), in the legacy
completions' shape, as OpenAI's and vLLM's write them: the prompt's tokens come first in the
choice's ``logprobs``, the first with ``null`` for its logprob and its alternatives (nothing
precedes it), each later one with what the model gave it after the tokens before it
(``GenerationRequest.prompt_logprobs``), at -9999.0 at least as every logprob we send
(``logprobs_out.on_the_wire``); the completion's tokens follow. Evaluation tools score
loglikelihood tasks this way (lm-evaluation-harness's ``local-completions``: temperature 0, ``echo``,
``logprobs: 1``, ``max_tokens`` 1 or 0).

``text_offset`` counts from the start of the echoed text, which is the buyer's own: a text prompt's
echo holds the text of the special tokens it was written with ("<s>", "</s>", "<|im_start|>": a
raw chat-formatted prompt, as lm-evaluation-harness's ``--apply_chat_template`` sends it), though
the tokens' text renders them as nothing; a token-id prompt's echo is its tokens' text, control
tokens as nothing. So the offsets come from walking the echo: a control token whose text is there
takes it, and a SentencePiece tokenizer's added space (at the start of the text and after each
special token: "Hello" as "▁Hello") is left out where the echo does not have it. A control token
whose text is not in the echo (the BOS added before "Once") has the offset of the text after it.

Its models widen the shared ones (``responses.py``) where the prompt's first token has ``null``.
"""

from __future__ import annotations

import codecs
import itertools
import os
from collections.abc import Callable, Sequence

from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.logprobs_out import on_the_wire, top_dict
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
    scored = [on_the_wire(score) for score in scores[: max(len(tokens) - 1, 0)]]
    return EchoTextLogprobs(
        tokens=[_text(token_bytes(t)) for t in tokens],
        token_logprobs=[None, *(s.logprob for s in scored)],
        top_logprobs=[None, *(top_dict(s, token_bytes) for s in scored)],
        text_offset=prompt_offsets(tokens, echoed, token_bytes, text_bytes),
    )


def prompt_offsets(tokens: Sequence[int], echoed: str, token_bytes: TokenBytes, text_bytes: TokenBytes) -> list[int]:
    """Where each prompt token's text starts in ``echoed`` (see the module docstring). An echo that
    is exactly the tokens' text (a token-id prompt's) is not searched for control tokens' text:
    there, "<s>" can only be the text of the tokens "<", "s", ">"."""
    pieces = [text_bytes(token) for token in tokens]
    if _text(b"".join(pieces)) == echoed:
        return _walked(pieces, echoed, [""] * len(pieces))
    return _walked(pieces, echoed, [_text(token_bytes(t)) if not piece else "" for t, piece in zip(tokens, pieces)])


def _walked(pieces: Sequence[bytes], echoed: str, specials: Sequence[str]) -> list[int]:
    """Each piece's start, walking ``echoed``: an empty piece takes its special text (``specials``)
    where the echo has it there; the first piece after the start or after an empty one may lose
    the space the tokenizer added (``_added_space``)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    starts, at = [], 0
    for index, piece in enumerate(pieces):
        starts.append(min(at, len(echoed)))
        if not piece:
            at += len(specials[index]) if specials[index] and echoed.startswith(specials[index], at) else 0
            continue
        text = decoder.decode(piece)
        if (index == 0 or not pieces[index - 1]) and _added_space(pieces[index:], echoed, at):
            text = text[1:]
        at += len(text)
    return starts


def _added_space(pieces: Sequence[bytes], echoed: str, at: int) -> bool:
    """Whether the text of ``pieces`` up to the next empty one begins with a space the echo does
    not have at ``at``: without it, more of that text matches the echo there."""
    run = _text(b"".join(itertools.takewhile(bool, pieces)))
    if not run.startswith(" "):
        return False
    there = echoed[at : at + len(run)]
    return len(os.path.commonprefix([run[1:], there])) > len(os.path.commonprefix([run, there]))


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
