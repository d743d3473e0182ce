"""The slots share one KV cache, as llama-server's do; when it runs out, a request is paused and
resumed, never failed (``engine/preempt.py``). On the real tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest

from conftest import TINY_MODEL, scheduler_held
from vramsupply.engine import Engine, EngineOptions, EngineStats, Generation, GenerationRequest, SamplingParams
from vramsupply.engine.preempt import growth_cap

GREEDY = SamplingParams(temperature=0)
PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park", "Tim had a red ball. He"]
N_CTX = 256
LONG = 200  # completion tokens per request: four of them need far more than 256 KV cells


def load(**options: object) -> Engine:
    options = {"cache_ram": 0, "n_ctx": N_CTX, "parallel": 4, **options}
    return Engine.load(EngineOptions(model_path=TINY_MODEL, max_queue=8, threads=1, **options))  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=[0, 64], ids=["no-prompt-cache", "prompt-cache"])
def shared(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """Without and with the host prompt cache, which keeps the prefixes idle slots give up."""
    with load(cache_ram=request.param) as engine:
        yield engine


async def alone(engine: Engine, prompt: list[int], **request: object) -> Generation:
    generation = engine.submit(GenerationRequest(prompt, **request))  # type: ignore[arg-type]
    await generation.collect()
    return generation


async def together(engine: Engine, prompts: list[list[int]], **request: object) -> tuple[list[Generation], list[str]]:
    generations = [engine.submit(GenerationRequest(prompt, **request)) for prompt in prompts]  # type: ignore[arg-type]
    texts = await asyncio.gather(*(g.collect() for g in generations))
    return generations, texts


async def each_alone(prompts: list[str], **request: object) -> tuple[list[list[int]], list[Generation], list[str]]:
    """The prompts' tokens, and each prompt's run alone, one after another in a fresh engine."""
    with load() as engine:
        tokens = [engine.tokenize(p) for p in prompts]
        runs = [await alone(engine, prompt, **request) for prompt in tokens]
        return tokens, runs, [engine.detokenize(run.token_ids) for run in runs]


async def all_at_once(monkeypatch: pytest.MonkeyPatch, prompts: list[list[int]], cache_ram: int, **request: object) -> tuple[list[Generation], list[str], EngineStats]:
    """The prompts queued together in a fresh engine before its scheduler thread starts, so they are
    admitted at once. Submitted to a running scheduler, one admitted a step or two before the others
    put every request's cells elsewhere in the shared cache, which rounds attention's sums
    differently: a greedy text could part from its run alone at a near-tie, in some runs only."""
    with scheduler_held(monkeypatch):
        engine = load(cache_ram=cache_ram)
    with engine:
        generations = [engine.submit(GenerationRequest(prompt, **request)) for prompt in prompts]  # type: ignore[arg-type]
        engine._scheduler.start()
        texts = await asyncio.gather(*(g.collect() for g in generations))
        return generations, texts, engine.stats()


def test_by_default_the_slots_share_one_kv_cache_of_the_context(shared: Engine) -> None:
    assert shared.kv_tokens == N_CTX and shared.n_ctx == N_CTX and shared.parallel == 4


def test_kv_per_slot_gives_each_slot_the_whole_context() -> None:
    with load(kv_per_slot=True) as engine:
        assert engine.kv_tokens == 4 * N_CTX and engine.n_ctx == N_CTX


@pytest.mark.parametrize("cache_ram", [0, 64], ids=["no-prompt-cache", "prompt-cache"])
async def test_requests_that_together_outgrow_the_shared_kv_all_finish_as_if_alone(monkeypatch: pytest.MonkeyPatch, cache_ram: int) -> None:
    """Each answer is its run alone up to a near-tie: a paused request's KV is rebuilt in other cells
    or batch shapes, which rounds attention's sums differently (without flash attention, the default
    on an Intel CPU with AMX, one of these answers parted from its run alone at token 186). Its
    text is exactly its tokens': none streamed twice or lost."""
    request = {"sampling": GREEDY, "max_tokens": LONG, "ignore_eos": True, "logprobs": 2}
    prompts, expected, _ = await each_alone(PROMPTS, **request)

    generations, texts_together, stats = await all_at_once(monkeypatch, prompts, cache_ram, **request)

    assert stats.preemptions_total > 0, "the KV cache really ran out"
    with load() as engine:
        assert texts_together == [engine.detokenize(g.token_ids) for g in generations], "no token streamed twice or lost"
    for generation, prompt, reference in zip(generations, prompts, expected, strict=True):
        same_until_a_near_tie(generation, reference)
        assert generation.finish_reason == "length"
        assert generation.usage is not None
        assert (generation.usage.prompt_tokens, generation.usage.completion_tokens) == (len(prompt), LONG)


