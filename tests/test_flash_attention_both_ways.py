"""The KV copies that flash attention changes, run with it on and off: restores, shared prefixes, pauses.

Without flash attention llama.cpp stores V transposed: saving a sequence to host memory and
putting it back (``prompt_cache.py``) copies V one element row per run of cells, where a sequence
decoded beside others has a run per token, and a restore may land on cells scattered among another
sequence's. ``auto`` turns it off on an Intel CPU with AMX and leaves it on elsewhere
(``gpu/options.py``), so every other test checks only the mode its machine picks. Here each one
is pinned, both ways. The engine's own code differs only in ``model.tiled_cpu_attention``: with it
on, a step of 64 rows or more decodes its streams' and prompt rows apart and may pad a prompt to a
whole tile (``pacing.py``); with it off, neither.

Like with like: without flash attention the attention sums run over every cell in view, so a
sequence whose cells lie elsewhere rounds differently in the last bits, and a greedy answer may
take the other of two near-tied tokens. So each restore is read back bit for bit where it happens,
logprobs are compared exactly only where both sides decode the same batches into the same cells,
and elsewhere answers agree up to the first near-tie, their logprobs within 0.05 until then. The
tiny model hardly notices a cell lost deep in its context (logprobs move by 0.001-0.04), so only
the exact comparisons catch a copy that is slightly wrong.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from conftest import TINY_MODEL, scheduler_held
from test_engine_kv import same_until_a_near_tie
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams
from vramsupply.engine import prompt_cache, scheduler
from vramsupply.engine.seq_state import save_state

BOTH_WAYS = pytest.mark.parametrize("flash", ["on", "off"])
GREEDY = SamplingParams(temperature=0)
PAUSED = ["Once upon a time", "The dog", "Lily and Tom went to the park", "Tim had a red ball. He"]
SAID = " Then it rained."
SYSTEM = "You are a kind story teller. You tell short stories about children, their pets and the sea, in simple words. They end well."


def load(flash: str, **options: object) -> Engine:
    settings = {"n_ctx": 512, "parallel": 2, "max_queue": 8, "cache_ram": 0, "threads": 1, **options}
    return Engine.load(EngineOptions(model_path=TINY_MODEL, flash_attention=flash, **settings))  # type: ignore[arg-type]


async def ask(engine: Engine, prompt: list[int], max_tokens: int = 16, **request: object) -> Generation:
    generation = engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=max_tokens, ignore_eos=True, **request))  # type: ignore[arg-type]
    await generation.collect()
    return generation


def next_turn(engine: Engine, prompt: list[int], answer: Generation, said: str) -> list[int]:
    return prompt + answer.token_ids + engine.tokenize(said)[1:]  # (no second BOS)


@pytest.fixture
def restores(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each copy put back from host memory, read out again at once: True where llama.cpp holds it
    bit for bit (``prompt_cache.restore_sequence``; it runs on the scheduler thread, between steps)."""
    exact: list[bool] = []
    saved_from: dict[int, int] = {}
    save, restore = prompt_cache.save_sequence, prompt_cache.restore_sequence

    def noting_whose(ctx: object, seq_id: int) -> np.ndarray | None:
        state = save(ctx, seq_id)
        if state is not None:
            saved_from[id(state)] = seq_id
        return state

    def read_back(ctx: object, memory: object, seq_id: int, state: np.ndarray) -> bool:
        restored = restore(ctx, memory, seq_id, state)
        if restored:
            exact.append(same_but_the_sequence(state, save_state(ctx, seq_id), saved_from[id(state)], seq_id))
        return restored

    monkeypatch.setattr(prompt_cache, "save_sequence", noting_whose)
    monkeypatch.setattr(prompt_cache, "restore_sequence", read_back)
    return exact


def same_but_the_sequence(saved: np.ndarray, read: np.ndarray | None, source: int, dest: int) -> bool:
    """Whether ``read`` is ``saved`` put back under sequence ``dest``: llama.cpp writes the id of
    the sequence a copy came from into it (in its header and each cell's), and only those 32-bit
    words may differ, from ``source`` to ``dest``. A misplaced V row differs anywhere else."""
    if read is None or read.nbytes != saved.nbytes:
        return False
    words = saved.nbytes // 4 * 4
    before, after = saved[:words].view(np.int32), read[:words].view(np.int32)
    renamed = (before == after) | ((before == source) & (after == dest))
    return bool(renamed.all()) and np.array_equal(saved[words:], read[words:])


@BOTH_WAYS
def test_the_context_runs_with_flash_attention_as_pinned(caplog: pytest.LogCaptureFixture, flash: str) -> None:
    """The premise of every test below: the mode asked for, not the machine's ``auto``."""
    with caplog.at_level(logging.DEBUG, logger="vramsupply.llama"), load(flash):
        pass
    settings = [r.getMessage() for r in caplog.records if "flash_attn" in r.getMessage()]
    assert settings and all(("enabled" if flash == "on" else "disabled") in line for line in settings), settings


