"""Prompt chunks are sized from the measured prefill speed only while other slots generate: the
cost model of a step's size and depth, and the tiles a step is cut to."""

from __future__ import annotations

import time

import numpy as np

from vramsupply.engine.pacing import ALONE_STEP_TARGET_SECONDS, FIRST_ALONE_ROWS, MIN_CHUNK, STEP_TARGET_SECONDS, PrefillPacer, StepWork
from vramsupply.engine.tiles import STEP_LIMIT_SECONDS, decode_parts
from vramsupply.engine.step_cost import TILE_ROWS, UNSEEN_DEPTH_TOKENS, WINDOW, ChunkCost, work
from vramsupply.engine.slots import Slot, Task


def learn(pacer: PrefillPacer, seconds_per_token: float, paced: bool = True, tokens: int = 100, depth: int = 0) -> None:
    """One step of ``tokens`` prompt tokens at ``depth`` that cost this much a token."""
    pacer.observe(StepWork(tokens, work(tokens, depth), paced), tokens * seconds_per_token)


def whole_tiles(tokens: int, rows_before: int = 0) -> int:
    """``tokens`` cut so that a step with ``rows_before`` other rows (a stream's) ends at a whole tile."""
    return (rows_before + tokens) // TILE_ROWS * TILE_ROWS - rows_before


def chunk(pacer: PrefillPacer, generating: bool, depth: int = 0, capacity: int = 2048) -> int:
    """The prompt chunk the pacer plans for a 4000-token prompt done to ``depth``."""
    slots = [prefilling(1, 4000, arrived=time.monotonic(), done=depth)]
    if generating:
        slots.append(prefilling(0, 10, arrived=time.monotonic() - 5, done=10))
        slots[-1].next_token = 42
    sizes = [len(c) for _, c in pacer.plan(slots, capacity, memory=None) if c is not None]
    assert len(sizes) == 1
    return sizes[0]


def test_with_nobody_generating_a_step_takes_a_micro_batch_or_what_the_alone_target_allows() -> None:
    pacer = PrefillPacer(512)
    learn(pacer, 0.0005)  # beside a stream: does not size steps alone
    assert chunk(pacer, generating=False) == FIRST_ALONE_ROWS, "nothing learned alone yet"
    assert chunk(pacer, generating=False, capacity=100) == 100, "the batch's room bounds a first step too"
    learn(pacer, 0.0001, paced=False, tokens=512)  # a fast machine: the micro-batch is the limit
    assert chunk(pacer, generating=False) == 512
    pacer = PrefillPacer(512)
    learn(pacer, 0.002, paced=False, tokens=512)  # 2 ms a token: a micro-batch would keep newcomers waiting a second
    assert chunk(pacer, generating=False) == whole_tiles(int(ALONE_STEP_TARGET_SECONDS / 0.002), rows_before=0)
    assert chunk(pacer, generating=False, capacity=100) == 100


def test_the_first_long_prompt_after_start_is_taken_two_tiles_first_so_a_newcomer_waits_a_short_step() -> None:
    """A whole micro-batch as the first step (512 rows, about a second on the bench CPU) kept a
    345-token first turn that arrived 0.4 s after a 950-token one waiting for all of it: 1.72 s."""
    pacer = PrefillPacer(512)
    now = time.monotonic()
    long = prefilling(0, 950, arrived=now - 0.4)
    plan = pacer.plan([long], capacity=2048, memory=None)
    assert [len(c) for _, c in plan] == [FIRST_ALONE_ROWS] == [2 * TILE_ROWS]
    long.record(plan[0][1])
    pacer.observe(StepWork(FIRST_ALONE_ROWS, work(FIRST_ALONE_ROWS, 0), generating=False), FIRST_ALONE_ROWS * 0.0017)
    newcomer = prefilling(1, 345, arrived=now)
    plan = pacer.plan([long, newcomer], capacity=2048, memory=None)
    assert plan[0][0] is newcomer, "the newcomer can still answer in time at 1.7 ms a token; the long one cannot"
    assert sum(len(c) for _, c in plan) == whole_tiles(int(ALONE_STEP_TARGET_SECONDS / 0.0017), rows_before=0)