async def test_a_paused_request_is_counted_once_in_the_prompt_and_cached_token_totals(shared: Engine) -> None:
    """/metrics and the platform's heartbeats report these totals: a request resumed after a pause
    counted its prompt (and its restored tokens as cached) again, once per pause."""
    prompts = [shared.tokenize(p) for p in PROMPTS]
    before = shared.stats()

    generations, _ = await together(shared, prompts, sampling=GREEDY, max_tokens=LONG, ignore_eos=True)

    after = shared.stats()
    assert after.preemptions_total > before.preemptions_total, "the KV cache really ran out"
    usages = [g.usage for g in generations if g.usage is not None]
    assert after.prompt_tokens_total - before.prompt_tokens_total == sum(u.prompt_tokens for u in usages)
    assert after.cached_tokens_total - before.cached_tokens_total == sum(u.cached_tokens for u in usages)


async def test_with_the_prompt_cache_a_paused_request_comes_back_from_host_memory_not_prefilled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The paused request's KV is copied to the host prompt cache before it is dropped, so when
    there is room again it is copied back and only its last token is decoded again.

    On a loaded machine a save was sometimes timed with the time slices another process took
    meanwhile (tens of ms for a 0.3 ms copy), the save policy then judged copies dearer than
    prefilling, and the paused requests were prefilled again (``save_policy.py``). Admitted one
    by one, the third text once parted from its run alone at a near-tie (token 161; ``all_at_once``);
    admitted at once, the answers still match their runs alone only up to a near-tie (the restored
    KV sits in other cells)."""
    request = {"sampling": GREEDY, "max_tokens": LONG, "ignore_eos": True, "logprobs": 2}
    prompts, expected, _ = await each_alone(PROMPTS, **request)

    generations, _, stats = await all_at_once(monkeypatch, prompts, 64, **request)

    assert stats.preemptions_total > 0, "the KV cache really ran out"
    assert stats.prefill_tokens_total <= sum(len(p) for p in prompts) + stats.preemptions_total
    for generation, reference in zip(generations, expected, strict=True):
        same_until_a_near_tie(generation, reference)


async def test_a_long_prompt_waits_for_the_room_others_will_generate_into_instead_of_being_paused() -> None:
    """Admission keeps room for the running requests to generate what their max_tokens allow (up to
    ``GROWTH_RESERVE`` cells each): a long prompt that would leave them too little waits, instead of
    being prefilled and then paused (its prefill thrown away) when the cache runs out."""
    with load(n_ctx=1024, parallel=2) as engine:
        story = engine.tokenize("Once upon a time")
        question = engine.tokenize("Lily and Tom went to the park to play with a big red ball. " * 60)[:500]
        expected = [await alone(engine, story, sampling=GREEDY, max_tokens=700, ignore_eos=True),
                    await alone(engine, question, sampling=GREEDY, max_tokens=150, ignore_eos=True)]

    # A fresh engine: the same prompts' KV kept in other cells would round differently in the last bits.
    with load(n_ctx=1024, parallel=2) as engine:
        first = engine.submit(GenerationRequest(story, sampling=GREEDY, max_tokens=700, ignore_eos=True))
        while len(first.token_ids) < 300:  # far into its answer: 400 tokens to go
            await asyncio.sleep(0.001)
        second = engine.submit(GenerationRequest(question, sampling=GREEDY, max_tokens=150, ignore_eos=True))
        await asyncio.gather(first.collect(), second.collect())

        # Before: 500 prompt cells fitted beside the first's 300, the question was prefilled, and
        # one of the two was paused when the first grew past 474.
        assert engine.stats().preemptions_total == 0
    assert [first.token_ids, second.token_ids] == [e.token_ids for e in expected]


async def test_while_a_prompt_waits_for_kv_room_no_slot_is_shown_idle() -> None:
    """/health and heartbeats read these stats: a slot with nothing in it, beside a request that
    waits for room in the shared cache, is no slot a new buyer could start on."""
    with load(n_ctx=1024, parallel=2) as engine:
        story = engine.tokenize("Once upon a time")
        question = engine.tokenize("Lily and Tom went to the park to play with a big red ball. " * 60)[:500]
        first = engine.submit(GenerationRequest(story, sampling=GREEDY, max_tokens=700, ignore_eos=True))
        while len(first.token_ids) < 300:
            await asyncio.sleep(0.001)
        second = engine.submit(GenerationRequest(question, sampling=GREEDY, max_tokens=150, ignore_eos=True))
        await asyncio.sleep(0.05)
        waiting = engine.stats()
        first.cancel()
        second.cancel()
        await asyncio.gather(first.collect(), second.collect())
        done = engine.stats()

    assert (waiting.slots_total, waiting.slots_busy, waiting.queue_depth) == (2, 1, 1)
    assert waiting.slots_idle == 0  # before: 1
    assert done.slots_idle == 2


async def test_a_prompt_whose_start_an_idle_slot_still_holds_takes_room_like_any_other() -> None:
    """Without the prompt cache an idle slot keeps its KV, but the active requests' room does not
    count it: admitting the question because 499 of its 500 prompt cells were "already there"
    paused one of the two requests once the story grew into them."""
    with load(n_ctx=1024, parallel=2) as engine:
        story = engine.tokenize("Once upon a time")
        question = engine.tokenize("Lily and Tom went to the park to play with a big red ball. " * 60)[:500]
        await alone(engine, question, sampling=GREEDY, max_tokens=150, ignore_eos=True)  # its KV stays in slot 0

        first = engine.submit(GenerationRequest(story, sampling=GREEDY, max_tokens=700, ignore_eos=True))
        while len(first.token_ids) < 300:
            await asyncio.sleep(0.001)
        second = engine.submit(GenerationRequest(question, sampling=GREEDY, max_tokens=150, ignore_eos=True))
        await asyncio.gather(first.collect(), second.collect())

        assert engine.stats().preemptions_total == 0
    assert (len(first.token_ids), len(second.token_ids)) == (700, 150)


async def test_without_the_prompt_cache_one_off_prompts_leave_a_waiting_chat_its_kv_while_slots_are_empty() -> None:
    """Idle slots keep their KV when there is no host prompt cache to park it in, so a prompt that
    shares only the BOS token with a chat's slot goes to an empty slot: the chat's next turn finds
    its history still there. Before, the lowest idle slot was taken, the chat's own."""
    with load(n_ctx=1024) as engine:
        turn = engine.tokenize("Lily and Tom went to the park. They saw a big dog.")
        answer = await alone(engine, turn, sampling=GREEDY, max_tokens=40, ignore_eos=True)
        for text in ["The cat sat on the mat", "Sue had a red ball"]:
            await alone(engine, engine.tokenize(text), sampling=GREEDY, max_tokens=40, ignore_eos=True)

        follow_up = [*turn, *answer.token_ids, *engine.tokenize("Then they", add_special=False)]
        second_turn = await alone(engine, follow_up, sampling=GREEDY, max_tokens=10)
    assert second_turn.usage is not None
    assert second_turn.usage.cached_tokens >= len(turn) + len(answer.token_ids) - 1


