"""``n`` > 1 on the real tiny model: the choices decode their shared prompt once and bill it once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from conftest import TINY_MODEL
from tiny_archs import SWA_WINDOW, write_swa_model
from vramsupply.engine import Engine, EngineOptions, EngineStats, Generation, GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0)
PROMPT = "Lily and Tom went to the park. They saw a big dog and a small cat playing in the sun"


@pytest.fixture
def engine() -> Iterator[Engine]:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=4, max_queue=8)) as loaded:
        yield loaded


def submit_choices(engine: Engine, prompt: list[int], n: int, **request: object) -> list[Generation]:
    first = engine.submit(GenerationRequest(prompt, **request))  # type: ignore[arg-type]
    return [first, *(engine.submit(GenerationRequest(prompt, **request), shares_prompt_with=first) for _ in range(n - 1))]  # type: ignore[arg-type]


def grew(before: EngineStats, after: EngineStats) -> tuple[int, int, int]:
    return (
        after.prompt_tokens_total - before.prompt_tokens_total,
        after.prefill_tokens_total - before.prefill_tokens_total,
        after.completion_tokens_total - before.completion_tokens_total,
    )


async def test_four_choices_prefill_the_prompt_once_and_copy_its_kv(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    alone = engine.submit(GenerationRequest(list(reversed(prompt[1:])), sampling=GREEDY, max_tokens=1))  # warm a different slot's KV
    await alone.collect()
    before = engine.stats()

    choices = submit_choices(engine, prompt, 4, sampling=GREEDY, max_tokens=12, ignore_eos=True)
    texts = await asyncio.gather(*(choice.collect() for choice in choices))

    assert grew(before, engine.stats()) == (len(prompt), len(prompt) + 3, 4 * 12)
    single = engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=12, ignore_eos=True))
    assert texts == [await single.collect()] * 4, "the copied KV decodes exactly like a prompt of its own"
    assert [choice.usage.prompt_tokens for choice in choices if choice.usage] == [len(prompt)] * 4


async def test_choices_with_different_seeds_still_share_the_prompt_and_differ(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    before = engine.stats()
    first = engine.submit(GenerationRequest(prompt, sampling=SamplingParams(temperature=1.0, seed=1), max_tokens=16, ignore_eos=True))
    others = [
        engine.submit(GenerationRequest(prompt, sampling=SamplingParams(temperature=1.0, seed=seed), max_tokens=16, ignore_eos=True), shares_prompt_with=first)
        for seed in (2, 3)
    ]
    texts = await asyncio.gather(*(g.collect() for g in (first, *others)))

    prompt_grew, prefilled, _ = grew(before, engine.stats())
    assert prompt_grew == len(prompt) and prefilled <= len(prompt) + 2
    assert len(set(texts)) > 1


async def test_a_choice_whose_sibling_is_cancelled_prefills_on_its_own(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    first, second = submit_choices(engine, prompt, 2, sampling=GREEDY, max_tokens=8, ignore_eos=True)
    first.cancel()
    text = await second.collect()

    assert second.finish_reason == "length" and text
    single = engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=8, ignore_eos=True))
    assert text == await single.collect()


async def test_more_choices_than_slots_queue_and_all_finish(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    before = engine.stats()
    choices = submit_choices(engine, prompt, 6, sampling=GREEDY, max_tokens=4, ignore_eos=True)
    texts = await asyncio.gather(*(choice.collect() for choice in choices))

    assert len(set(texts)) == 1 and all(c.finish_reason == "length" for c in choices)
    assert grew(before, engine.stats())[0] == len(prompt) and grew(before, engine.stats())[2] == 24


async def test_a_choice_must_share_the_same_prompt(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    first = engine.submit(GenerationRequest(prompt, max_tokens=2))
    with pytest.raises(ValueError, match="same prompt"):
        engine.submit(GenerationRequest(prompt[:-1], max_tokens=2), shares_prompt_with=first)
    await first.collect()


SYSTEM = "You are a kind story teller. You tell short stories about children, their pets and the sea, in simple words."


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


async def ask_beside(engine: Engine, running_prompt: list[int], question: list[int]) -> tuple[Generation, int]:
    """``question`` asked while a request for ``running_prompt`` generates: its generation, and
    how many prompt tokens were decoded for it."""
    running = engine.submit(GenerationRequest(running_prompt, sampling=GREEDY, max_tokens=40, ignore_eos=True))
    await running.__anext__()  # generating: its prompt is in the KV cache
    before = engine.stats()
    asked = engine.submit(GenerationRequest(question, sampling=GREEDY, max_tokens=12, ignore_eos=True))
    await asked.collect()
    prefilled = engine.stats().prefill_tokens_total - before.prefill_tokens_total
    await running.collect()
    return asked, prefilled


async def asked_alone(question: list[int]) -> Generation:
    """The same question in a fresh engine without a prompt cache: nothing to borrow."""
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=4, cache_ram=0)) as fresh:
        alone = fresh.submit(GenerationRequest(question, sampling=GREEDY, max_tokens=12, ignore_eos=True))
        await alone.collect()
    return alone


async def test_a_prompt_starting_with_what_a_running_request_holds_borrows_those_cells(engine: Engine) -> None:
    """A new conversation behind the same system prompt as a running one prefills only its own part."""
    system = engine.tokenize(SYSTEM)
    first, question = system + engine.tokenize(" Tom went"), system + engine.tokenize(" Lily saw a cat")
    shared = shared_prefix(first, question)
    assert shared >= len(system)

    borrowed, prefilled = await ask_beside(engine, first, question)

    assert borrowed.usage.cached_tokens == shared
    assert prefilled == len(question) - shared
    alone = await asked_alone(question)
    assert alone.usage.cached_tokens == 0
    assert borrowed.token_ids == alone.token_ids


async def test_a_question_sharing_only_its_first_words_with_a_running_one_borrows_them(engine: Engine) -> None:
    """A burst of short questions that start alike (the streaming bench's "Once upon a time N")
    prefills only what differs: the first few tokens are borrowed too, not just a long system prompt."""
    first, question = engine.tokenize("Once upon a time 12"), engine.tokenize("Once upon a time 37")
    shared = shared_prefix(first, question)
    assert 1 < shared < 8

    borrowed, prefilled = await ask_beside(engine, first, question)

    assert borrowed.usage.cached_tokens == shared
    assert prefilled == len(question) - shared
    assert borrowed.token_ids == (await asked_alone(question)).token_ids


async def test_with_a_kv_cache_per_slot_nothing_is_borrowed() -> None:
    """llama.cpp copies only whole sequences across per-slot streams: the prefix is prefilled again."""
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2, kv_per_slot=True, cache_ram=0)) as engine:
        system = engine.tokenize(SYSTEM)
        running = engine.submit(GenerationRequest(system + engine.tokenize(" Tom went"), sampling=GREEDY, max_tokens=40, ignore_eos=True))
        await running.__anext__()
        other = engine.submit(GenerationRequest(system + engine.tokenize(" Lily saw a cat"), sampling=GREEDY, max_tokens=4, ignore_eos=True))
        await other.collect()
        await running.collect()
    assert other.usage.cached_tokens == 0


async def test_the_borrowed_cells_outlive_the_lender_whose_slot_goes_to_someone_else() -> None:
    async def first_token_then_rest(generation: Generation) -> float:
        await generation.__anext__()
        first = asyncio.get_running_loop().time()
        await generation.collect()
        return first

    async def finish_time(generation: Generation) -> float:
        await generation.collect()
        return asyncio.get_running_loop().time()

    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=1024, parallel=4)) as engine:
        system = engine.tokenize(SYSTEM)
        lender = engine.submit(GenerationRequest(system + engine.tokenize(" Tom went"), sampling=GREEDY, max_tokens=100, ignore_eos=True))
        await lender.__anext__()  # generating, with 99 tokens to go: its slot is busy when the borrower comes
        question = system + engine.tokenize(" Lily saw a cat")
        borrower = engine.submit(GenerationRequest(question, sampling=GREEDY, max_tokens=400, ignore_eos=True))
        borrowing = asyncio.create_task(finish_time(borrower))
        await lender.collect()
        others = [  # they take the lender's slot and the idle ones while the borrower still generates
            engine.submit(GenerationRequest(engine.tokenize(text), sampling=GREEDY, max_tokens=4, ignore_eos=True))
            for text in ("A big red ball rolled down the hill.", "The sun was hot and the sea was blue.", "Ben had a toy car.")
        ]
        firsts = await asyncio.gather(*(first_token_then_rest(other) for other in others))
        finished = await borrowing
    assert borrower.usage.cached_tokens >= len(system)
    assert min(firsts) < finished, "the others ran while the borrower generated"
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=1024, parallel=4, cache_ram=0)) as fresh:
        alone = fresh.submit(GenerationRequest(question, sampling=GREEDY, max_tokens=400, ignore_eos=True))
        await alone.collect()
    assert borrower.token_ids == alone.token_ids


async def test_conversations_behind_one_system_prompt_share_its_cells_in_a_small_cache() -> None:
    """Three conversations behind a long system prompt run side by side in a cache that holds the
    system prompt three times over only just: its cells are there once, and the requests that
    borrow them are admitted at once instead of waiting for the first to end."""
    finished: list[str] = []

    async def run(name: str, generation: Generation) -> None:
        await generation.collect()
        finished.append(name)

    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=3, cache_ram=0)) as engine:
        system = engine.tokenize(SYSTEM + " They like to play games in the garden with their friends all day.")
        assert 3 * len(system) + 4 * 32 > 256  # counted once per slot, the second would not fit beside the first
        first = engine.submit(GenerationRequest(system + engine.tokenize(" Tom went"), sampling=GREEDY, max_tokens=80, ignore_eos=True))
        await first.__anext__()  # generating: the system prompt's cells are in the cache
        running = asyncio.create_task(run("first", first))
        others = [
            engine.submit(GenerationRequest(system + engine.tokenize(text), sampling=GREEDY, max_tokens=8, ignore_eos=True))
            for text in (" Lily saw a cat", " Ben had a toy")
        ]
        await asyncio.gather(*(run(f"other {i}", other) for i, other in enumerate(others)))
        await running
        assert engine.stats().preemptions_total == 0
    assert finished[-1] == "first", "the other conversations ran beside the first"
    assert all(other.usage.cached_tokens >= len(system) for other in others)


async def test_a_held_prefix_whose_oldest_cells_are_gone_is_prefilled_again() -> None:
    """A sliding-window model's cache may overwrite cells that left every window; llama.cpp then
    drops that sequence's oldest positions. Removing them here stands in for that."""
    options = EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=1, max_queue=2, cache_ram=0, threads=1)
    with Engine.load(options) as engine, Engine.load(options) as fresh:
        prompt = engine.tokenize(PROMPT)
        first = engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=12, ignore_eos=True))
        await first.collect()
        follow_up = prompt + first.token_ids[:-1] + engine.tokenize(" The end")[1:]
        memory = llama_cpp.llama_get_memory(engine._context.ctx)  # the engine is idle: no step runs now
        llama_cpp.llama_memory_seq_rm(memory, 0, 0, 10)

        again = engine.submit(GenerationRequest(follow_up, sampling=GREEDY, max_tokens=12, ignore_eos=True))
        alone = fresh.submit(GenerationRequest(follow_up, sampling=GREEDY, max_tokens=12, ignore_eos=True))
        assert await again.collect() == await alone.collect()
    assert again.usage.cached_tokens == 0