def test_short_prompts_in_a_first_step_are_not_cut() -> None:
    """The first step's limit is on rows, so questions that together fit in it start together."""
    now = time.monotonic()
    questions = [prefilling(i, 40, arrived=now + i * 1e-3) for i in range(3)]
    plan = PrefillPacer(512).plan(questions, capacity=2048, memory=None)
    assert [len(c) for _, c in plan] == [40, 40, 40]


def test_before_any_speed_is_known_a_prompt_next_to_a_stream_starts_small() -> None:
    """A whole 2048-token batch as the first step after start-up would be a seconds-long pause."""
    pacer = PrefillPacer(512)
    assert chunk(pacer, generating=True) == MIN_CHUNK
    assert chunk(pacer, generating=True, capacity=11) == 10


def test_while_others_generate_a_step_carries_what_the_target_time_leaves_after_their_rows() -> None:
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)  # the streams' rows alone: 20 ms a step
    pacer.observe(StepWork(200, work(200, 0), generating=True), 0.02 + 200 * 0.0005)  # 2000 prompt tokens a second
    assert chunk(pacer, generating=True) == whole_tiles(int((STEP_TARGET_SECONDS - 0.02) / 0.0005))
    for _ in range(WINDOW):
        learn(pacer, 0.1)  # very slow steps: never below the floor
    assert chunk(pacer, generating=True) == MIN_CHUNK
    learn(pacer, 100.0, tokens=4)  # too few prompt tokens to judge: ignored
    assert chunk(pacer, generating=True) == MIN_CHUNK


def test_a_deeper_chunk_is_smaller_so_that_every_step_stays_within_the_target() -> None:
    """A token costs 1 ms plus 1 us per token before it: 1 ms at the start of a prompt, 3 ms at 2000."""
    per_token, per_depth = 0.001, 0.000001
    pacer = PrefillPacer(512)
    for depth in range(0, 1000, 100):  # learned on the first thousand tokens of a prompt only
        pacer.observe(StepWork(100, work(100, depth), True), 100 * per_token + per_depth * work(100, depth))

    def true_seconds(size: int, depth: int) -> float:
        return per_token * size + per_depth * work(size, depth)

    for depth in (0, 2000, 3000):
        size = chunk(pacer, generating=True, depth=depth)
        assert true_seconds(size, depth) <= STEP_TARGET_SECONDS < true_seconds(size + TILE_ROWS, depth)
        if size >= TILE_ROWS:
            assert size % TILE_ROWS == 0, "a tiled step of prompt rows (decoded apart from the stream's) ends at a whole tile"
    assert chunk(pacer, generating=True, depth=3000) < chunk(pacer, generating=True, depth=0) / 2


def test_chunks_grow_at_most_twofold_a_step_from_what_was_seen() -> None:
    """One small first step is a poor guide: its time is mostly the rest of the step."""
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)
    pacer.observe(StepWork(MIN_CHUNK, work(MIN_CHUNK, 0), generating=True), 0.021)
    assert chunk(pacer, generating=True) == 2 * MIN_CHUNK


def test_steps_that_keep_coming_out_slower_than_the_fitted_line_shrink_the_next_chunks_at_once() -> None:
    """Past a cliff in the cost (on the bench machine, somewhere beyond depth 1500) the line lags.
    (Deep enough that no step reaches a whole tile: they all stay row-by-row.)"""
    def line(size: int, depth: int) -> float:
        return 0.001 * size + 0.0000015 * work(size, depth)

    pacer = PrefillPacer(512)
    for depth in range(0, 1600, 100):
        pacer.observe(StepWork(60, work(60, depth), True), line(60, depth))
    depth = 1600
    for _ in range(3):  # past the cliff every step costs 40 % more than the line says
        size = chunk(pacer, generating=True, depth=depth)
        pacer.observe(StepWork(size, work(size, depth), True), 1.4 * line(size, depth))
        depth += size
    size = chunk(pacer, generating=True, depth=depth)
    assert size < TILE_ROWS
    assert 1.4 * line(size, depth) <= 1.05 * STEP_TARGET_SECONDS
    assert 1.4 * line(size + 4, depth) > STEP_TARGET_SECONDS, "and not much smaller than the target allows"


def test_a_prompt_shallower_than_anything_learned_is_not_sized_cheaper_than_the_cheapest_step_seen() -> None:
    """The line fitted deep in one prompt is not trusted at the start of the next one."""
    pacer = PrefillPacer(512)
    for depth in range(1000, 2000, 100):
        pacer.observe(StepWork(60, work(60, depth), True), 60 * (0.001 + 0.000001 * (depth + 30)))
    cheapest = 0.001 + 0.000001 * 1030
    assert chunk(pacer, generating=True, depth=0) == whole_tiles(int(STEP_TARGET_SECONDS / cheapest))


