"""Values the OpenAI API takes and clients send, which the agent refused with a 400: a null for
a field left unset, ``top_p`` 0, and an empty text prompt. Through the official SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import openai
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
from openai import OpenAI

from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer

GREEDY = {"model": MODEL_ID, "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer(parallel=2) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_a_null_echo_or_vllm_switch_is_its_default(client: OpenAI) -> None:
    plain = client.completions.create(prompt="Once upon", **GREEDY).choices[0].text  # type: ignore[arg-type]
    nulls = client.completions.create(prompt="Once upon", echo=None, extra_body={"ignore_eos": None}, **GREEDY)  # type: ignore[arg-type]
    assert nulls.choices[0].text == plain  # before: 400 "Input should be a valid boolean"

    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}], extra_body={"continue_final_message": None, "ignore_eos": None}, **GREEDY  # type: ignore[arg-type]
    )
    assert chat.choices[0].message.role == "assistant"


def test_top_p_zero_keeps_the_likeliest_token_alone(client: OpenAI) -> None:
    greedy = client.completions.create(prompt="The little dog", **GREEDY).choices[0].text  # type: ignore[arg-type]
    hot = {**GREEDY, "temperature": 1.5}
    answers = {client.completions.create(prompt="The little dog", top_p=0, seed=seed, **hot).choices[0].text for seed in range(3)}  # type: ignore[arg-type]
    assert answers == {greedy}  # before: 400 "Input should be greater than 0"


def test_an_empty_prompt_is_the_bos_token_alone(client: OpenAI) -> None:
    answer = client.completions.create(prompt="", **GREEDY)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.prompt_tokens == 1  # before: 400 "the prompt must be a non-empty string"
    assert answer.choices[0].text

    batch = client.completions.create(prompt=["", "Once upon"], **GREEDY)  # type: ignore[arg-type]
    assert batch.choices[0].text == answer.choices[0].text


def test_an_empty_prompt_to_a_model_without_bos_is_a_400_not_a_500(tmp_path: Path) -> None:
    model = tmp_path / "no-bos.gguf"
    reader = gguf.GGUFReader(TINY_MODEL)
    writer = gguf.GGUFWriter(model, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(), endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.ADD_BOS: MetadataDetails(gguf.GGUFValueType.BOOL, False)}, [])

    with LiveServer(model_path=model, parallel=1) as server, OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as sdk:
        assert sdk.completions.create(prompt="Once", **GREEDY).choices[0].text  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.completions.create(prompt=["Once", ""], **GREEDY)  # type: ignore[arg-type]
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "prompt" and error["code"] == "invalid_value"
    assert error["message"] == "prompt 1 is empty and this model adds no BOS token to a text prompt: send some text"
