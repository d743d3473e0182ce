"""The host-RAM prompt cache: a conversation whose slot was taken over gets its KV back, exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.engine.cache_entries import Base, PromptCache, common_prefix
from vramsupply.engine.prompt_cache import MIB, budget_mib, default_budget_mib, worth_restoring

GREEDY = SamplingParams(temperature=0)
STORY = (
    "Once upon a time, in a small house by the sea, there lived a kind old man and his cat. Every morning "
    "the cat sat by the window and watched the boats. One day a big storm came and the boats did not come "
    "back. The old man was sad, but the cat knew what to do. She ran down to the water and looked far away."
)


SYSTEM = "You are a friendly storyteller for small children. Use short words and happy endings. " * 5


def chat(i: int) -> str:
    """Conversations behind one long system prompt, as on a marketplace endpoint."""
    return f"{SYSTEM}{story(i)[:120]}"


def story(i: int) -> str:
    """Prompts that differ from their second word on, so no two share a useful prefix."""
    names = ["Tom", "Lily", "Ben", "Sue", "Max", "Anna", "Tim", "Mia", "Sam", "Zoe", "Leo", "Amy", "Jack", "Ella"]
    return f"{names[i]} said: {STORY} {STORY}"


def load(cache_ram: int, parallel: int = 1) -> Engine:
    return Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=parallel, max_queue=4, cache_ram=cache_ram, threads=1))


@pytest.fixture(scope="module")
def cached() -> Iterator[Engine]:
    with load(cache_ram=1) as engine:
        yield engine


@pytest.fixture(scope="module")
def uncached() -> Iterator[Engine]:
    with load(cache_ram=0) as engine:
        yield engine


async def run(engine: Engine, text: str) -> Generation:
    generation = engine.submit(GenerationRequest(engine.tokenize(text), sampling=GREEDY, max_tokens=12, ignore_eos=True))
    await generation.collect()
    return generation


async def test_a_conversation_evicted_from_its_slot_is_restored_with_identical_output(cached: Engine, uncached: Engine) -> None:
    prompt = cached.tokenize(story(0))
    first = await run(cached, story(0))
    await run(cached, story(1))  # takes the only slot: story 0's KV goes to host RAM
    assert cached.stats().prompt_cache_entries >= 1

    again = await run(cached, story(0))
    assert again.usage.cached_tokens == len(prompt) - 1  # everything but the last prompt token
    assert again.token_ids == first.token_ids

    # The same turns without the cache recompute everything and produce the same tokens.
    plain = [await run(uncached, story(0)), await run(uncached, story(1)), await run(uncached, story(0))]
    assert plain[2].usage.cached_tokens < 8
    assert plain[2].token_ids == first.token_ids
    assert uncached.stats().prompt_cache_entries == 0


async def test_a_longer_turn_of_the_conversation_reuses_the_cached_history(cached: Engine, uncached: Engine) -> None:
    first = await run(cached, story(2))
    await run(cached, story(3))
    follow_up = story(2) + cached.detokenize(first.token_ids) + " The cat was happy."
    continued = await run(cached, follow_up)
    assert continued.usage.cached_tokens >= len(cached.tokenize(story(2)))
    assert continued.token_ids == (await run(uncached, follow_up)).token_ids


async def test_a_short_question_gets_back_the_words_it_shares_with_a_saved_answer(cached: Engine, uncached: Engine) -> None:
    opening = "Max said: Once upon a time, in a small house by the sea, there lived a kind old man"
    question = "Max said: Once upon a time, a dog"
    saved = await run(cached, opening)
    assert len(saved.token_ids) + len(cached.tokenize(opening)) >= 32  # long enough to be saved
    await run(cached, story(6))  # takes the only slot: the opening and its answer go to host RAM
    shared = common_prefix(np.array(cached.tokenize(question)), np.array(cached.tokenize(opening)))
    assert 1 < shared < 16  # a few words: before, a restore had to spare 16 tokens of prefill

    again = await run(cached, question)

    assert again.usage.cached_tokens == shared
    assert again.token_ids == (await run(uncached, question)).token_ids


def test_a_restore_must_spare_a_token_per_64_it_copies() -> None:
    assert worth_restoring(entry_tokens=130, gained=3)
    assert not worth_restoring(entry_tokens=130, gained=2)
    assert not worth_restoring(entry_tokens=2000, gained=16) and worth_restoring(entry_tokens=2000, gained=32)
    assert not worth_restoring(entry_tokens=10, gained=0)


async def test_the_cache_stays_under_its_budget_and_drops_the_oldest_first(cached: Engine) -> None:
    for i in range(4, 14):
        await run(cached, story(i))
        assert cached.stats().prompt_cache_bytes <= 1 * MIB
    stats = cached.stats()
    # Each entry is ~0.2 MiB on this model (~300 tokens), so 1 MiB holds a handful, not all ten.
    assert 2 <= stats.prompt_cache_entries < 10
    recent, oldest = await run(cached, story(12)), await run(cached, story(4))
    assert recent.usage.cached_tokens > 100
    assert oldest.usage.cached_tokens < 8


async def test_conversations_behind_one_system_prompt_store_it_once_and_come_back_exactly(uncached: Engine) -> None:
    with load(cache_ram=4) as engine:
        shared = len(engine.tokenize(SYSTEM))
        assert shared > 3 * (len(engine.tokenize(chat(0))) - shared)  # mostly system prompt

        answers = [await run(engine, chat(0)), await run(engine, chat(1))]  # the only slot: chat 0 is saved whole
        whole = engine.stats().prompt_cache_bytes
        answers.append(await run(engine, chat(2)))  # chat 1 saved: the system prompt once, then its own part
        with_base = engine.stats().prompt_cache_bytes
        answers.append(await run(engine, chat(3)))  # chat 2 saved: only its own part
        assert engine.stats().prompt_cache_entries == 3
        assert engine.stats().prompt_cache_bytes - with_base < whole / 3  # kept whole, it would add ~whole

        for i in (1, 2, 0):  # after the shared prefix, before it, and the entry saved whole
            again = await run(engine, chat(i))
            assert again.usage.cached_tokens == len(engine.tokenize(chat(i))) - 1
            assert again.token_ids == answers[i].token_ids == (await run(uncached, chat(i))).token_ids

        follow_up = chat(2) + engine.detokenize(answers[2].token_ids) + " The end."
        await run(engine, chat(1))  # chat 2's slot goes to chat 1 again: chat 2 goes back to the cache
        continued = await run(engine, follow_up)
        assert continued.usage.cached_tokens >= len(engine.tokenize(chat(2)))
        assert continued.token_ids == (await run(uncached, follow_up)).token_ids


async def test_a_new_chat_gets_the_system_prompt_back_and_every_saved_chat_stays(uncached: Engine) -> None:
    """A new conversation shares only the system prompt with the saved ones: it gets that prefix
    copied back, and no saved conversation is thrown away for it (before, the oldest was taken)."""
    with load(cache_ram=4) as engine:
        for i in range(3):
            await run(engine, chat(i))
        await run(engine, story(5))  # the only slot: a story without the system prompt; chat 2 is saved
        saved = engine.stats().prompt_cache_entries

        new = await run(engine, chat(4))  # the story is saved; only the system prompt comes back

        assert new.usage.cached_tokens == common_prefix(np.array(engine.tokenize(chat(4))), np.array(engine.tokenize(chat(0))))
        assert new.token_ids == (await run(uncached, chat(4))).token_ids
        assert engine.stats().prompt_cache_entries == saved + 1
        for i in range(3):
            again = await run(engine, chat(i))
            assert again.usage.cached_tokens == len(engine.tokenize(chat(i))) - 1


def test_a_shared_prefix_is_counted_once_and_lives_while_an_entry_uses_it() -> None:
    cache = PromptCache(budget=2100)
    base = Base(np.arange(100, dtype=np.int32), np.zeros(600, dtype=np.uint8))  # 1000 bytes
    own = [np.concatenate([base.tokens, np.arange(start, start + 10, dtype=np.int32)]) for start in (500, 600, 700)]
    for tokens in own[:2]:
        assert cache.put(tokens, np.zeros(60, dtype=np.uint8), base)
    assert cache.nbytes == base.nbytes + 2 * (60 + 110 * 4)  # the base once; each entry its own KV and tokens
    assert cache.bases == 1
    assert cache.base_for(own[2]) is base and cache.base_for(base.tokens) is None

    assert cache.put(own[2], np.zeros(60, dtype=np.uint8), base)  # over budget: the oldest goes, the base stays
    assert cache.best(own[0])[1] == 100 and len(cache) == 2 and cache.nbytes == 2000

    for tokens in own[1:]:
        entry = cache.take(cache.best(tokens)[0])
        assert entry.base is base and np.array_equal(entry.tokens, tokens)
    assert len(cache) == 0 and cache.bases == 0 and cache.nbytes == 0


def test_entries_are_evicted_least_recent_first_and_a_prefix_of_a_newer_one_is_dropped() -> None:
    cache = PromptCache(budget=1100)
    state = np.zeros(300, dtype=np.uint8)
    tokens = {name: np.arange(start, start + 10, dtype=np.int32) for name, start in (("a", 0), ("b", 100), ("c", 200))}
    for name in "abc":
        assert cache.put(tokens[name], state.copy())
    assert len(cache) == 3 and cache.nbytes == 3 * (300 + 40)

    cache.put(np.arange(300, 310, dtype=np.int32), state.copy())  # over budget: "a" goes
    assert cache.best(tokens["a"]) is None
    assert cache.best(tokens["b"])[1] == 10
    assert cache.nbytes <= 1100

    longer_b = np.concatenate([tokens["b"], np.arange(5, dtype=np.int32)])
    cache.put(longer_b, state.copy())
    key, shared = cache.best(tokens["b"])
    assert shared == 10 and len(cache.take(key).tokens) == 15  # the shorter "b" was dropped, not kept twice
    assert cache.best(tokens["b"]) is None


def test_an_entry_larger_than_the_whole_budget_is_not_kept() -> None:
    cache = PromptCache(budget=100)
    assert not cache.put(np.arange(4, dtype=np.int32), np.zeros(200, dtype=np.uint8))
    assert len(cache) == 0 and cache.nbytes == 0


def test_the_default_budget_is_a_quarter_of_available_memory_capped_at_8_gib(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 4096000 kB\n")
    assert default_budget_mib(meminfo) == 1000
    meminfo.write_text("MemTotal: 512000000 kB\nMemAvailable: 409600000 kB\n")
    assert default_budget_mib(meminfo) == 8192


def test_a_cache_ram_above_the_memory_available_is_kept_but_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16000000 kB\nMemAvailable: 4096000 kB\n")  # 4000 MiB
    no_proc = tmp_path / "no-proc"
    assert budget_mib(3000, meminfo, no_proc) == 3000 and not caplog.records
    assert budget_mib(100_000_000, meminfo, no_proc) == 100_000_000  # the provider's choice, yet silent before
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "more than the 4000 MiB" in caplog.records[0].getMessage()
