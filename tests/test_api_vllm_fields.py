"""A buyer whose code was written for vLLM or OpenAI gets what its fields ask for, or a 400 naming
the field: before, ``guided_json``, ``guided_choice``, ``guided_regex``, ``structured_outputs``,
``repetition_penalty``, ``stop_token_ids``, ``include_stop_str_in_output``, ``min_tokens`` and
``continue_final_message`` were each a 200 whose answer ignored them, ``store: true`` failed every
call of clients that always send it, and ``stream_options`` without a stream was accepted.

Greedy decoding (temperature 0) of the tiny model makes the answers comparable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from openai import BadRequestError, OpenAI

from live_server import MODEL_ID, LiveServer
from vramsupply.engine import GenerationRequest, SamplingParams
from vramsupply.engine import backend_sampling

PROMPT = "Once upon a time"
GREEDY = {"model": MODEL_ID, "temperature": 0}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer() as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as openai:
        yield openai


def complete(client: OpenAI, max_tokens: int = 60, **extra: Any) -> Any:
    return client.completions.create(**GREEDY, prompt=PROMPT, max_tokens=max_tokens, extra_body=extra)


def refusal(call: Any) -> dict[str, Any]:
    with pytest.raises(BadRequestError) as caught:
        call()
    return caught.value.body  # type: ignore[return-value]


def test_guided_choice_answers_exactly_one_of_the_strings(client: OpenAI) -> None:
    choices = ["yes", "no way", "maybe"]
    sampled = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=1.5, seed=7, n=6, extra_body={"guided_choice": choices}
    )
    chat = client.chat.completions.create(
        **GREEDY, messages=[{"role": "user", "content": "Pick one"}], max_tokens=20, extra_body={"structured_outputs": {"choice": choices}}
    )

    assert all(c.text in choices and c.finish_reason == "stop" for c in sampled.choices)
    assert chat.choices[0].message.content in choices


def test_guided_json_holds_the_answer_to_the_schema(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]}

    for extra in ({"guided_json": schema}, {"structured_outputs": {"json": json.dumps(schema)}}):
        answer = json.loads(complete(client, **extra).choices[0].text)
        assert list(answer) == ["age"] and 0 <= answer["age"] <= 120
    any_object = complete(client, structured_outputs={"json_object": True}).choices[0].text
    assert any_object.startswith("{") and any_object == complete(client, response_format={"type": "json_object"}).choices[0].text


def test_guided_regex_is_matched_by_the_whole_answer(client: OpenAI) -> None:
    for extra in ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, {"structured_outputs": {"regex": r"^[0-9]{3}-[a-z]{2}$"}}):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", complete(client, **extra).choices[0].text)


def test_what_cannot_be_honoured_is_a_400_naming_the_field(client: OpenAI) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **GREEDY}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    cases = {
        "guided_grammar": {"guided_grammar": 'root ::= "a"'},
        "structured_outputs.grammar": {"structured_outputs": {"grammar": 'root ::= "a"'}},
        "grammar": {"grammar": 'root ::= "a"{2,1}'},  # llama.cpp's own parser ran out of memory on it
        "guided_choice": {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
        "guided_regex": {"guided_regex": r"(a)\1"},  # no grammar holds a back-reference
        "structured_outputs.choice": {"guided_json": {"type": "object"}, "structured_outputs": {"choice": ["a"]}},
    }
    for param, extra in cases.items():
        assert refusal(lambda: client.chat.completions.create(**chat, extra_body=extra))["param"] == param, param
    nul = refusal(lambda: client.chat.completions.create(**chat, extra_body={"guided_choice": ["yes", "no\u0000"]}))
    assert nul["param"] == "guided_choice" and "NUL" in nul["message"], "a NUL no grammar matches: it aborted the whole server"
    with_tools = refusal(lambda: client.chat.completions.create(**chat, tools=tools, extra_body={"guided_choice": ["a"]}))
    assert with_tools["param"] == "guided_choice" and "tool_choice 'none'" in with_tools["message"]


def test_repetition_penalty_is_llama_cpps_repeat_penalty(client: OpenAI) -> None:
    plain = complete(client).choices[0].text
    vllm = complete(client, repetition_penalty=1.5).choices[0].text

    assert vllm == complete(client, repeat_penalty=1.5).choices[0].text != plain
    assert refusal(lambda: complete(client, repetition_penalty=1.5, repeat_penalty=1.2))["param"] == "repetition_penalty"


def test_a_stop_token_id_ends_the_answer_without_its_text_unless_asked(client: OpenAI, live: LiveServer) -> None:
    assert live.engine is not None
    whole = complete(client).choices[0].text
    tokens = live.engine.tokenize(whole, add_special=False)
    stop = tokens[4]
    piece = live.engine.token_bytes(stop).decode()

    dropped = complete(client, stop_token_ids=[stop])
    kept = complete(client, stop_token_ids=[stop], include_stop_str_in_output=True)

    assert dropped.choices[0].finish_reason == kept.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == dropped.choices[0].text + piece and whole.startswith(kept.choices[0].text)
    assert kept.usage.completion_tokens == dropped.usage.completion_tokens  # the stop token counts: it was generated
    assert refusal(lambda: complete(client, stop_token_ids=[10**6]))["param"] == "stop_token_ids"


async def test_include_stop_str_in_output_keeps_the_stop_string_streamed_or_not(live: LiveServer) -> None:
    body = {**GREEDY, "prompt": PROMPT, "max_tokens": 60, "stop": ["Lily"], "include_stop_str_in_output": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{live.base_url}/completions", json=body) as response:
            whole = (await response.json())["choices"][0]
        async with session.post(f"{live.base_url}/completions", json={**body, "stream": True}) as response:
            events = [json.loads(line[6:]) for line in (await response.text()).splitlines() if line.startswith("data: {")]

    assert whole["text"].endswith("named Lily") and whole["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]


def test_min_tokens_holds_back_the_end_and_stop_strings(client: OpenAI) -> None:
    eos = 2  # the tiny model's end of text, raised so that it ends the answer at once
    ends_at_once = complete(client, logit_bias={str(eos): 100})
    held = complete(client, logit_bias={str(eos): 100}, min_tokens=5)
    whole = complete(client).choices[0].text
    past_stop = complete(client, stop=["Lily"], min_tokens=20).choices[0].text

    assert (ends_at_once.choices[0].text, ends_at_once.usage.completion_tokens) == ("", 1)  # the end token counts
    assert (held.usage.completion_tokens, held.choices[0].finish_reason) == (5 + 1, "stop")
    assert whole.startswith(past_stop) and past_stop.count("Lily") >= 1 and len(past_stop) > whole.index("Lily")
    assert refusal(lambda: complete(client, max_tokens=4, min_tokens=5))["param"] == "min_tokens"
    assert refusal(lambda: complete(client, min_tokens=2, guided_choice=["a"]))["param"] == "min_tokens"


def test_min_tokens_requests_sample_on_the_host_under_backend_sampling() -> None:
    """Their end tokens are held back in the host's logits, which backend sampling never copies."""
    assert backend_sampling.supports(GenerationRequest([1], SamplingParams(temperature=0)))
    assert not backend_sampling.supports(GenerationRequest([1], SamplingParams(temperature=0), min_tokens=3))