def test_the_room_kept_for_growth_never_stops_every_slot_from_starting() -> None:
    assert growth_cap(4096, 16) == 128  # the defaults: 16 short requests all start at once
    assert growth_cap(4096, 4) == 256
    assert growth_cap(N_CTX, 4) == 32  # at least a little, however small the cache


async def test_a_paused_request_keeps_its_stop_strings_and_ends_on_them(monkeypatch: pytest.MonkeyPatch) -> None:
    request = {"sampling": GREEDY, "max_tokens": LONG, "ignore_eos": True}
    prompts, _, texts = await each_alone(PROMPTS, **request)
    # A stop string from late in the last request's text: it is reached only after pauses.
    stop = texts[-1][-40:-30]

    generations, texts_together, stats = await all_at_once(monkeypatch, prompts, 0, **request, stop=[stop])

    assert stats.preemptions_total > 0
    assert texts_together[-1] == texts[-1][: texts[-1].index(stop)] and generations[-1].finish_reason == "stop"


async def test_a_request_cancelled_while_paused_reports_what_it_generated(shared: Engine) -> None:
    prompts = [shared.tokenize(p) for p in PROMPTS]
    generations = [shared.submit(GenerationRequest(p, sampling=GREEDY, max_tokens=LONG, ignore_eos=True)) for p in prompts]
    for _ in range(2000):
        stats = shared.stats()
        if stats.queue_depth > 0 and any(g.token_ids for g in generations):
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("no request was paused")
    youngest = generations[-1]
    youngest.cancel()
    await asyncio.gather(*(g.collect() for g in generations))
    assert youngest.usage is not None and youngest.usage.prompt_tokens == len(prompts[-1])
    assert youngest.usage.completion_tokens == len(youngest.token_ids)
    assert all(g.usage and g.usage.completion_tokens == LONG for g in generations[:-1])


