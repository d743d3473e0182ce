"""Prompt-lookup speculative decoding: fewer decode steps, never different tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.engine.speculative import PAUSE_STEPS, DraftState, default_draft_max, lookup

GREEDY = SamplingParams(temperature=0)
# Input-grounded: the continuation keeps quoting the prompt, so drafts from it get accepted.
QUOTING = "Tom said: the big red ball is mine. Lily said: the big red ball is mine. Tom said: the big"
PLAIN = "Once upon a time"


def load(draft_max: int) -> Engine:
    return Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=2, cache_ram=0, draft_max=draft_max, threads=1))


@pytest.fixture(scope="module")
def drafting() -> Iterator[Engine]:
    with load(draft_max=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def plain() -> Iterator[Engine]:
    with load(draft_max=0) as engine:
        yield engine


async def run(engine: Engine, text: str, **request: object) -> Generation:
    generation = engine.submit(GenerationRequest(engine.tokenize(text), **request))
    await generation.collect()
    return generation


@pytest.mark.parametrize("text", [QUOTING, PLAIN])
async def test_greedy_output_is_token_identical_with_and_without_drafts(drafting: Engine, plain: Engine, text: str) -> None:
    before = drafting.stats()
    with_drafts = await run(drafting, text, sampling=GREEDY, max_tokens=120)
    without = await run(plain, text, sampling=GREEDY, max_tokens=120)
    assert with_drafts.token_ids == without.token_ids
    assert with_drafts.usage == without.usage
    after = drafting.stats()
    assert after.draft_tokens_total > before.draft_tokens_total  # drafts really were verified
    if text == QUOTING:
        assert after.draft_accepted_total - before.draft_accepted_total >= 20
    assert after.completion_tokens_total - before.completion_tokens_total == 120
    assert plain.stats().draft_tokens_total == 0


async def test_seeded_sampling_draws_the_same_tokens_with_drafts(drafting: Engine, plain: Engine) -> None:
    seeded = SamplingParams(temperature=0.8, seed=42, top_k=0, top_p=1.0, min_p=0.0)
    with_drafts = await run(drafting, QUOTING, sampling=seeded, max_tokens=80)
    without = await run(plain, QUOTING, sampling=seeded, max_tokens=80)
    assert with_drafts.token_ids == without.token_ids


@pytest.mark.parametrize("max_tokens", [3, 7, 33])
async def test_max_tokens_and_stop_strings_end_inside_an_accepted_draft(drafting: Engine, plain: Engine, max_tokens: int) -> None:
    with_drafts = await run(drafting, QUOTING, sampling=GREEDY, max_tokens=max_tokens)
    without = await run(plain, QUOTING, sampling=GREEDY, max_tokens=max_tokens)
    assert with_drafts.token_ids == without.token_ids and len(with_drafts.token_ids) == max_tokens
    assert with_drafts.finish_reason == "length"

    reference = await run(plain, QUOTING, sampling=GREEDY, max_tokens=60)
    text = plain.detokenize(reference.token_ids)
    stop = text[25:31]
    stopped = drafting.submit(GenerationRequest(drafting.tokenize(QUOTING), sampling=GREEDY, max_tokens=60, stop=[stop]))
    assert await stopped.collect() == text[: text.index(stop)]
    assert stopped.finish_reason == "stop"
    # The slot's KV was trimmed to what was accepted: the same prompt again reuses it and agrees.
    again = await run(drafting, QUOTING, sampling=GREEDY, max_tokens=60)
    assert again.token_ids == reference.token_ids


async def test_no_drafts_while_another_request_is_running(drafting: Engine) -> None:
    before = drafting.stats()
    both = await asyncio.gather(
        run(drafting, QUOTING, sampling=GREEDY, max_tokens=40, ignore_eos=True),
        run(drafting, PLAIN, sampling=GREEDY, max_tokens=40, ignore_eos=True),
    )
    assert all(len(g.token_ids) == 40 for g in both)
    # Drafting may only happen in the last steps, once one of the two has finished.
    drafted = drafting.stats().draft_tokens_total - before.draft_tokens_total
    assert drafted <= 8 * 40 // 2


def test_lookup_continues_the_latest_earlier_occurrence_of_the_tail() -> None:
    history = np.array([5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7], dtype=np.int32)
    assert lookup(history, 4).tolist() == [2, 3, 5, 6]  # after the latest earlier "5 6 7"
    assert lookup(history, 1).tolist() == [2]
    assert lookup(np.array([1, 2, 3, 4], dtype=np.int32), 4).tolist() == []
    assert lookup(history, 0).tolist() == []
    # A 2-token tail is enough when no 3-token one matches.
    assert lookup(np.array([4, 1, 2, 8, 9, 3, 1, 2], dtype=np.int32), 3).tolist() == [8, 9, 3]


def test_draft_length_grows_on_success_and_pauses_after_misses() -> None:
    state = DraftState(max_draft=8)
    assert state.wanted() == 2
    state.update(drafted=2, accepted=2)
    state.update(drafted=4, accepted=4)
    assert state.wanted() == 8
    state.update(drafted=8, accepted=3)  # partly right: keep going
    assert state.wanted() == 8
    for drafted in (8, 4, 2, 1):
        state.update(drafted=drafted, accepted=0)
    assert [state.wanted() for _ in range(PAUSE_STEPS)] == [0] * PAUSE_STEPS
    assert state.wanted() == 1


def test_drafting_is_off_unless_asked_for_on_a_cpu_and_on_a_gpu_alike() -> None:
    assert default_draft_max(EngineOptions(model_path=TINY_MODEL, n_gpu_layers=0)) == 0
    assert default_draft_max(EngineOptions(model_path=TINY_MODEL, n_gpu_layers=-1)) == 0  # every layer offloaded
    assert default_draft_max(EngineOptions(model_path=TINY_MODEL, draft_max=5)) == 5
    assert default_draft_max(EngineOptions(model_path=TINY_MODEL, draft_max=5), copies_prefixes=False) == 0  # recurrent
