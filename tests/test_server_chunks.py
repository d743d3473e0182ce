"""Stream chunks filled into a template are byte for byte the chunks pydantic would have written."""

from __future__ import annotations

import json
import random

import pytest

from vramsupply.chat import ReasoningMarkers
from vramsupply.engine import ChatPrompt
from vramsupply.server.chat_shape import ChatShape
from vramsupply.server.chunks import ChunkTemplate, sse_event
from vramsupply.server.responses import ChatChunkChoice, ChatCompletionChunk, ChatDelta, TextChoice, TextCompletion
from vramsupply.server.text_shape import TextShape

TRICKY = [
    "",
    "Once upon a time",
    ' "quoted" and \\back\\slashed ',
    "line\nbreak\ttab\rreturn\b\f",
    "".join(chr(c) for c in range(32)) + "\x7f",
    "café, naïve, 日本語, emoji 🙂 and a ZWJ 👩‍💻",
    "\u2028\u2029 separators, </script> and a slash /",
    "vramsupply-chunk-text-4f1c9b",  # the marker itself, as text
]


def random_texts(count: int) -> list[str]:
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0, 0x250)] + ["🙂", "日", "\u2028", '"', "\\"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(count)]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("index", [0, 3])
def test_text_chunks_equal_the_models_own_json(include_usage: bool, index: int) -> None:
    shape = TextShape(id="cmpl-1", created=1700000000, model="org/model-Q4_K_M", include_usage=include_usage, token_bytes=lambda t: b"")
    for text in TRICKY + random_texts(300):
        expected = TextCompletion(
            id="cmpl-1", object="text_completion", created=1700000000, model="org/model-Q4_K_M",
            choices=[TextChoice(index=index, text=text, logprobs=None, finish_reason=None)],
        )
        if include_usage:
            expected.usage = None
        assert shape.text_chunks(index, text, None) == [sse_event(expected.to_json().encode())]
        assert json.loads(shape.text_chunks(index, text, None)[0].removeprefix(b"data: "))["choices"][0]["text"] == text


def test_chat_content_and_reasoning_chunks_equal_the_models_own_json() -> None:
    prompt = ChatPrompt([], (), frozenset(), None, (), ReasoningMarkers("<think>", "</think>"), False, None, {}, True)
    shape = ChatShape(id="chatcmpl-1", created=1700000000, model="m", include_usage=True, prompt=prompt, token_bytes=lambda t: b"")

    def chunk(**delta: str) -> bytes:
        choice = ChatChunkChoice(index=0, delta=ChatDelta(**delta), logprobs=None, finish_reason=None)
        whole = ChatCompletionChunk(id="chatcmpl-1", object="chat.completion.chunk", created=1700000000, model="m", choices=[choice])
        whole.usage = None
        return sse_event(whole.to_json().encode())

    assert shape.text_chunks(0, "<think>Hmm, \"why\"", None) == [chunk(reasoning_content='Hmm, "why"')]
    assert shape.text_chunks(0, "</think>", None) == []
    for text in TRICKY[1:] + [t for t in random_texts(200) if t and "<" not in t]:
        assert shape.text_chunks(0, text, None) == [chunk(content=text)]


def test_a_template_needs_exactly_one_text_field() -> None:
    with pytest.raises(ValueError):
        ChunkTemplate(lambda text: json.dumps({"a": text, "b": text}))
    with pytest.raises(ValueError):
        ChunkTemplate(lambda text: json.dumps({"a": "fixed"}))
