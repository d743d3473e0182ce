"""The end of a prompt shorter than a flash-attention tile (a follow-up question behind a cached
history) is padded to a whole tile with cached tokens before it, decoded again: on the bench CPU a
tiled step costs about half as much a token at depth as a row-by-row one (``step_cost.py``)."""

from __future__ import annotations

import time

import pytest

import vramsupply.engine.sharing as sharing
from conftest import TINY_MODEL
from test_pacing import prefilling
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.pacing import PrefillPacer, StepWork
from vramsupply.engine.slots import Slot, new_cells
from vramsupply.engine.step_cost import TILE_ROWS, UNSEEN_DEPTH_TOKENS, StepCost, work

GREEDY = SamplingParams(temperature=0)


def paced_pacer() -> PrefillPacer:
    """Beside a stream: tiled steps known deep into prompts, row-by-row ones only at their start."""
    pacer = PrefillPacer(512, rewinds=True)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)
    pacer.observe(StepWork(16, work(16, 0), True), 0.02 + 16 * 0.0015)
    for depth in range(0, 1200, 64):
        pacer.observe(StepWork(64, work(64, depth), True), 0.02 + 64 * (0.0013 + 0.0000006 * depth))
    return pacer


def follow_up(done: int, prompt_tokens: int) -> tuple[Slot, Slot]:
    """A stream, and a slot whose prompt is cached up to ``done`` (its own cells)."""
    now = time.monotonic()
    stream = prefilling(0, 10, arrived=now - 5, done=10)
    stream.next_token = 42
    stream.cells[:10] = new_cells(10)
    slot = prefilling(1, prompt_tokens, arrived=now, done=done)
    slot.cells[:done] = new_cells(done)
    return stream, slot


def test_a_short_end_of_a_deep_prompt_is_decoded_with_the_cached_tokens_that_fill_a_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where row-by-row steps are known to cost more than a tile: on the bench CPU a 52-token
    follow-up at depth 900-1300 beside a stream answered in 126-143 ms padded, 178-229 ms not."""
    cut: list[int] = []
    monkeypatch.setattr(sharing.llama_cpp, "llama_memory_seq_rm", lambda memory, seq, start, end: cut.append(start) or True)
    pacer = paced_pacer()
    assert chunk_sizes(pacer, done=1000, prompt_tokens=1030) == [UNSEEN_DEPTH_TOKENS], "never seen row by row that deep: no padding"
    pacer.observe(StepWork(16, work(16, 980), True), 0.02 + 16 * 0.005)  # 5 ms a token row by row there
    stream, slot = follow_up(done=1000, prompt_tokens=1030)  # a 30-token question behind 1000 cached tokens
    plan = pacer.plan([stream, slot], capacity=2048, memory=object())
    assert [(s.seq_id, len(c)) for s, c in plan if c is not None] == [(1, TILE_ROWS)], "the question and 34 cached tokens before it"
    assert cut == [1000 - 34] and slot.n_cached == 966


def chunk_sizes(pacer: PrefillPacer, done: int, prompt_tokens: int) -> list[int]:
    stream, slot = follow_up(done, prompt_tokens)
    return [len(c) for _, c in pacer.plan([stream, slot], 2048, object()) if c is not None]


def test_no_padding_where_row_by_row_is_known_to_be_cheaper_or_without_rewinds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharing.llama_cpp, "llama_memory_seq_rm", lambda *args: True)
    assert chunk_sizes(paced_pacer(), done=200, prompt_tokens=230) == [30], "shallow: row by row costs less"
    pacer = paced_pacer()
    pacer.observe(StepWork(16, work(16, 980), True), 0.02 + 16 * 0.005)
    pacer._rewinds = False  # a recurrent state cannot be cut back
    (size,) = chunk_sizes(pacer, done=1000, prompt_tokens=1030)
    assert UNSEEN_DEPTH_TOKENS < size < 30, "row by row, as much as the step's time allows"


def test_cells_another_sequence_shares_are_never_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sharing.llama_cpp, "llama_memory_seq_rm", lambda *args: True)
    stream, slot = follow_up(done=1000, prompt_tokens=1030)
    lender = Slot(2, 4096)
    lender.cells[:990] = slot.cells[:990]  # a prefix borrowed from another slot, up to 990
    lender.n_cached = 990
    assert not sharing.rewind_for_tile(slot, 33, [stream, slot, lender], object())
    assert slot.n_cached == 1000
    assert sharing.rewind_for_tile(slot, 10, [stream, slot, lender], object())
    assert slot.n_cached == 990


def test_pays_to_pad_only_when_a_tile_fits_the_time_left() -> None:
    cost = StepCost()
    cost.observe(16, 16, work(16, 0), 16 * 0.0015)
    cost.observe(16, 16, work(16, 980), 16 * 0.005)
    cost.observe(64, 64, work(64, 900), 64 * 0.002)
    assert cost.pays_to_pad(30, 34, 1000, seconds=0.14)
    assert not cost.pays_to_pad(30, 34, 1000, seconds=0.1), "the tile would not fit the step"
    assert not cost.pays_to_pad(10, 54, 1000, seconds=0.14), "10 tokens row by row cost less than a tile"


async def test_a_padded_follow_up_answers_exactly_as_without_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding cached tokens again writes the same KV: the greedy answer is the same token for token,
    and the usage the same count (``Usage.cached_tokens``)."""
    history = "Once upon a time there was a little girl who lived in a village near the forest. " * 3
    answers, prefilled, cached = [], [], []
    for pad in (False, True):
        monkeypatch.setattr(StepCost, "pays_to_pad", lambda self, *args: pad)
        options = EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=1, threads=1, cache_ram=0, flash_attention="on")
        with Engine.load(options) as engine:
            first = engine.tokenize(history)
            assert len(first) > TILE_ROWS
            await engine.submit(GenerationRequest(first, sampling=GREEDY, max_tokens=4)).collect()
            before = engine.stats().prefill_tokens_total
            generation = engine.submit(GenerationRequest(engine.tokenize(history + " She said"), sampling=GREEDY, max_tokens=24))
            await generation.collect()
            answers.append(generation.token_ids)
            prefilled.append(engine.stats().prefill_tokens_total - before)
            cached.append((generation.usage.cached_tokens, engine.stats().cached_tokens_total))
            assert generation.usage.cached_tokens >= len(first) - 1
    assert answers[0] == answers[1]
    assert cached[0] == cached[1], "the tokens decoded again still count as cached, in usage and counters: timing decides the padding"
    assert prefilled[1] == TILE_ROWS and prefilled[0] < TILE_ROWS, "padded: one whole tile decoded, the cached tokens again"


def test_padding_is_used_for_attention_in_one_shared_cache_only() -> None:
    for per_slot, rewinds in ((False, True), (True, False)):
        options = EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=2, threads=1, kv_per_slot=per_slot, flash_attention="on")
        with Engine.load(options) as engine:
            assert engine._scheduler._pacer._rewinds is rewinds


def test_padding_is_used_only_where_attention_skips_kv_in_tiles() -> None:
    """Without ggml-cpu's tiled flash attention (turned off here; on a GPU alike) a padded tile
    skips nothing, so the cached tokens decoded again would be pure waste."""
    options = EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=2, threads=1, flash_attention="off")
    with Engine.load(options) as engine:
        assert engine._scheduler._pacer._rewinds is False
