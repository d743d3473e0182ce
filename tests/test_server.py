"""The official openai SDK, sync and async, against the real server and the tiny model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types import Completion

from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer

MESSAGES = [{"role": "system", "content": "You tell short stories."}, {"role": "user", "content": "Once upon a time"}]
PROMPT = "Once upon a time, there was a"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(aliases=[TINY_MODEL.name]) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def async_client(server: LiveServer) -> AsyncOpenAI:
    sdk = AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    yield sdk
    await sdk.close()


def chat_prompt_tokens(server: LiveServer) -> int:
    assert server.engine is not None
    return len(server.engine.tokenize_chat(MESSAGES))


def text_prompt_tokens(server: LiveServer, prompt: str = PROMPT) -> int:
    assert server.engine is not None
    return len(server.engine.tokenize(prompt))


def test_chat_completion_has_openai_fields_and_exact_usage(server: LiveServer, client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL_ID
    assert completion.created > 1_700_000_000
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == chat_prompt_tokens(server)
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens is not None


def test_chat_stream_matches_the_whole_answer_and_reports_usage_last(server: LiveServer, client: OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_completion_tokens=12, temperature=0)

    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    assert all(c.usage is None for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason] == [whole.choices[0].finish_reason]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and whole.usage is not None
    assert usage_chunk.usage.prompt_tokens == chat_prompt_tokens(server)
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.total_tokens == whole.usage.total_tokens


def test_developer_role_is_read_as_system(server: LiveServer, client: OpenAI) -> None:
    as_developer = [{**MESSAGES[0], "role": "developer"}, MESSAGES[1]]
    completion = client.chat.completions.create(model=MODEL_ID, messages=as_developer, max_tokens=1)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == chat_prompt_tokens(server)


def test_stream_without_include_usage_sends_no_usage(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4, stream=True))

    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None and c.choices for c in chunks)


def test_text_completion_whole_and_streamed(server: LiveServer, client: OpenAI) -> None:
    whole = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )

    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (text_prompt_tokens(server), 10)
    *text_chunks, usage_chunk = chunks
    assert {c.object for c in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 10


def test_text_completion_defaults_to_16_tokens_like_openai(client: OpenAI) -> None:
    completion = client.completions.create(model=MODEL_ID, prompt=PROMPT, extra_body={"ignore_eos": True})

    assert completion.usage is not None and completion.usage.completion_tokens == 16


def test_prompt_as_token_ids(server: LiveServer, client: OpenAI) -> None:
    assert server.engine is not None
    tokens = server.engine.tokenize(PROMPT)
    by_ids = client.completions.create(model=MODEL_ID, prompt=tokens, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL_ID, prompt=[PROMPT], max_tokens=6, temperature=0)

    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(tokens)


def test_repeated_prompt_reports_cached_tokens(client: OpenAI) -> None:
    prompt = "The dog ran to the park and played with a red ball all day long."
    client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2)
    again = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=2)

    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 0 < cached < again.usage.prompt_tokens


def test_stop_string_cuts_the_answer(client: OpenAI) -> None:
    free = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0)
    text = free.choices[0].text
    stop = text.split()[2]

    stopped = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)

    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_seed_reproduces_sampled_text(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        completion = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed)
        return completion.choices[0].text

    assert sample(7) == sample(7)


def test_logit_bias_forces_a_token(server: LiveServer, client: OpenAI) -> None:
    assert server.engine is not None
    [token] = server.engine.tokenize("the", add_special=False)
    completion = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )

    assert completion.choices[0].text.split() == ["the"] * 4


def test_text_offsets_point_into_the_text_even_past_tokens_that_add_none(client: OpenAI) -> None:
    """A control token (here <s>, forced) is shown by its name but adds no text: the offsets of
    the tokens after it were 3 characters too far for each one."""
    forced = {"1": 100}  # <s>
    whole = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0, logit_bias=forced)
    assert whole.choices[0].text == ""
    assert whole.choices[0].logprobs.tokens == ["<s>"] * 4 and whole.choices[0].logprobs.text_offset == [0, 0, 0, 0]

    later = {"1": 15}  # <s> only after a few words
    mixed = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0, logit_bias=later)
    stream = client.completions.create(
        model="stories260k", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0, logit_bias=later, stream=True
    )
    streamed = [o for chunk in stream if chunk.choices and chunk.choices[0].logprobs for o in chunk.choices[0].logprobs.text_offset]
    text, logprobs = mixed.choices[0].text, mixed.choices[0].logprobs
    assert logprobs.tokens[0] != "<s>" and logprobs.tokens[-1] == "<s>", "words, then control tokens"
    ends = [*logprobs.text_offset[1:], len(text)]
    for token, start, end in zip(logprobs.tokens, logprobs.text_offset, ends, strict=True):
        assert text[start:end] == ("" if token == "<s>" else token)
    assert streamed == logprobs.text_offset


def test_n_choices_are_separate_and_usage_adds_up(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, n=3, max_tokens=5, temperature=1.0, seed=1, extra_body={"ignore_eos": True}
    )

    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert completion.usage is not None and completion.usage.completion_tokens == 15


def test_each_choice_of_a_seed_is_its_own_sample_and_minus_one_is_random_for_every_choice(client: OpenAI) -> None:
    """An evaluation that runs seed = 0, 1, 2, ... with n = 4 must not get the same samples again
    (choice i took seed + i); -1 asks for random seeds, and got 0, 1, ... after the first choice.
    Random samples are compared at 80 tokens: at 25 the tiny model's likeliest story came twice in
    17 of 400 draws (measured), so two random runs could share one by chance."""

    def texts(seed: int, max_tokens: int = 25) -> list[str]:
        completion = client.completions.create(
            model=MODEL_ID, prompt="Once upon a time", n=4, max_tokens=max_tokens, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True, "top_k": 0, "min_p": 0},
        )
        return [choice.text for choice in sorted(completion.choices, key=lambda c: c.index)]

    first, again, next_seed = texts(100), texts(100), texts(101)
    assert first == again, "a seed reproduces every choice"
    assert len(set(first)) == 4 and not set(first) & set(next_seed)
    single = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=25, temperature=1.0, seed=100, extra_body={"ignore_eos": True, "top_k": 0, "min_p": 0})
    assert single.choices[0].text == first[0], "the first choice is the seed's own sample, as with n 1"
    random_runs = [texts(-1, max_tokens=80) for _ in range(2)]
    seeded = texts(0, max_tokens=80) + texts(1, max_tokens=80)
    assert len(set(random_runs[0])) == 4 and not set(random_runs[0]) & set(random_runs[1]) and not set(random_runs[0]) & set(seeded)


def test_n_choices_stream_interleaved(client: OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL_ID, prompt=PROMPT, n=2, max_tokens=5, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )

    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_json_schema_response_format_constrains_output(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    completion = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    )

    content = completion.choices[0].message.content
    assert content is not None and json.loads(content)["answer"] in ("yes", "no")
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_response_format_starts_an_object(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0, response_format={"type": "json_object"}
    )

    assert (completion.choices[0].message.content or "").startswith("{")


def test_models_lists_the_served_model(client: OpenAI) -> None:
    models = client.models.list()

    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].object == "model" and models.data[0].owned_by == "vramsupply"


def test_retrieve_model_by_id_and_unknown_id(client: OpenAI) -> None:
    model = client.models.retrieve(MODEL_ID)

    assert model.id == MODEL_ID and model.object == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("org/other-model")
    assert raised.value.code == "model_not_found"


def test_model_aliases_and_omitted_model_are_accepted(server: LiveServer, client: OpenAI) -> None:
    assert server.engine is not None
    for name in (MODEL_ID.upper(), server.engine.model_name, "stories260K.gguf"):
        completion = client.completions.create(model=name, prompt=PROMPT, max_tokens=1)
        assert completion.model == MODEL_ID
    anonymous = client.post("/completions", body={"prompt": PROMPT, "max_tokens": 1}, cast_to=Completion)
    assert anonymous.model == MODEL_ID


async def test_async_client_chat_and_text(server: LiveServer, async_client: AsyncOpenAI) -> None:
    chat = await async_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=5, extra_body={"ignore_eos": True})
    text = await async_client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True})
    chat_stream = await async_client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    chat_chunks = [chunk async for chunk in chat_stream]
    text_stream = await async_client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=5, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    text_chunks = [chunk async for chunk in text_stream]

    assert chat.usage is not None and chat.usage.completion_tokens == 5
    assert chat.usage.prompt_tokens == chat_prompt_tokens(server)
    assert text.usage is not None and text.usage.completion_tokens == 5
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    for chunks in (chat_chunks, text_chunks):
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_eight_concurrent_streams_all_complete(server: LiveServer, async_client: AsyncOpenAI) -> None:
    async def one_stream(i: int) -> tuple[str, int]:
        stream = await async_client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": f"Story number {i}"}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        usage = chunks[-1].usage
        assert usage is not None
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), usage.completion_tokens

    results = await asyncio.gather(*(one_stream(i) for i in range(8)))

    assert [tokens for _, tokens in results] == [20] * 8
    assert all(text for text, _ in results)