async def test_idle_slots_give_up_their_cached_prefixes_before_a_request_is_paused(shared: Engine) -> None:
    prompts = [shared.tokenize(p) for p in PROMPTS]
    for prompt in prompts:  # every slot keeps a cached prefix behind
        await together(shared, [prompt] * 4, sampling=GREEDY, max_tokens=40, ignore_eos=True)
    before = shared.stats().preemptions_total

    lone = await alone(shared, prompts[0], sampling=GREEDY, max_tokens=N_CTX - len(prompts[0]), ignore_eos=True)

    assert lone.finish_reason == "length" and shared.stats().preemptions_total == before


@pytest.mark.parametrize("kv_per_slot", [False, True])
async def test_n_choices_share_their_prompt_in_either_kv_layout(kv_per_slot: bool) -> None:
    with load(kv_per_slot=kv_per_slot) as engine:
        prompt = engine.tokenize(PROMPTS[2])
        single = await alone(engine, prompt, sampling=GREEDY, max_tokens=30, ignore_eos=True)
        before = engine.stats()
        first = engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=30, ignore_eos=True))
        others = [engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=30, ignore_eos=True), shares_prompt_with=first) for _ in range(2)]
        texts = await asyncio.gather(*(g.collect() for g in (first, *others)))
        assert texts == [engine.detokenize(single.token_ids)] * 3
        assert engine.stats().prompt_tokens_total - before.prompt_tokens_total == len(prompt)


STORY = (
    "once upon a time there was a little dog named max. max liked to run in the park with his friend "
    "the cat. one day they found a big red ball under a tree. they played with the ball all day long"
)


NEAR_TIE = 0.1
"""Logprobs move by up to 0.05 with the batch shape, so the two best tokens can trade places only
where the run alone had them closer than twice that."""


def same_until_a_near_tie(got: Generation, want: Generation) -> None:
    """``got`` has ``want``'s tokens, with logprobs within 0.05, up to the first place where ``want``
    met a near-tie; after it, the texts may go their own ways."""
    for index, (mine, theirs) in enumerate(zip(got.logprobs, want.logprobs)):
        if mine.token != theirs.token:
            (_, best), (_, second) = theirs.top[:2]
            assert best - second < NEAR_TIE, f"token {index} differs where the run alone was sure ({best:.3f} against {second:.3f})"
            return
        assert abs(mine.logprob - theirs.logprob) < 0.05, f"token {index}: {mine.logprob:.3f} against {theirs.logprob:.3f} alone"
    assert got.token_ids == want.token_ids


async def test_a_paused_request_keeps_its_grammar_state_and_its_neighbours_their_logprobs(shared: Engine) -> None:
    """The sampler chain goes with a paused request: a grammar that spells out one long text ends
    with exactly that text, not restarted where the request was paused (the youngest request, the
    first paused). The greedy neighbours' tokens and logprobs match their runs alone.

    A KV rebuilt after a pause is not bit for bit the one decoded token by token (recomputed in
    another batch shape and rounded to f16, or copied back into other cells, which changes the order
    of attention's sums), and the batch shapes differ anyway; so greedy decoding may pick the other
    of two near-tied tokens, and the texts part there (it happened once, in a fresh-clone CI run).
    A grammar spelling one text cannot."""
    prompts = [shared.tokenize(p) for p in PROMPTS]
    greedy = {"sampling": GREEDY, "max_tokens": LONG, "ignore_eos": True, "logprobs": 2}
    requests = [greedy, greedy, greedy, {"sampling": SamplingParams(temperature=0, grammar=f'root ::= "{STORY}"'), "max_tokens": LONG}]
    expected = [await alone(shared, prompt, **request) for prompt, request in zip(prompts, requests, strict=True)]
    assert shared.detokenize(expected[-1].token_ids) == STORY and len(expected[-1].token_ids) > 100
    before = shared.stats().preemptions_total

    generations = [shared.submit(GenerationRequest(p, **r)) for p, r in zip(prompts, requests, strict=True)]  # type: ignore[arg-type]
    texts = await asyncio.gather(*(g.collect() for g in generations))

    assert shared.stats().preemptions_total > before
    assert texts[-1] == STORY and generations[-1].finish_reason == "stop"
    # the grammar's end is the end-of-text token: generated and counted, but it brings no token id
    assert generations[-1].usage is not None and generations[-1].usage.completion_tokens == len(generations[-1].token_ids) + 1
    for got, want in zip(generations[:3], expected[:3], strict=True):
        assert [lp.token for lp in got.logprobs] == got.token_ids and len(got.token_ids) == LONG
        same_until_a_near_tie(got, want)


