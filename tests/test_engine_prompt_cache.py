"""The host-RAM prompt cache: a conversation whose slot was taken over gets its KV back, exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.engine.prompt_cache import MIB, PromptCache, default_budget_mib

GREEDY = SamplingParams(temperature=0)
STORY = (
    "Once upon a time, in a small house by the sea, there lived a kind old man and his cat. Every morning "
    "the cat sat by the window and watched the boats. One day a big storm came and the boats did not come "
    "back. The old man was sad, but the cat knew what to do. She ran down to the water and looked far away."
)


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
