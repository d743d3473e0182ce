"""A recurrent model (hybrid ones such as Qwen3.5 have the same kind of layers) keeps one state per
sequence, not a cell per token: the engine's prefix sharing must fall back to whole sequences there,
and every answer must be the one the prompt gets alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_process import AgentProcess
from conftest import TINY_MODEL
from openai import OpenAI
from tiny_archs import write_mamba_model
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.model import Model, spare_sequences

GREEDY = SamplingParams(temperature=0)
SYSTEM = "You are a storyteller. Tell short happy stories for children about animals and their friends. " * 2


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mamba_model(tmp_path_factory.mktemp("recurrent"))


def load(model: Path, parallel: int = 2, cache_ram: int = 0) -> Engine:
    return Engine.load(EngineOptions(model_path=model, n_ctx=1024, parallel=parallel, max_queue=8, cache_ram=cache_ram, threads=1))


def request(tokens: list[int], max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(tokens, sampling=GREEDY, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(model: Path) -> dict[str, list[int]]:
    with load(model) as engine:
        system = engine.tokenize(SYSTEM)
        return {name: system + engine.tokenize(" " + text)[1:] for name, text in (("tom", "Tom the cat went to the park"), ("lily", "Lily the dog found a red ball"))}


@pytest.fixture(scope="module")
def alone(model: Path) -> Iterator[Engine]:
    """Every prompt in a fresh engine of its own: the answers to compare with."""
    with load(model, parallel=1) as engine:
        yield engine


async def answer(engine: Engine, tokens: list[int], max_tokens: int = 12) -> list[int]:
    generation = engine.submit(request(tokens, max_tokens))
    await generation.collect()
    return generation.token_ids


def test_a_recurrent_model_is_known_not_to_copy_prefixes_and_gets_no_spare_sequence(model: Path) -> None:
    recurrent, attention = Model.load(model, n_gpu_layers=0), Model.load(TINY_MODEL, n_gpu_layers=0)
    assert (recurrent.copies_prefixes, attention.copies_prefixes) == (False, True)
    options = EngineOptions(model_path=TINY_MODEL)
    assert spare_sequences(options, attention) == 1  # for the host cache's copies of part of a sequence
    assert spare_sequences(options, recurrent) == 0  # it would only hold one more recurrent state
    assert spare_sequences(EngineOptions(model_path=TINY_MODEL, kv_per_slot=True), attention) == 0


async def test_the_choices_of_an_n_2_request_each_get_the_answer_of_the_prompt_alone(model: Path, prompts: dict, alone: Engine) -> None:
    expected = await answer(alone, prompts["tom"])
    with load(model) as engine:
        first = engine.submit(request(prompts["tom"]))
        second = engine.submit(request(prompts["tom"]), shares_prompt_with=first)
        await first.collect()
        await second.collect()  # sharing the prompt's state failed this decode (positions not consecutive)
        stats = engine.stats()
    assert first.token_ids == second.token_ids == expected
    # The request's prompt counts once, as with sharing. Each choice prefilled the prompt, but the
    # second from a checkpoint of the first's state when one was saved by the time it was admitted
    # (on a loaded machine it was: 115 tokens in all for a 111-token prompt, not 222).
    assert stats.prompt_tokens_total == len(prompts["tom"])
    assert len(prompts["tom"]) < stats.prefill_tokens_total <= 2 * len(prompts["tom"])


async def test_a_conversation_behind_the_system_prompt_of_a_running_one_borrows_nothing(model: Path, prompts: dict, alone: Engine) -> None:
    expected_long, expected = await answer(alone, prompts["tom"], 60), await answer(alone, prompts["lily"])
    with load(model) as engine:
        running = engine.submit(request(prompts["tom"], 60))
        tokens = running.__aiter__()
        await tokens.__anext__()  # the first conversation is generating
        second = engine.submit(request(prompts["lily"]))
        await second.collect()
        await running.collect()
    assert second.token_ids == expected and second.usage.cached_tokens == 0
    assert running.token_ids == expected_long


async def test_a_conversation_whose_whole_history_was_saved_comes_back_from_the_host_cache(model: Path, prompts: dict, alone: Engine) -> None:
    with load(model, parallel=1, cache_ram=64) as engine:
        first = await answer(engine, prompts["tom"])
        await answer(engine, engine.tokenize("A different story about a dog and a ball, told slowly and with many words"))
        follow_up = prompts["tom"] + first[:-1] + engine.tokenize(" and then")[1:]
        again = engine.submit(request(follow_up))
        await again.collect()
    assert again.usage.cached_tokens == len(prompts["tom"]) + len(first) - 1  # the saved sequence, whole
    assert again.token_ids == await answer(alone, follow_up)


async def test_speculative_decoding_is_off_for_it_even_when_asked_for(model: Path, alone: Engine, caplog: pytest.LogCaptureFixture) -> None:
    options = EngineOptions(model_path=model, n_ctx=1024, parallel=1, max_queue=8, cache_ram=0, threads=1, draft_max=8)
    with Engine.load(options) as engine:
        tokens = engine.tokenize("the cat the dog the cat the dog the cat the dog")
        answered = await answer(engine, tokens, 200)  # rejected drafts failed this request's decode
        assert engine.stats().draft_tokens_total == 0
    assert answered == await answer(alone, tokens, 200)
    assert "speculative decoding is off: this model keeps a recurrent state" in caplog.text


def test_vramsupply_serve_plans_it_with_no_kv_cache_and_4_slots_by_default(model: Path) -> None:
    """The memory plan read ``attention.head_count`` and refused a model without attention; and since
    every slot holds a whole recurrent state, unset slots stay at 4 for it (16 for attention models)."""
    with AgentProcess("--model", str(model), "--port", "0", "--no-register") as served:
        served.wait_ready()
        assert served.printed("(4 slots, ")
        with OpenAI(base_url=served.base_url, api_key="none", max_retries=0) as client:
            answer = client.completions.create(model=served.model_id, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    with AgentProcess("--model", str(model), "--port", "0", "--no-register", "--parallel", "6") as served:
        served.wait_ready()
        assert served.printed("(6 slots, ")