async def test_a_sliding_window_model_reuses_a_held_prefix_while_its_last_window_is_there(tmp_path: Path) -> None:
    model = write_swa_model(tmp_path)
    options = EngineOptions(model_path=model, n_ctx=512, parallel=1, max_queue=2, cache_ram=0, threads=1)
    with Engine.load(options) as engine, Engine.load(options) as fresh:
        prompt = engine.tokenize(PROMPT)
        first = engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=12, ignore_eos=True))
        await first.collect()
        held = len(prompt) + 11
        memory = llama_cpp.llama_get_memory(engine._context.ctx)  # the engine is idle: no step runs now
        llama_cpp.llama_memory_seq_rm(memory, 0, 0, held - SWA_WINDOW - 4)  # gone: all but the last window and a bit

        results = []
        for kept in (held, held - 8):  # the whole held sequence, then one cut 8 tokens earlier (its window is gone)
            follow_up = prompt + first.token_ids[: kept - len(prompt)] + engine.tokenize(" The end")[1:]
            again = engine.submit(GenerationRequest(follow_up, sampling=GREEDY, max_tokens=12, ignore_eos=True))
            alone = fresh.submit(GenerationRequest(follow_up, sampling=GREEDY, max_tokens=12, ignore_eos=True))
            results.append((await again.collect() == await alone.collect(), again.usage.cached_tokens))
    assert results == [(True, held), (True, 0)]


