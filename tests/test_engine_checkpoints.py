"""A recurrent state cannot be cut back, so the engine checkpoints it a few tokens before each long
prompt's end: the next turn of a chat whose history is not what the model generated (a thinking
model's template drops the reasoning) prefills only the new turn, and gets the answer the whole
prompt gets alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tiny_archs import write_hybrid_model, write_mamba_model
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.checkpoints import CHECKPOINT_TAIL, MIN_CHECKPOINT_TOKENS, checkpoint_positions

GREEDY = SamplingParams(temperature=0)
STORY = ("Once upon a time a little cat named Tom lived in a small house by the river with his friend the dog. "
         "Every morning they walked to the park and played with a red ball until the sun was high. ") * 2


@pytest.fixture(scope="module", params=[write_mamba_model, write_hybrid_model], ids=["recurrent", "hybrid"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recurrent model, and a hybrid one (as Qwen3.5): attention KV cut back, the state restored."""
    return request.param(tmp_path_factory.mktemp("checkpoints"))


def load(model: Path, parallel: int = 1, cache_ram: int = 0) -> Engine:
    return Engine.load(EngineOptions(model_path=model, n_ctx=1024, parallel=parallel, max_queue=8, cache_ram=cache_ram, threads=1))


async def ask(engine: Engine, tokens: list[int], max_tokens: int = 12) -> tuple[list[int], int]:
    """The answer's tokens and how many prompt tokens were reused."""
    generation = engine.submit(GenerationRequest(tokens, sampling=GREEDY, max_tokens=max_tokens, ignore_eos=True))
    await generation.collect()
    return generation.token_ids, generation.usage.cached_tokens


async def fresh(model: Path, tokens: list[int]) -> list[int]:
    """The answer of an engine that never saw anything else."""
    with load(model) as engine:
        return (await ask(engine, tokens))[0]


async def test_the_next_turn_after_a_dropped_answer_prefills_only_the_new_turn(model: Path) -> None:
    with load(model) as engine:
        first = engine.tokenize(STORY)
        assert len(first) >= MIN_CHECKPOINT_TOKENS
        answer, _ = await ask(engine, first)
        # The history as a thinking model's template renders it: not the tokens generated.
        second = first + engine.tokenize(" Then it rained, and they went home.")[1:]
        assert second[len(first) : len(first) + len(answer)] != answer
        again, cached = await ask(engine, second)
        stats = engine.stats()
    assert cached == len(first) - CHECKPOINT_TAIL  # before: 0, the whole history prefilled again
    assert (stats.checkpoints_total, stats.checkpoint_restores_total) == (2, 1)  # one per prompt, /metrics counts them
    assert again == await fresh(model, second)


async def test_the_same_prompt_sent_again_restarts_from_its_checkpoint(model: Path) -> None:
    with load(model) as engine:
        prompt = engine.tokenize(STORY)
        first, _ = await ask(engine, prompt)
        again, cached = await ask(engine, prompt)
    assert cached == len(prompt) - CHECKPOINT_TAIL
    assert again == first


async def test_a_prompt_that_parts_from_the_history_before_the_checkpoint_is_prefilled_whole(model: Path) -> None:
    with load(model) as engine:
        prompt = engine.tokenize(STORY)
        await ask(engine, prompt)
        edited = prompt[:20] + engine.tokenize(" a bird who sang all day long in the tall green tree by the road")[1:]
        answer, cached = await ask(engine, edited)
    assert cached == 0
    assert answer == await fresh(model, edited)


async def test_a_short_prompt_gets_no_checkpoint(model: Path) -> None:
    with load(model) as engine:
        prompt = engine.tokenize("Tom the cat went to the park")
        assert len(prompt) < MIN_CHECKPOINT_TOKENS
        await ask(engine, prompt)
        _, cached = await ask(engine, prompt)
    assert cached == 0


async def test_turns_of_two_chats_that_take_the_same_slot_in_turn_each_come_back_correct(model: Path) -> None:
    """The checkpoint belongs to what the slot holds: once another chat took the slot it is not used."""
    with load(model) as engine:
        tom = engine.tokenize(STORY)
        lily = engine.tokenize(STORY.replace("Tom", "Lily").replace("cat", "dog"))
        await ask(engine, tom)
        await ask(engine, lily)
        follow_up = tom + engine.tokenize(" The end.")[1:]
        answer, cached = await ask(engine, follow_up)
    assert cached < len(tom) - CHECKPOINT_TAIL  # the slot holds lily's story now: at most a shared start
    assert answer == await fresh(model, follow_up)


