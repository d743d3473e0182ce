"""How a chat completion is written: each choice's text read back through the chat format's
``OutputParser`` into ``reasoning_content``, ``content`` and ``tool_calls``, whole or as stream deltas.

Streamed tool calls follow OpenAI's delta shape exactly: a first fragment with the call's
``index``, ``id``, ``type`` and ``function.name`` (and empty ``arguments``), then ``arguments``
fragments with the same ``index`` as the model writes them (``vramsupply.chat.calls`` says when
a call is announced and what a call that breaks afterwards becomes).

A forced call (``tool_choice`` ``required`` or named) is the whole answer, and the parser is told
so, along with whether ``max_tokens`` cut the answer (``OutputParser.finish``): template markup
never reaches ``content``, cut or not.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from vramsupply.chat import OutputParser, ParsedOutput, Piece
from vramsupply.engine import ChatPrompt, Generation
from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.logprobs_out import chat_logprobs
from vramsupply.server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionTokensDetails,
    FinishReason,
    FunctionOut,
    ToolCallOut,
    UsageOut,
)
from vramsupply.server.text_shape import FingerprintedChatChunk, FingerprintedChatCompletion, ShapeBase

_TEXT_FIELDS = {"content": "content", "reasoning": "reasoning_content"}
"""Piece kinds whose delta is one text field: their chunks are filled into a template."""


@dataclasses.dataclass(frozen=True)
class ForcedCall:
    """The answer must be a call; of ``name`` when only one function may be called."""

    name: str | None


def forced_call(tool_choice: Any, tools: Sequence[Any] | None) -> ForcedCall | None:
    """What a (validated) request's ``tool_choice`` forces, if anything."""
    names = [t.get("function", {}).get("name") for t in tools or () if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not names:
        return None
    if tool_choice == "required":
        return ForcedCall(names[0] if len(set(names)) == 1 else None)
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return ForcedCall(name) if isinstance(name, str) else None


@dataclasses.dataclass
class _Choice:
    parser: OutputParser
    output: ParsedOutput = dataclasses.field(default_factory=ParsedOutput)
    # Logprobs of tokens whose text no chunk has carried yet (it may be held back by the parser).
    logprobs: list[TokenLogprob] | None = None
    given: int = 0  # the logprobs chunks have carried: the first held one is this token's

    def read(self, pieces: list[Piece]) -> list[Piece]:
        self.output.add(pieces)
        return pieces


@dataclasses.dataclass
class ChatShape(ShapeBase):
    prompt: ChatPrompt
    prompt_param: str = "messages"
    forced: ForcedCall | None = None
    held_answer: bool = False
    """A grammar holds the answer (a JSON ``response_format``, a vLLM constraint)."""
    _choices: dict[int, _Choice] = dataclasses.field(default_factory=dict)
    _generations: Sequence[Generation] = ()

    chunk_type = FingerprintedChatChunk
    chunk_object = "chat.completion.chunk"

    def track(self, generations: Sequence[Generation]) -> None:
        """The choices' generations, whose tokens the usage's reasoning count reads."""
        self._generations = generations

    def response(
        self, texts: Sequence[str], finishes: Sequence[FinishReason], usage: UsageOut, logprobs: Sequence[list[TokenLogprob] | None]
    ) -> str:
        choices = []
        for index, (text, finish, entries) in enumerate(zip(texts, finishes, logprobs)):
            choice = self._choice(index)
            choice.read(choice.parser.push(text) + choice.parser.finish(cut=finish == "length"))
            message = self._message(choice.output, forced=self.forced is not None)
            out = None if entries is None else chat_logprobs(entries, self.token_bytes)
            choices.append(ChatChoice(index=index, message=message, logprobs=out, finish_reason=self._reason(index, finish)))
        return self._identified(FingerprintedChatCompletion, object="chat.completion", choices=choices, usage=self._usage(usage)).to_json()

    def opening_chunk(self, index: int) -> bytes:
        """OpenAI's first chunk of every choice announces the assistant role, with an empty text, or
        none where the answer must be a call (``forced``): a stream's text then stays null, as the
        whole answer's ``content`` is."""
        content = None if self.forced is not None else ""
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=content), logprobs=None, finish_reason=None)])

    def text_chunks(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> list[bytes]:
        choice = self._choice(index)
        self._hold(choice, logprobs)
        return self._piece_chunks(index, choice.read(choice.parser.push(text)))

    def finish_chunks(self, index: int, finish: FinishReason, logprobs: list[TokenLogprob] | None) -> list[bytes]:
        choice = self._choice(index)
        self._hold(choice, logprobs)
        chunks = self._piece_chunks(index, choice.read(choice.parser.finish(cut=finish == "length")))
        reason = self._reason(index, finish)
        # OpenAI's last chunk has "logprobs": null, unless tokens whose text was never sent are left.
        held = self._take(index, choice) if choice.logprobs else None
        last = ChatChunkChoice(index=index, delta=ChatDelta(), logprobs=held, finish_reason=reason)
        return [*chunks, self._chunk([last])]

    def usage_chunk(self, usage: UsageOut) -> bytes:
        return self._chunk([], self._usage(usage))

    # ---- helpers --------------------------------------------------------------------------------

    def _choice(self, index: int) -> _Choice:
        choice = self._choices.get(index)
        if choice is None:
            parser = self.prompt.output_parser(held_answer=self.held_answer)
            if self.forced is not None and self.prompt.syntax is not None:
                parser.expect_call(self.forced.name)
            choice = self._choices[index] = _Choice(parser)
        return choice

    def _reason(self, index: int, finish: FinishReason) -> FinishReason:
        called = bool(self._choice(index).output.tool_calls)
        return "tool_calls" if called and finish == "stop" else finish

    @staticmethod
    def _message(output: ParsedOutput, forced: bool) -> ChatMessageOut:
        """``content`` is null where there is a call, or where the answer had to be one (``forced``,
        also when ``max_tokens`` cut it before the call: as the stream's opening chunk says)."""
        empty = None if output.tool_calls or forced else ""
        message = ChatMessageOut(role="assistant", content=output.content or empty, refusal=None)
        if output.reasoning:
            message.reasoning_content = output.reasoning
        if output.tool_calls:
            message.tool_calls = [
                ToolCallOut(id=c.id, type="function", function=FunctionOut(name=c.name, arguments=c.arguments)) for c in output.tool_calls
            ]
        return message

    @staticmethod
    def _hold(choice: _Choice, logprobs: list[TokenLogprob] | None) -> None:
        if logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + logprobs

    def _take(self, index: int, choice: _Choice, upto: int | None = None) -> ChoiceLogprobs | None:
        """The held logprobs, for the next chunk this choice sends: with ``upto`` (``Piece.upto``),
        those of the tokens whose text ends there or before; one push can bring a thought's end
        and the answer's start, and each delta carries its own tokens."""
        if choice.logprobs is None:
            return None
        count = len(choice.logprobs) if upto is None else self._tokens_within(index, choice, upto)
        entries, choice.logprobs = choice.logprobs[:count], choice.logprobs[count:]
        choice.given += count
        return chat_logprobs(entries, self.token_bytes)

    def _tokens_within(self, index: int, choice: _Choice, upto: int) -> int:
        """How many of the held logprobs are of tokens whose text ends by ``upto``; all of them
        without the generation's account of its tokens."""
        assert choice.logprobs is not None
        if index >= len(self._generations):
            return len(choice.logprobs)
        ends = self._generations[index].token_text_ends_from(choice.given, len(choice.logprobs))
        return sum(1 for _ in itertools.takewhile(lambda end: end <= upto, ends))

    def _piece_chunks(self, index: int, pieces: list[Piece]) -> list[bytes]:
        chunks = []
        choice = self._choice(index)
        call = len(choice.output.tool_calls) - sum(p.kind == "tool_call" for p in pieces) - 1  # the call announced last
        for piece in pieces:
            if piece.kind in _TEXT_FIELDS and choice.logprobs is None:
                chunks.append(self._template(index, _TEXT_FIELDS[piece.kind]).event(piece.text))
                continue
            if piece.kind in _TEXT_FIELDS:
                delta = ChatDelta(**{_TEXT_FIELDS[piece.kind]: piece.text})
            elif piece.kind == "arguments":
                delta = ChatDelta(tool_calls=[ToolCallOut(index=call, function=FunctionOut(arguments=piece.text))])
            else:
                assert piece.call is not None
                call += 1
                function = FunctionOut(name=piece.call.name, arguments="")
                delta = ChatDelta(tool_calls=[ToolCallOut(index=call, id=piece.call.id, type="function", function=function)])
            logprobs = self._take(index, choice, piece.upto)
            chunks.append(self._chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=None)]))
        return chunks

    def _text_document(self, index: int, field: str, text: str) -> str:
        delta = ChatDelta(**{field: text})
        return self._document([ChatChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=None)])

    def _usage(self, usage: UsageOut) -> UsageOut:
        """``completion_tokens_details.reasoning_tokens``: the generated tokens that brought the
        thoughts' text, their markers included."""
        if self.prompt.reasoning is None and not self.prompt.channels:  # harmony's thoughts are on a channel
            return usage
        usage = usage.model_copy()
        reasoning = sum(self._reasoning_tokens(index, generation) for index, generation in enumerate(self._generations))
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=reasoning)
        return usage

    def _reasoning_tokens(self, index: int, generation: Generation) -> int:
        """The tokens whose text overlaps the choice's thought. A token whose text was held back
        (half a UTF-8 character) brought none: it counts where the text stood when it came."""
        span = self._choice(index).parser.reasoning_span
        if span is None:
            return 0
        start, end = span
        ends = generation.token_text_ends
        return sum(
            (begin < end and finish > start) if finish > begin else start <= begin < end for begin, finish in zip([0, *ends[:-1]], ends)
        )