def test_a_cost_that_does_not_grow_with_depth_still_sizes_chunks() -> None:
    """Steps at three depths that cost the same a token fitted a depth term of about 1e-22 a token,
    and the quadratic's root, in its textbook form, came out 0 tokens (two nearly equal numbers
    subtracted): nothing fitted in a step that had room for 76."""
    cost = ChunkCost()
    for depth in (305, 368, 431):
        cost.observe(63, work(63, depth), 63 * 0.0017)
    assert cost.tokens_within(0.13, 494) == int(0.13 / 0.0017) == 76


def test_the_depth_term_is_used_only_once_steps_at_different_depths_tell_it_apart() -> None:
    cost = ChunkCost()
    for _ in range(5):
        cost.observe(100, work(100, 500), 0.2)  # all at one depth: a flat 2 ms a token
    assert cost.seconds(100, 3000) == cost.seconds(100, 0) == 0.2
    cost.observe(100, work(100, 3000), 0.1)  # deeper yet cheaper (a noisy machine): no negative depth cost
    assert cost.seconds(100, 3000) == cost.seconds(100, 0)


def prefilling(seq_id: int, prompt_tokens: int, arrived: float, done: int = 0, resuming: bool = False) -> Slot:
    slot = Slot(seq_id, 4096)
    task = Task(f"r{seq_id}", np.arange(prompt_tokens, dtype=np.int32), None, 8, None, None, arrived=arrived)  # type: ignore[arg-type]
    slot.task, slot.prompt, slot.n_cached = task, task.prompt, done
    slot.resume_token = 7 if resuming else None
    return slot


def test_steps_with_nobody_generating_do_not_size_the_chunks_beside_a_stream() -> None:
    """A prompt prefilled alone runs whole micro-batches, cheaper per token than chunks beside a stream."""
    pacer = PrefillPacer(512)
    learn(pacer, 0.001, paced=False, tokens=512)  # 1 ms a token alone
    assert chunk(pacer, generating=True) == MIN_CHUNK, "nothing learned beside a stream yet"
    learn(pacer, 0.002)  # 2 ms a token beside a stream
    learn(pacer, 0.0005, paced=False, tokens=512)
    assert chunk(pacer, generating=True) == whole_tiles(int(STEP_TARGET_SECONDS / 0.002))


def test_a_step_that_reaches_the_tiled_attention_path_is_cut_at_a_whole_tile() -> None:
    """On the bench CPU a step of 64 rows at depth 800 took 139 ms and one of 63 rows 213 ms: below
    a tile every row attends on its own. The two kinds of step are learned apart, and a tiled one
    ends at a whole tile."""
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)  # the stream's row: 20 ms a step
    for _ in range(3):
        pacer.observe(StepWork(40, work(40, 800), True), 0.02 + 40 * 0.003)  # row by row: 3 ms a token
        pacer.observe(StepWork(64, work(64, 800), True), 0.02 + 64 * 0.0015)  # tiled: 1.5 ms a token
    size = chunk(pacer, generating=True, depth=800)
    assert size == whole_tiles(int((STEP_TARGET_SECONDS - 0.02) / 0.0015)) == 64, "one whole tile beside the stream's row"
    assert int((STEP_TARGET_SECONDS - 0.02) / 0.003) == 46, "where the row-by-row cost alone allowed 46 tokens"


def test_a_prompt_that_ends_in_the_step_is_not_cut_back_to_a_whole_tile() -> None:
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)
    pacer.observe(StepWork(64, work(64, 0), True), 0.02 + 64 * 0.001)
    now = time.monotonic()
    stream = prefilling(0, 10, arrived=now - 5, done=10)
    stream.next_token = 42
    question = prefilling(1, 100, arrived=now)  # 100 tokens at 1 ms: fits the 140 ms left whole
    plan = pacer.plan([stream, question], capacity=2048, memory=None)
    assert [len(c) for _, c in plan if c is not None] == [100]