async def test_a_conversation_restored_from_the_prompt_cache_shares_the_system_prompt_a_running_one_holds() -> None:
    """Turn two of a chat comes back from the host prompt cache while another chat behind the same
    system prompt is generating. The restored copy's system prompt is swapped for the running
    chat's cells, so the two fit the small cache side by side, as admission counted them: with a
    private copy the cache overflowed as the running chat grew, and the newer one was paused."""
    finished: list[str] = []

    async def run(name: str, generation: Generation) -> None:
        await generation.collect()
        finished.append(name)

    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=3)) as engine:
        system = engine.tokenize(" ".join([SYSTEM] * 3))
        first_turn = system + engine.tokenize(" Tom went")
        turn = engine.submit(GenerationRequest(first_turn, sampling=GREEDY, max_tokens=40, ignore_eos=True))
        await turn.collect()
        other_prompt = system + engine.tokenize(" Lily saw a cat")
        other = engine.submit(GenerationRequest(other_prompt, sampling=GREEDY, max_tokens=200, ignore_eos=True))
        await other.__anext__()  # generating in the first chat's slot, whose answer went to the host prompt cache
        running = asyncio.create_task(run("other", other))
        second_turn = first_turn + turn.token_ids + engine.tokenize(" and then")
        assert len(other_prompt) + 200 + len(second_turn) - len(system) + 60 <= 512  # sharing, both fit to the end
        assert len(other_prompt) + len(second_turn) + 2 * 50 > 512  # a private copy: full 50 tokens into the turn
        again = engine.submit(GenerationRequest(second_turn, sampling=GREEDY, max_tokens=60, ignore_eos=True))
        await run("second turn", again)
        await running
        stats = engine.stats()
    assert again.usage.cached_tokens > len(first_turn), "restored from the host prompt cache"
    assert stats.preemptions_total == 0
    assert finished == ["second turn", "other"]
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=3, cache_ram=0)) as fresh:
        alone = fresh.submit(GenerationRequest(second_turn, sampling=GREEDY, max_tokens=60, ignore_eos=True))
        await alone.collect()
    assert again.token_ids == alone.token_ids
