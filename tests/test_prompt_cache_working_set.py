"""The host prompt cache keeps what its restores reach, not its whole budget (``working_set.py``).

Chats come back within a few saves; one-off prompts and ended chats never do. The cache learns how
deep its restores reach, keeps twice that, and grows back when it dropped something wanted.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine import prompt_cache
from vramsupply.engine.cache_entries import PromptCache
from vramsupply.engine.working_set import MARGIN, MIN_SEEN

TOKENS = 40
KV = 1000
"""Bytes of each test entry's state: 40 tokens of 25 bytes."""
TOKEN_BYTES = TOKENS * 4


def prompt(n: int) -> np.ndarray:
    """A conversation's tokens: no two share a prefix."""
    return np.arange(n * 100, n * 100 + TOKENS, dtype=np.int32)


def save(cache: PromptCache, n: int) -> None:
    assert cache.put(prompt(n), np.zeros(KV, dtype=np.uint8))


def chats_coming_back_after_two_other_saves(cache: PromptCache, turns: int) -> int:
    """Conversation n is saved, two others are, then n comes back: each restore reaches 3 entries."""
    for n in range(turns):
        save(cache, 3 * n)
        save(cache, 3 * n + 1)
        save(cache, 3 * n + 2)
        key, _ = cache.best(prompt(3 * n))
        cache.take(key)
    return 3 * n + 2


def test_without_a_context_size_the_budget_alone_bounds_the_cache_until_enough_restores_are_seen() -> None:
    cache = PromptCache(budget=10**9)
    chats_coming_back_after_two_other_saves(cache, MIN_SEEN - 1)
    assert len(cache) == 2 * (MIN_SEEN - 1)  # nothing dropped: every one-off kept
    assert cache.bound == 10**9


def test_from_the_first_save_the_cache_keeps_to_the_kv_of_the_context_and_a_miss_grows_it() -> None:
    """Before, the budget alone bounded the cache until its eighth restore: on an 8-minute trace it
    grew to twice the bound it then learned, and that was the server's peak RSS."""
    cache = PromptCache(budget=10**9, floor_tokens=400)  # 400 tokens of 25 bytes: 10 entries' KV
    chats_coming_back_after_two_other_saves(cache, MIN_SEEN - 1)
    assert cache.bound == 10 * KV and cache.nbytes <= cache.bound < 2 * (MIN_SEEN - 1) * (KV + TOKEN_BYTES)
    cache.admitted(prompt(1), served=0)  # an early one-off comes back after all: a miss the floor caused
    assert cache.bound == MARGIN * 10 * KV
    small_context = PromptCache(budget=10**9, floor_tokens=40, least_bytes=10 * KV)
    chats_coming_back_after_two_other_saves(small_context, 2)
    assert small_context.bound == 10 * KV  # never below least_bytes, however small the context


def test_once_restores_are_seen_the_cache_keeps_twice_their_deepest_reach() -> None:
    cache = PromptCache(budget=10**9)
    last = chats_coming_back_after_two_other_saves(cache, MIN_SEEN + 4)
    reach = 3 * (KV + TOKEN_BYTES)
    assert cache.bound == MARGIN * reach
    assert cache.nbytes <= cache.bound and len(cache) == MARGIN * 3 - 1  # the newest entries, up to the bound
    assert cache.best(prompt(last))[1] == TOKENS and cache.best(prompt(1)) is None  # the one-offs of long ago went


def test_the_bound_never_drops_below_the_kv_of_the_context() -> None:
    cache = PromptCache(budget=10**9, floor_tokens=400)  # 400 tokens of 25 bytes: 10 entries' KV
    chats_coming_back_after_two_other_saves(cache, MIN_SEEN + 4)
    assert cache.bound == 10 * KV
    assert len(cache) == 7  # 8 entries with their token lists fit, and the last turn took one