def test_one_tile_is_tried_when_the_row_by_row_cost_nearly_allows_it() -> None:
    """Before any tiled step is known, the row-by-row cost bounds a tile's from above: one tile is
    tried when that bound is within EXPLORE times the time left, and then learned."""
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)
    for _ in range(3):
        pacer.observe(StepWork(40, work(40, 300), True), 0.02 + 40 * 0.0025)  # 2.5 ms a token row by row
    assert 64 * 0.0025 > STEP_TARGET_SECONDS - 0.02  # the bound says a tile does not quite fit
    assert chunk(pacer, generating=True, depth=300) == 64  # but within EXPLORE of it: tried
    pacer.observe(StepWork(64, work(64, 300), True), 0.02 + 64 * 0.001)  # and it came out cheaper
    assert chunk(pacer, generating=True, depth=300) == 2 * TILE_ROWS, "two tiles fit now"

    slower = PrefillPacer(512)
    slower.observe(StepWork(0, 0, generating=True), 0.02)
    for _ in range(3):
        slower.observe(StepWork(40, work(40, 300), True), 0.02 + 40 * 0.004)  # 4 ms: a tile is 252 ms by the bound
    assert chunk(slower, generating=True, depth=300) == int((STEP_TARGET_SECONDS - 0.02) / 0.004)


def test_generating_rows_and_prompt_rows_that_reach_a_tile_are_decoded_apart() -> None:
    """In one decode, the generating rows of several sequences share a flash-attention tile, which
    then computes every cell in use: on the bench CPU 6 streams' rows and 64 prompt rows took 212 ms
    together and 111 ms apart. Below a tile every row attends on its own, and one decode is cheaper."""
    now = time.monotonic()
    streams = [prefilling(i, 10, arrived=now - 5, done=10) for i in range(3)]
    for stream in streams:
        stream.next_token = 42
    question = prefilling(3, 100, arrived=now)
    generating = [(slot, None) for slot in streams]
    tile = generating + [(question, np.arange(61, dtype=np.int32))]
    assert decode_parts(tile) == [generating, tile[3:]], "3 + 61 rows: the streams, then the prompt"
    below = generating + [(question, np.arange(60, dtype=np.int32))]
    assert decode_parts(below) == [below]
    alone = [(question, np.arange(100, dtype=np.int32))]
    assert decode_parts(alone) == [alone] and decode_parts(generating) == [generating]
    assert PrefillPacer.step_work(tile) == StepWork(61, work(61, 0), True)


def test_the_end_of_a_deep_prompt_is_not_sized_by_row_by_row_steps_seen_only_at_the_start() -> None:
    """Row-by-row steps cost more a token the deeper they are, four times as fast as tiled ones: the
    52-token end of a 1800-token prompt, sized at 70 ms from the prompt's first chunks, took 297 ms
    on the bench CPU. Deeper than any such step seen, one takes UNSEEN_DEPTH_TOKENS, and learns."""
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)
    pacer.observe(StepWork(16, work(16, 0), True), 0.02 + 16 * 0.0015)  # a prompt's first chunk
    for depth in range(32, 1750, 64):
        pacer.observe(StepWork(64, work(64, depth), True), 0.02 + 64 * (0.0013 + 0.0000006 * depth))
    assert chunk_of(pacer, 1802, done=1750) == UNSEEN_DEPTH_TOKENS
    pacer.observe(StepWork(16, work(16, 1750), True), 0.02 + 16 * 0.0055)  # 5.5 ms a token there
    assert 20 <= chunk_of(pacer, 1802, done=1766) <= int((STEP_TARGET_SECONDS - 0.02) / 0.0055)


def chunk_of(pacer: PrefillPacer, prompt_tokens: int, done: int) -> int:
    """The chunk planned for a prompt of ``prompt_tokens`` done to ``done``, beside one stream."""
    now = time.monotonic()
    stream = prefilling(0, 10, arrived=now - 5, done=10)
    stream.next_token = 42
    plan = pacer.plan([stream, prefilling(1, prompt_tokens, arrived=now, done=done)], capacity=2048, memory=None)
    return sum(len(c) for _, c in plan if c is not None)


