"""A buyer sends several prompts in one ``/v1/completions`` request, and asks for ``echo``, as
OpenAI's legacy endpoint and vLLM allow: each prompt's choices are what that prompt alone gets,
usage and the earnings ledger count every prompt once, and echo puts the prompt before the answer."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from live_server import MODEL_ID, LiveServer, RecordingLedger, recording_server

PROMPTS = ["Once upon a time, there was a", "The little dog", "Lily and Tom went to the park"]
GREEDY = {"model": MODEL_ID, "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with recording_server(parallel=4, max_queue=16) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


def prompt_tokens(server: LiveServer, prompt: str) -> int:
    assert server.engine is not None
    return len(server.engine.tokenize(prompt))


def alone(client: OpenAI, prompt: str | list[int], **fields: object) -> str:
    return client.completions.create(prompt=prompt, **{**GREEDY, **fields}).choices[0].text  # type: ignore[arg-type]


def test_each_batched_prompt_gets_what_it_gets_alone_with_exact_usage_and_ledger(server: LiveServer, client: OpenAI) -> None:
    ledger = server.state.accounts.recorder
    assert isinstance(ledger, RecordingLedger)
    singles = [client.completions.create(prompt=p, **GREEDY) for p in PROMPTS]  # type: ignore[arg-type]
    expected = [s.choices[0].text for s in singles]
    ledger.rows.clear()

    answer = client.completions.create(prompt=PROMPTS, n=2, **GREEDY)  # type: ignore[arg-type]

    assert [c.index for c in answer.choices] == list(range(6))
    assert [c.text for c in answer.choices] == [text for text in expected for _ in range(2)]  # choice i * n + j: prompt i
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == sum(prompt_tokens(server, p) for p in PROMPTS)  # each prompt once, whatever n
    assert answer.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles if s.usage is not None)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    [row] = ledger.rows
    assert (row.prompt_tokens, row.completion_tokens, row.choices) == (answer.usage.prompt_tokens, answer.usage.completion_tokens, 6)


def test_token_id_prompts_batch_too(server: LiveServer, client: OpenAI) -> None:
    assert server.engine is not None
    token_prompts = [server.engine.tokenize(p) for p in PROMPTS[:2]]

    answer = client.completions.create(prompt=token_prompts, **GREEDY)  # type: ignore[arg-type]

    assert [c.text for c in answer.choices] == [alone(client, p) for p in token_prompts]
    assert answer.usage is not None and answer.usage.prompt_tokens == sum(len(p) for p in token_prompts)


def test_a_streamed_batch_matches_the_whole_one_and_its_usage_chunk_sums(client: OpenAI) -> None:
    whole = client.completions.create(prompt=PROMPTS, n=2, **GREEDY)  # type: ignore[arg-type]

    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(prompt=PROMPTS, n=2, stream=True, stream_options={"include_usage": True}, **GREEDY):  # type: ignore[arg-type]
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        usage = chunk.usage or usage

    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_echo_puts_each_prompt_before_its_choices_whole_and_streamed(server: LiveServer, client: OpenAI) -> None:
    assert server.engine is not None
    plain = client.completions.create(prompt=PROMPTS[:2], n=2, **GREEDY)  # type: ignore[arg-type]

    echoed = client.completions.create(prompt=PROMPTS[:2], n=2, echo=True, **GREEDY)  # type: ignore[arg-type]
    first_chunks: dict[int, str] = {}
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=PROMPTS[:2], n=2, echo=True, stream=True, **GREEDY):  # type: ignore[arg-type]
        for choice in chunk.choices:
            first_chunks.setdefault(choice.index, choice.text)
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text

    assert [c.text for c in echoed.choices] == [PROMPTS[c.index // 2] + c.text for c in plain.choices]
    assert first_chunks == {i: PROMPTS[i // 2] for i in range(4)}
    assert streamed == {c.index: c.text for c in echoed.choices}
    assert echoed.usage is not None and plain.usage is not None
    assert (echoed.usage.prompt_tokens, echoed.usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    tokens = server.engine.tokenize("The little dog")
    token_echo = client.completions.create(prompt=tokens, echo=True, **GREEDY).choices[0].text  # type: ignore[arg-type]
    assert token_echo == server.engine.detokenize(tokens) + alone(client, tokens)  # token ids echo as their text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": [f"prompt {i}" for i in range(17)]}, "prompt"),
        ({"prompt": PROMPTS, "n": 6}, "n"),  # 18 choices
        ({"prompt": ["a", [1, 2]]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),  # an empty token list (an empty string is the BOS token alone)
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 scores a prompt: it takes echo (test_prompt_logprobs.py)
    ],
)
def test_batches_past_the_bounds_and_max_tokens_0_without_echo_are_400_naming_the_field(client: OpenAI, fields: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**{"model": MODEL_ID, **fields})  # type: ignore[call-overload]

    error = json.loads(refused.value.response.text)["error"]
    assert error["param"] == param and param in error["message"]


def test_more_choices_than_slots_and_queue_is_400_naming_n() -> None:
    with LiveServer(parallel=1, max_queue=2) as small, OpenAI(base_url=small.base_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(prompt=PROMPTS[:2], n=2, **GREEDY)  # type: ignore[arg-type]

    error = json.loads(refused.value.response.text)["error"]
    assert error["param"] == "n" and "prompts × n" in error["message"]