async def test_a_chat_whose_slot_went_to_another_comes_back_from_the_host_cache_with_its_checkpoint(model: Path) -> None:
    """More conversations than slots: the first chat's state was saved to host memory with its
    checkpoint when the second took the slot, and its next turn restores both."""
    with load(model, cache_ram=64) as engine:
        tom = engine.tokenize(STORY)
        await ask(engine, tom)
        await ask(engine, engine.tokenize(STORY.replace("Once upon a time", "Long ago")))
        follow_up = tom + engine.tokenize(" Then it rained, and they went home.")[1:]
        answer, cached = await ask(engine, follow_up)
    assert cached == len(tom) - CHECKPOINT_TAIL  # before: 0, the saved state (with the answer) was of no use
    assert answer == await fresh(model, follow_up)


async def test_a_new_conversation_behind_the_same_system_prompt_starts_from_a_checkpoint_of_it(model: Path) -> None:
    """The second conversation sharing a system prompt gets a checkpoint where the shared part ends,
    and from the third on it is not prefilled again: in the slot, and from the host cache."""
    for cache_ram in (0, 64):
        with load(model, cache_ram=cache_ram) as engine:
            system = engine.tokenize(STORY)
            chats = [system + engine.tokenize(f" Question {n}: what did the {animal} do next?")[1:]
                     for n, animal in enumerate(("cat", "dog", "bird", "fish"))]
            shared = common_prefix(chats[0], chats[1])
            assert shared >= MIN_CHECKPOINT_TOKENS
            cached = [(await ask(engine, chat))[1] for chat in chats[:2]]
            answer, third = await ask(engine, chats[2])
            if cache_ram:  # the third conversation's state went to the host cache; the fourth restores it
                await ask(engine, engine.tokenize("Something else entirely, " * 20))
                answer, third = await ask(engine, chats[3])
        assert cached == [0, 0] and third == shared, f"cache_ram={cache_ram}"
        assert answer == await fresh(model, chats[3] if cache_ram else chats[2])


async def test_a_parked_conversation_s_checkpoints_are_counted_once_in_the_host_cache(model: Path) -> None:
    """When an idle slot's conversation is parked in the host prompt cache, its checkpoints go with
    it (within --cache-ram) and the slot lets them go: the memory outside the budget is only the
    checkpoints of what the slots hold, as /metrics reports."""
    with load(model, parallel=2, cache_ram=64) as engine:
        tom, lily = engine.tokenize(STORY), engine.tokenize(STORY.replace("Tom", "Lily"))
        await asyncio.gather(ask(engine, tom), ask(engine, lily))  # one in each slot
        two_chats = engine.stats().checkpoint_bytes
        await ask(engine, engine.tokenize(STORY.replace("Once upon a time", "Long ago")))  # the other slot is parked
        stats = engine.stats()
    assert two_chats > 0 and stats.prompt_cache_entries == 2  # both earlier chats went to the cache, with their checkpoints
    # One chat's checkpoint (prompts differ by a few tokens); before, the parked slot kept its
    # chat's too, outside the budget, for as long as it stayed idle.
    assert stats.checkpoint_bytes < 0.75 * two_chats


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_where_a_prompt_gets_checkpoints() -> None:
    end = 300 - CHECKPOINT_TAIL
    assert checkpoint_positions(300, kept=0, shared=0) == [end]
    assert checkpoint_positions(MIN_CHECKPOINT_TOKENS - 1, kept=0, shared=0) == []  # too short to pay
    assert checkpoint_positions(300, kept=end, shared=0) == []  # already past it
    assert checkpoint_positions(300, kept=0, shared=120) == [120, end]  # a system prompt others hold
    assert checkpoint_positions(300, kept=100, shared=120) == [end]  # the shared start is (nearly) what was reused
    assert checkpoint_positions(1300, kept=996, shared=1000) == [1296]  # a chat's next turn: its history is shared