def test_deep_in_a_prompt_a_tile_is_taken_only_where_the_tiled_fit_says_it_fits() -> None:
    """Beside a stream, 3,600 tokens into a 4,000-token prompt: the row-by-row fit, learned from the
    prompt's first chunks, allowed a tile that the tiled fit put at 0.21 s for a 0.15 s share, and
    the stream waited 0.22 s (``bench/worst_case.py``)."""
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.02)
    pacer.observe(StepWork(16, work(16, 0), True), 0.02 + 16 * 0.001)
    pacer.observe(StepWork(32, work(32, 16), True), 0.02 + 32 * 0.001)  # row by row: 1 ms a token at the start
    for depth in range(48, 3600, 64):
        if depth == 1008:
            assert chunk(pacer, generating=True, depth=depth) == TILE_ROWS, "where a tile fits, it is taken"
        pacer.observe(StepWork(64, work(64, depth), True), 0.02 + 64 * (0.0008 + 0.0000008 * depth))
    assert 64 * (0.0008 + 0.0000008 * 3632) > STEP_TARGET_SECONDS - 0.02, "a tile no longer fits there"
    assert chunk(pacer, generating=True, depth=3600) == UNSEEN_DEPTH_TOKENS, "row by row, never seen that deep"


def test_a_tiled_fit_that_turns_every_tile_down_is_checked_against_the_row_by_row_bound() -> None:
    """The tiled fit learns only from tiled steps. With a few slow deep tiles in its window (flat
    across depths) it put a tile at 0.151 s anywhere, more than the time left beside six streams, so
    in a marketplace run prompts went 63 rows at a time, row by row, at about twice a tile's cost a
    row (63 rows at depth 400 took 119 ms where a tile took 92), and no tile came to correct it. The
    row-by-row fit, an upper bound on a tile where it has seen the depth, still allows one."""
    pacer = PrefillPacer(512)
    pacer.observe(StepWork(0, 0, generating=True), 0.03)  # the streams' rows: 30 ms a step
    for _ in range(3):
        pacer.observe(StepWork(64, work(64, 1300), True), 0.03 + 0.151)  # slow tiles, all deep
    for depth in (305, 368, 431):
        pacer.observe(StepWork(63, work(63, depth), True), 0.03 + 63 * 0.0017)  # row by row: 107 ms
    assert 0.151 > STEP_TARGET_SECONDS - 0.03 > 64 * 0.0017, "the tiled fit says no tile fits; the row-by-row bound says one does"
    assert chunk(pacer, generating=True, depth=494) == TILE_ROWS
    pacer.observe(StepWork(64, work(64, 494), True), 0.03 + 64 * 0.0014)  # and the tile came out cheaper
    assert chunk(pacer, generating=True, depth=558) >= TILE_ROWS, "the tiled fit, corrected, takes tiles again"

    deep = PrefillPacer(512)  # where the row-by-row fit has not seen the depth, it bounds nothing
    deep.observe(StepWork(0, 0, generating=True), 0.03)
    for _ in range(3):
        deep.observe(StepWork(64, work(64, 1300), True), 0.03 + 0.151)
    deep.observe(StepWork(40, work(40, 300), True), 0.03 + 40 * 0.0015)
    assert chunk(deep, generating=True, depth=1300) == UNSEEN_DEPTH_TOKENS


def test_beside_many_streams_a_whole_tile_goes_in_place_of_a_chunk_below_one_within_the_step_limit() -> None:
    """Beside eight streams whose rows take 45 ms, the target left room for 26 prompt rows, which
    attend row by row over every cell in use: 4.8 ms a row in a marketplace run at 0.4 conv/s,
    against 2.1 in whole tiles. A tile goes instead when the step stays within STEP_LIMIT_SECONDS."""
    pacer = PrefillPacer(512)
    learn(pacer, 0.001)  # tiles: 1 ms a prompt row
    pacer.observe(StepWork(0, 0, generating=True), 0.1)  # the streams' rows: 100 ms a step
    assert (STEP_TARGET_SECONDS - 0.1) / 0.001 < TILE_ROWS <= (STEP_LIMIT_SECONDS - 0.1) / 0.001
    assert chunk_of(pacer, 300, done=0) == TILE_ROWS
    assert chunk_of(pacer, 40, done=0) == 40, "a prompt shorter than a tile goes whole, as before"

    crowded = PrefillPacer(512)
    learn(crowded, 0.001)
    crowded.observe(StepWork(0, 0, generating=True), 0.13)  # 130 ms: not even a tile within the limit
    assert chunk_of(crowded, 300, done=0) == int(round((STEP_TARGET_SECONDS - 0.13) / 0.001))