async def test_with_a_prompt_cache_idle_slots_move_their_prefixes_to_it_when_a_request_is_admitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As llama-server does: the shared KV keeps only running requests, so old prompts neither
    slow every step's attention nor fill it; a returning conversation gets its prefix back. The
    three chats are queued before the scheduler thread starts, so all are admitted at once (one
    admitted after another had finished would park that one's prefix already)."""
    with scheduler_held(monkeypatch):
        engine = load(cache_ram=64)
    with engine:
        prompts = [engine.tokenize(p) for p in PROMPTS[:3]]
        generations = [engine.submit(GenerationRequest(p, GREEDY, max_tokens=40, ignore_eos=True)) for p in prompts]
        engine._scheduler.start()
        await asyncio.gather(*(g.collect() for g in generations))
        assert engine.stats().prompt_cache_entries == 0  # nothing admitted since: the slots still hold them

        await alone(engine, engine.tokenize(PROMPTS[3]), sampling=GREEDY, max_tokens=4, ignore_eos=True)
        assert engine.stats().prompt_cache_entries >= 2  # the idle slots' prefixes (none without parking)

        for prompt, generation in zip(prompts, generations):  # each conversation comes back with its history
            history = prompt + generation.token_ids + engine.tokenize(" and then")[1:]
            returning = await alone(engine, history, sampling=GREEDY, max_tokens=4)
            assert returning.usage is not None and returning.usage.cached_tokens >= len(prompt) + 30


async def test_a_prompt_that_does_not_fit_beside_the_running_request_waits_for_room_instead_of_being_paused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Admitted at once, it would fill the cache part way through and be paused, its prefill wasted.
    Both are queued before the scheduler thread starts, so the first admission sees them together."""
    with scheduler_held(monkeypatch):
        engine = load()
    with engine:
        long_prompt = engine.tokenize(" ".join(PROMPTS * 8))[: N_CTX - 60]
        running = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), GREEDY, max_tokens=LONG, ignore_eos=True))
        waiting = engine.submit(GenerationRequest(long_prompt, GREEDY, max_tokens=50, ignore_eos=True))
        engine._scheduler.start()

        await asyncio.gather(running.collect(), waiting.collect())
        assert engine.stats().preemptions_total == 0
        assert running.finish_reason == waiting.finish_reason == "length"
        assert waiting.token_ids == (await alone(engine, long_prompt, sampling=GREEDY, max_tokens=50, ignore_eos=True)).token_ids


async def test_choices_of_requests_admitted_under_a_full_kv_cache_count_each_prompt_once_uncached() -> None:
    """Three requests of n = 2 whose choices together outgrow the cache: a later choice needs one
    cell, its first the whole prompt, so the later one was admitted first, decoded the prompt and
    lent it to its first: /metrics missed a prompt, and its usage called 249 of its tokens cached."""
    rng = np.random.default_rng(7)
    with load(n_ctx=1024, parallel=8) as engine:
        prompts = [[1, *rng.integers(3, 512, 249).tolist()] for _ in range(3)]  # they share only BOS
        request = {"sampling": GREEDY, "max_tokens": 300, "ignore_eos": True}
        generations = []
        for prompt in prompts:
            first = engine.submit(GenerationRequest(prompt, **request), choices=2)  # type: ignore[arg-type]
            generations += [first, engine.submit(GenerationRequest(prompt, **request), shares_prompt_with=first)]  # type: ignore[arg-type]
        await asyncio.gather(*(g.collect() for g in generations))
        stats = engine.stats()

    assert stats.preemptions_total > 0, "the KV cache really ran out"
    usages = [g.usage for g in generations[::2] if g.usage is not None]
    assert [u.prompt_tokens for u in usages] == [250] * 3 and all(u.cached_tokens <= 1 for u in usages), usages
    assert (stats.prompt_tokens_total, stats.cached_tokens_total) == (750, sum(u.cached_tokens for u in usages))