def test_continue_final_message_continues_the_assistants_text(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a"}]
    raw = "<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\nOnce upon a"  # ChatML: the tiny model has no template

    continued = client.chat.completions.create(
        **GREEDY, messages=messages, max_tokens=20, extra_body={"continue_final_message": True, "add_generation_prompt": False}
    )
    as_text = client.completions.create(**GREEDY, prompt=raw, max_tokens=20)
    without_turn = client.chat.completions.create(**GREEDY, messages=messages[:1], max_tokens=20, extra_body={"add_generation_prompt": False})
    as_text_without_turn = client.completions.create(**GREEDY, prompt="<|im_start|>user\nTell me a story<|im_end|>\n", max_tokens=20)

    assert continued.choices[0].message.content == as_text.choices[0].text
    assert continued.usage.prompt_tokens == as_text.usage.prompt_tokens
    assert without_turn.choices[0].message.content == as_text_without_turn.choices[0].text
    both = {"continue_final_message": True, "add_generation_prompt": True}
    assert refusal(lambda: client.chat.completions.create(**GREEDY, messages=messages, extra_body=both))["param"] == "continue_final_message"
    user_last = {"continue_final_message": True}
    assert refusal(lambda: client.chat.completions.create(**GREEDY, messages=messages[:1], extra_body=user_last))["param"] == "continue_final_message"


def test_a_continued_text_found_in_the_turns_closing_markup_is_cut_where_the_message_is(client: OpenAI) -> None:
    """The last "d" of the prompt was inside the turn's closing ``<|im_end|>``: the model went on
    from "…assistant\nd<|im_end"."""
    messages = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "d"}]
    raw = "<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\nd"
    continued = client.chat.completions.create(
        **GREEDY, messages=messages, max_tokens=10, extra_body={"continue_final_message": True, "add_generation_prompt": False}
    )
    as_text = client.completions.create(**GREEDY, prompt=raw, max_tokens=10)
    assert (continued.choices[0].message.content, continued.usage.prompt_tokens) == (as_text.choices[0].text, as_text.usage.prompt_tokens)


