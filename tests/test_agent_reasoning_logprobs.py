"""What agent clients read besides the answer's text, through the official openai SDK: the
thought in ``reasoning_content`` and its token count, and logprobs, streamed or not.

The server runs the tiny model with a Qwen3-style chat template (``chat_models.py``), whose
generation prompt opens a ``<think>`` block: what the model writes first is its thought. The tiny
model writes nonsense; a logit bias on ``</think>`` makes it close the thought. Split from
``test_agent_api.py``, whose ``qwen`` server these tests share.
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from live_server import MODEL_ID, LiveServer, sdk
from test_agent_api import ASK, NO_THINKING, qwen  # noqa: F401  (qwen: the fixture)


# ---- reasoning ------------------------------------------------------------------------------------


def test_reasoning_content_when_the_template_opens_a_think_block(qwen: LiveServer) -> None:
    """The Qwen-style template ends its generation prompt with ``<think>``: what the model writes
    first is its thought, and must never leak into ``content``."""
    with sdk(qwen) as client:
        whole = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=30, seed=7)
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=30, seed=7, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    message = whole.choices[0].message
    assert message.reasoning_content  # an extra field: the SDK keeps it
    assert message.content == ""
    streamed = "".join(getattr(c.delta, "reasoning_content", None) or "" for chunk in chunks for c in chunk.choices)
    assert streamed == message.reasoning_content
    assert "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices) == ""
    for usage in (whole.usage, chunks[-1].usage):  # the thought never ended: every token is reasoning
        assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens == 30


def test_reasoning_tokens_are_the_generated_tokens_of_the_thought(qwen: LiveServer) -> None:
    """Counted from the engine's own tokens: every token up to the one that closes the thought.

    The test model's ``</think>`` is a control token; a logit bias makes the tiny model close its
    thought now and then. The expected count comes from the logprobs' token list."""
    assert qwen.engine is not None
    [end] = qwen.engine.tokenize("</think>", add_special=False)
    request = {"model": MODEL_ID, "messages": ASK, "max_tokens": 30, "logit_bias": {str(end): 19}, "logprobs": True}
    ended = 0
    with sdk(qwen) as client:
        for seed in range(12):
            whole = client.chat.completions.create(seed=seed, **request)
            stream = list(client.chat.completions.create(seed=seed, stream=True, stream_options={"include_usage": True}, **request))
            tokens = [entry.token for entry in whole.choices[0].logprobs.content]
            # The template opened the thought, so it starts at the first token.
            thought = tokens.index("</think>") + 1 if "</think>" in tokens else len(tokens)
            ended += thought < len(tokens) and bool(whole.choices[0].message.content)
            assert whole.usage.completion_tokens_details.reasoning_tokens == thought
            assert stream[-1].usage.completion_tokens_details.reasoning_tokens == thought
    assert ended >= 2


def test_a_continued_message_that_opened_a_thought_goes_on_thinking(qwen: LiveServer) -> None:
    """A prefilled "<think>\nLet me think", continued: the model's words are the rest of that
    thought. They went to ``content``, with the raw ``</think>`` that closed it."""
    assert qwen.engine is not None
    [end] = qwen.engine.tokenize("</think>", add_special=False)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nLet me think"}]
    request = {"model": MODEL_ID, "messages": messages, "max_tokens": 30, "temperature": 1, "logit_bias": {str(end): 20}}
    closed = 0
    with sdk(qwen) as client:
        for seed in range(6):
            message = client.chat.completions.create(seed=seed, extra_body={"continue_final_message": True, "add_generation_prompt": False}, **request).choices[0].message
            assert "</think>" not in (message.content or "") and message.reasoning_content, (seed, message)
            closed += bool(message.content)
    assert closed >= 1, "the thought closed, and the answer after it is content"


def test_a_json_answer_follows_the_thought_the_template_opened(qwen: LiveServer) -> None:
    """With a JSON response_format, the grammar lets a thinking model end its thought first: the
    JSON is the answer (``content``), never the thought (``reasoning_content``)."""
    assert qwen.engine is not None
    [end] = qwen.engine.tokenize("</think>", add_special=False)
    schema = {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["days"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": schema}}
    with sdk(qwen) as client:  # the bias makes the tiny model end its thought at once
        response = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=60, seed=3, response_format=response_format, logit_bias={str(end): 100}
        )
    message = response.choices[0].message
    jsonschema.validate(json.loads(message.content), schema)
    assert not getattr(message, "reasoning_content", None)  # the thought was empty


def test_enable_thinking_false_reaches_the_template(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        response = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=20, seed=7, extra_body=NO_THINKING)
    message = response.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert message.content


# ---- logprobs -------------------------------------------------------------------------------------


def assert_distribution(entries: list, top: int) -> None:
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == top
        values = [t.logprob for t in entry.top_logprobs]
        assert all(v <= 0 for v in values)
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert entry.logprob <= values[0] + 1e-9 if values else True


def test_chat_logprobs_are_the_models_distribution(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        greedy = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
        sampled = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=12, seed=1, logprobs=True, top_logprobs=20)
        none = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=12, seed=1)
    content = greedy.choices[0].logprobs.content
    assert len(content) == greedy.usage.completion_tokens
    assert_distribution(content, 5)
    # Greedy decoding picks the most likely token: it is the first alternative, with its logprob.
    for entry in content:
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert_distribution(sampled.choices[0].logprobs.content, 20)
    assert none.choices[0].logprobs is None


def test_streamed_chat_logprobs_cover_every_token(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=15, seed=2, logprobs=True, top_logprobs=3, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
    entries = [e for chunk in chunks for c in chunk.choices if c.logprobs and c.logprobs.content for e in c.logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert_distribution(entries, 3)


def test_completions_logprobs_n(qwen: LiveServer) -> None:
    with sdk(qwen) as client:
        response = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3)
        stream = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3, stream=True)
        streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and value == pytest.approx(max(top.values())) and value <= 0
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
    assert [t for s in streamed for t in s.tokens] == logprobs.tokens
    assert [o for s in streamed for o in s.text_offset] == logprobs.text_offset