def test_a_prompt_that_a_dropped_entry_would_have_served_grows_the_bound_back() -> None:
    cache = PromptCache(budget=10**9)
    chats_coming_back_after_two_other_saves(cache, MIN_SEEN + 4)
    tight = cache.bound
    cache.admitted(prompt(1), served=0)  # an early one-off comes back after all: a miss the bound caused
    assert cache.bound == MARGIN * tight
    cache.admitted(prompt(1), served=0)  # its ghost is used up: one miss counts once
    assert cache.bound == MARGIN * tight
    cache.admitted(prompt(4), served=TOKENS)  # what it got was all the dropped entry had: no miss
    assert cache.bound == MARGIN * tight


def test_a_restore_for_a_prefix_that_newer_entries_share_reaches_only_to_the_newest() -> None:
    """Any entry that starts with the shared tokens would have served: only the newest had to be kept."""
    cache = PromptCache(budget=10**9)
    system = np.arange(1000, 1000 + TOKENS, dtype=np.int32)
    chats = [np.concatenate([system, prompt(n)]) for n in range(4)]
    for tokens in chats:
        assert cache.put(tokens, np.zeros(KV, dtype=np.uint8))
    cache.take(cache.best(chats[0])[0], shared=TOKENS)
    assert list(cache.working._reaches) == [KV + 2 * TOKENS * 4]  # the newest chat's bytes alone
    cache.take(cache.best(chats[1])[0])
    assert list(cache.working._reaches)[-1] == 3 * (KV + 2 * TOKENS * 4)  # itself and the two after it


def test_the_budget_still_caps_the_bound() -> None:
    cache = PromptCache(budget=4 * (KV + TOKEN_BYTES))
    chats_coming_back_after_two_other_saves(cache, MIN_SEEN + 4)
    assert MARGIN * 3 * (KV + TOKEN_BYTES) > cache.budget
    assert cache.bound == cache.budget and cache.nbytes <= cache.budget


GREEDY = SamplingParams(temperature=0)
LINES = ["Tom had a red ball.", "Lily saw a big dog.", "Ben ran to the park.", "Sue ate a green apple.",
         "Max found a small box.", "Anna sang a happy song.", "Tim lost his blue hat.", "Mia drew a yellow sun."]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """The tiny model's conversations hold a few KB of KV each, far under the 32 MiB the cache
    keeps before any evidence (``LEAST_KEPT_BYTES``): without it, so that what restores reach
    bounds the cache, as on a model whose context holds more."""
    options = EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, max_queue=4, cache_ram=64, threads=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prompt_cache, "LEAST_KEPT_BYTES", 0)
        with Engine.load(options) as engine:
            yield engine


async def ask(engine: Engine, text: str) -> int:
    generation = engine.submit(GenerationRequest(engine.tokenize(text), sampling=GREEDY, max_tokens=8, ignore_eos=True))
    await generation.collect()
    return generation.usage.cached_tokens


async def test_two_chats_keep_coming_back_while_one_off_stories_pass_through(engine: Engine) -> None:
    """One slot, two chats that take turns, and a one-off story between every two turns: every
    turn gets its history back from the cache, and the cache keeps to what those restores reach,
    far below its 64 MiB budget."""
    chats = ["Once upon a time Tom and Lily went out to play in the big green park by the river with their dog.",
             "Once there was a little cat that liked to nap in the warm sun on the roof of the old red house."]
    asked = ["", ""]
    for turn in range(MIN_SEEN + 4):
        for c in (0, 1):
            cached = await ask(engine, chats[c])
            assert cached >= len(engine.tokenize(asked[c])) - 2, "the history came back from the cache"
            asked[c] = chats[c]
            chats[c] += " " + LINES[(turn + c) % len(LINES)]
        await ask(engine, f"Story {turn}: " + " ".join(LINES[turn % 4:]))  # never asked again
    stats = engine.stats()
    assert stats.prompt_cache_entries <= 4  # the chats and at most two stories: unbounded, all 12 stories stayed
    assert 0 < stats.prompt_cache_bytes <= stats.prompt_cache_bound_bytes < 1024 * 1024