@BOTH_WAYS
@pytest.mark.parametrize("kv_per_slot", [False, True], ids=["shared-kv", "kv-per-slot"])
async def test_a_chat_whose_slot_went_to_another_comes_back_from_host_memory_bit_for_bit(
    flash: str, kv_per_slot: bool, restores: list[bool], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two chats behind one system prompt take turns in one slot. Each next turn is restored from
    host memory (all but its newest words; in the shared cache the second from the system prompt
    stored once and its own part after it, ``cache_entries.Base``) into the cells it was decoded
    in, and gives the very logprobs it gives where its KV never left them. So does a prompt
    prefilled afresh, up to a near-tie (other batches)."""
    monkeypatch.setattr(scheduler, "rewinds_for_tiles", lambda *_: False)  # padding to a tile hangs on timings
    chats, restored = await chats_in_one_slot(flash, kv_per_slot, 4, "abAB")  # the second chat takes the slot
    _, kept = await chats_in_one_slot(flash, kv_per_slot, 0, "aAbB")  # each next turn right after its first
    assert restores and all(restores), "each copy came back bit for bit"
    for chat in "ab":
        again, first = restored[chat.upper()], restored[chat]
        assert again.usage.cached_tokens == len(chats[chat]) + len(first.token_ids) - 1  # (its last token was never decoded)
        assert kept[chat.upper()].usage.cached_tokens == again.usage.cached_tokens
        assert [(lp.token, lp.logprob) for lp in again.logprobs] == [(lp.token, lp.logprob) for lp in kept[chat.upper()].logprobs]
        with load(flash, parallel=1) as fresh:
            same_until_a_near_tie(again, await ask(fresh, next_turn(fresh, chats[chat], first, SAID), 24, logprobs=2))


async def chats_in_one_slot(flash: str, kv_per_slot: bool, cache_ram: int, order: str) -> tuple[dict[str, list[int]], dict[str, Generation]]:
    """Two chats' turns in an engine of one slot, one at a time, in ``order``: "a" and "b" their
    first turns, "A" and "B" their next."""
    with load(flash, parallel=1, cache_ram=cache_ram, kv_per_slot=kv_per_slot) as engine:
        chats = {"a": engine.tokenize(SYSTEM + " Tom went to the sea"), "b": engine.tokenize(SYSTEM + " Lily saw a cat")}
        asked: dict[str, Generation] = {}
        for turn in order:
            chat = turn.lower()
            prompt = chats[chat] if turn == chat else next_turn(engine, chats[chat], asked[chat], SAID)
            asked[turn] = await ask(engine, prompt, 40 if turn == chat else 24, logprobs=2)
        return chats, asked


@BOTH_WAYS
async def test_chats_saved_side_by_side_come_back_among_the_cells_of_one_still_generating(
    flash: str, restores: list[bool], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two chats answered in lockstep beside a long answer (their cells interleaved: a run of one
    cell per token, the slow copy without flash attention), then a one-off prompt takes a slot and
    the other idle one is parked: both chats go to host memory. Their next turns come back while
    the long answer still generates, its cells spread among the free ones, and answer as the same
    turns prefilled in a fresh engine, up to a near-tie (the restored cells lie elsewhere)."""
    with scheduler_held(monkeypatch):
        engine = load(flash, n_ctx=1024, parallel=3, cache_ram=4)
    with engine:
        chats = [engine.tokenize(text) for text in ("Lily and Tom went to the park. They saw a big dog", "Once upon a time, there was a little red car")]
        firsts = [engine.submit(GenerationRequest(chat, sampling=GREEDY, max_tokens=24, ignore_eos=True)) for chat in chats]
        long = engine.submit(GenerationRequest(engine.tokenize("The sun was hot."), sampling=GREEDY, max_tokens=700, ignore_eos=True))
        engine._scheduler.start()
        await asyncio.gather(*(first.collect() for first in firsts))
        running = asyncio.ensure_future(long.collect())
        await ask(engine, engine.tokenize("Ben had a toy car."), 4)
        turns = [next_turn(engine, chat, first, SAID) for chat, first in zip(chats, firsts, strict=True)]
        again = [engine.submit(GenerationRequest(turn, sampling=GREEDY, max_tokens=16, ignore_eos=True, logprobs=2)) for turn in turns]
        await asyncio.gather(*(g.collect() for g in again))
        assert not running.done(), "the long answer still generated when the chats came back"
        await running
    assert len(restores) >= 2 and all(restores), "each copy came back bit for bit"
    for got, chat, first in zip(again, chats, firsts, strict=True):
        assert got.usage.cached_tokens == len(chat) + len(first.token_ids) - 1
    assert len(long.token_ids) == 700
    with load(flash, n_ctx=1024, parallel=3) as fresh:
        for got, turn in zip(again, turns, strict=True):
            same_until_a_near_tie(got, await ask(fresh, turn, 16, logprobs=2))


@BOTH_WAYS
async def test_a_prompt_borrowing_a_running_requests_prefix_answers_as_one_prefilled_alone(flash: str) -> None:
    """A new conversation behind the system prompt a running one holds takes those cells
    (``sharing.borrow_prefix``), prefills only its own words, and answers as in a fresh engine,
    up to a near-tie (its own cells lie between the running request's)."""
    with load(flash) as engine:
        system = engine.tokenize(SYSTEM)
        question = system + engine.tokenize(" Lily saw a cat")[1:]
        running = engine.submit(GenerationRequest(system + engine.tokenize(" Tom went")[1:], sampling=GREEDY, max_tokens=400, ignore_eos=True))
        await running.__anext__()  # generating: the system prompt's cells are in the cache
        before = engine.stats().prefill_tokens_total
        borrowed = await ask(engine, question, 16, logprobs=2)
        prefilled = engine.stats().prefill_tokens_total - before
        assert not running.done, "borrowed from a request still running, not from an idle slot's cache"
        await running.collect()
    with load(flash) as fresh:
        alone = await ask(fresh, question, 16, logprobs=2)
    assert borrowed.usage.cached_tokens >= len(system) and prefilled == len(question) - borrowed.usage.cached_tokens
    assert alone.usage.cached_tokens == 0
    same_until_a_near_tie(borrowed, alone)


@BOTH_WAYS
@pytest.mark.parametrize("kv_per_slot", [False, True], ids=["shared-kv", "kv-per-slot"])
async def test_choices_copy_their_prompts_kv_and_answer_as_the_prompt_alone(flash: str, kv_per_slot: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``n`` = 3, admitted at once: the later choices wait for the first one's prompt KV, copy it
    (``sharing.share_prompt``; with a cache per slot llama.cpp copies the whole stream) and decode
    only its last token; each answers as the prompt alone, up to a near-tie (their answers' cells
    lie apart)."""
    request = {"sampling": GREEDY, "max_tokens": 24, "ignore_eos": True, "logprobs": 2}
    with scheduler_held(monkeypatch):
        engine = load(flash, parallel=3, kv_per_slot=kv_per_slot)
    with engine:
        prompt = engine.tokenize(SYSTEM)
        first = engine.submit(GenerationRequest(prompt, **request))  # type: ignore[arg-type]
        choices = [first, *(engine.submit(GenerationRequest(prompt, **request), shares_prompt_with=first) for _ in range(2))]  # type: ignore[arg-type]
        engine._scheduler.start()
        await asyncio.gather(*(choice.collect() for choice in choices))
        assert engine.stats().prefill_tokens_total == len(prompt) + 2
    with load(flash) as fresh:
        alone = await ask(fresh, prompt, 24, logprobs=2)
    for choice in choices:
        same_until_a_near_tie(choice, alone)


@BOTH_WAYS
@pytest.mark.parametrize("cache_ram", [0, 64], ids=["recomputed", "from-host-memory"])
async def test_requests_paused_for_kv_room_resume_whole_and_as_host_sampling_does(
    flash: str, cache_ram: int, restores: list[bool], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four 200-token answers outgrow the 256-cell shared cache: requests are paused and resumed
    (``preempt.py``), their KV recomputed or copied back from host memory. Each ends whole; sampled
    in the graph it has the tokens host sampling gives through the very same pauses; and it answers
    as it does alone, up to a near-tie (resumed, its KV lies in other cells: no like with like)."""
    paused = [await all_at_once(monkeypatch, flash, cache_ram, backend_sampling=True)]
    paused.append(await all_at_once(monkeypatch, flash, cache_ram, logprobs=2))  # (logprobs: host sampling)
    assert [g.token_ids for g in paused[0]] == [g.token_ids for g in paused[1]]
    assert all(restores) and bool(restores) == bool(cache_ram), "copied back, bit for bit, from host memory"
    for prompt, resumed in zip(PAUSED, paused[1], strict=True):
        with load(flash, n_ctx=256, parallel=4) as fresh:
            same_until_a_near_tie(resumed, await ask(fresh, fresh.tokenize(prompt), 200, logprobs=2))


async def all_at_once(monkeypatch: pytest.MonkeyPatch, flash: str, cache_ram: int, backend_sampling: bool = False, **request: object) -> list[Generation]:
    """``PAUSED``'s 200-token answers, queued before the scheduler starts (the same batches each
    time), checked whole: nothing streamed twice or lost, every token counted once."""
    with scheduler_held(monkeypatch):
        engine = load(flash, n_ctx=256, parallel=4, cache_ram=cache_ram, backend_sampling=backend_sampling)
    with engine:
        prompts = [engine.tokenize(p) for p in PAUSED]
        generations = [engine.submit(GenerationRequest(p, sampling=GREEDY, max_tokens=200, ignore_eos=True, **request)) for p in prompts]  # type: ignore[arg-type]
        engine._scheduler.start()
        texts = await asyncio.gather(*(g.collect() for g in generations))
        assert texts == [engine.detokenize(g.token_ids) for g in generations]
        assert engine.stats().preemptions_total > 0, "the KV cache really ran out"
    for generation, prompt in zip(generations, prompts, strict=True):
        assert generation.finish_reason == "length" and len(generation.token_ids) == 200
        assert (generation.usage.prompt_tokens, generation.usage.completion_tokens) == (len(prompt), 200)
    return generations