def test_openai_fields_as_openai_and_vllm_answer_them(client: OpenAI) -> None:
    chat = {**GREEDY, "messages": [{"role": "user", "content": "Hi"}]}

    assert client.chat.completions.create(**chat, max_tokens=4, store=True).choices[0].finish_reason == "length"
    stream_options = refusal(lambda: client.chat.completions.create(**chat, max_tokens=4, stream_options={"include_usage": True}))
    assert stream_options == {
        "message": "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        "type": "invalid_request_error", "param": "stream_options", "code": "invalid_value",
    }
    too_long = refusal(lambda: client.chat.completions.create(**chat, max_completion_tokens=5000))
    assert too_long["param"] == "max_completion_tokens" and "max_completion_tokens (5000)" in too_long["message"]
    sampled = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 30, "temperature": 1.0, "seed": 3}
    off = client.completions.create(**sampled, extra_body={"top_k": 0}).choices[0].text
    assert client.completions.create(**sampled, extra_body={"top_k": -1}).choices[0].text == off


async def test_the_fields_may_be_null_as_clients_send_them(live: LiveServer) -> None:
    body = {**GREEDY, "prompt": PROMPT, "max_tokens": 5, "stop_token_ids": None, "include_stop_str_in_output": None, "min_tokens": None, "guided_json": None}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{live.base_url}/completions", json=body) as response:
            assert response.status == 200, await response.text()


async def test_include_stop_str_in_output_keeps_the_buyers_stop_strings_never_the_templates(live: LiveServer) -> None:
    """The bundled model has no chat template: ChatML's `<|im_end|>` ends its answers, and a review
    found `include_stop_str_in_output` would have kept it in `content`."""
    from vramsupply.server.completions import chat_generation_requests
    from vramsupply.server.schemas import ChatCompletionBody

    assert live.engine is not None
    body = ChatCompletionBody.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}], "stop": ["END"], "include_stop_str_in_output": True, "n": 2}
    )
    chat = live.engine.prepare_chat(body.chat_request())
    requests = await chat_generation_requests(body, chat)

    assert "<|im_end|>" in requests[0].stop and "END" in requests[0].stop
    assert all(r.kept_stop == frozenset({"END"}) for r in requests)


async def test_a_batch_with_a_prompt_the_engine_refuses_does_no_work_for_the_others(live: LiveServer) -> None:
    """Each prompt of a batch is its own engine request: one refused after another had started
    left engine token counts (heartbeats) that no ledger row or usage matched."""
    assert live.engine is not None
    before = live.engine.stats()
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            body = {"prompt": [[1, 2, 3, 4, 5, 6, 7, 8], [1, 99999]], "max_tokens": 5, "guided_choice": ["a b c d e f g h", "zz"]}
            async with session.post(f"{live.base_url}/completions", json=body) as response:
                answer = await response.json()
                assert response.status == 400 and answer["error"]["param"] == "prompt", answer
    after = live.engine.stats()

    assert (after.prompt_tokens_total, after.requests_total) == (before.prompt_tokens_total, before.requests_total)
