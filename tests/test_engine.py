"""The engine on the real tiny model: limits, reuse, cancellation, queueing, closing (its tokens: test_engine_decoding)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest
from llama_cpp import Llama

from conftest import TINY_MODEL
from vramsupply.engine import (
    ContextOverflow,
    Engine,
    EngineClosed,
    EngineError,
    EngineOptions,
    Generation,
    GenerationRequest,
    Overloaded,
    SamplingParams,
)

N_CTX = 256
PARALLEL = 4
MAX_QUEUE = 4
GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "Once upon a time",
    "The dog",
    "Lily and Tom went to the park",
    "One day, a little girl named Sue found a big box",
    "The sun",
    "Tim had a red ball. He",
]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """Flash attention off, as ``reference`` runs (llama-cpp-python's ``flash_attn=False``), on every
    CPU: ``auto`` is on except on an Intel CPU with AMX, and the comparisons below want like with like."""
    options = EngineOptions(model_path=TINY_MODEL, n_ctx=N_CTX, parallel=PARALLEL, max_queue=MAX_QUEUE, threads=1, flash_attention="off")
    with Engine.load(options) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def reference() -> Iterator[Llama]:
    """llama-cpp-python's own single-sequence generator, to check our batched decoding against."""
    llama = Llama(model_path=str(TINY_MODEL), n_ctx=N_CTX, verbose=False)
    yield llama
    llama.close()


def reference_greedy(llama: Llama, prompt: list[int], n: int) -> list[int]:
    llama.reset()
    tokens = []
    for token in llama.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        if len(tokens) == n:
            break
        tokens.append(token)
    return tokens


async def run(engine: Engine, prompt: str | list[int], **request: object) -> Generation:
    tokens = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    generation = engine.submit(GenerationRequest(tokens, **request))
    await generation.collect()
    return generation


async def wait_until_idle(engine: Engine) -> None:
    for _ in range(500):
        stats = engine.stats()
        if stats.slots_busy == 0 and stats.queue_depth == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


async def test_prompt_that_fills_the_context_raises_before_any_work(engine: Engine) -> None:
    before = engine.stats()
    with pytest.raises(ContextOverflow) as error:
        engine.submit(GenerationRequest([1] + [403] * (N_CTX - 1), GREEDY))
    assert (error.value.prompt_tokens, error.value.n_ctx) == (N_CTX, N_CTX)
    overflow = r"the prompt \(5 tokens\) plus max_tokens \(252\) is 257 tokens, more than the context of 256"
    with pytest.raises(ContextOverflow, match=overflow):
        engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), GREEDY, max_tokens=N_CTX - 4))
    assert engine.stats() == before


async def test_without_max_tokens_generation_stops_when_the_context_is_full(engine: Engine) -> None:
    prompt = engine.tokenize(" ".join(PROMPTS * 4))
    generation = await run(engine, prompt, sampling=GREEDY, ignore_eos=True)
    assert generation.finish_reason == "length"
    assert generation.usage.prompt_tokens + generation.usage.completion_tokens == N_CTX


async def test_bad_prompt_tokens_are_rejected(engine: Engine) -> None:
    for prompt, error in (([1, 100000], "not in the vocabulary"), ([1, -5], "not in the vocabulary"), ([1.5], "integer")):
        with pytest.raises(ValueError, match=error):
            engine.submit(GenerationRequest(prompt, GREEDY))


async def test_prefix_reuse_is_reported_in_cached_tokens(engine: Engine, reference: Llama) -> None:
    prompt = engine.tokenize("Once upon a time, in a small house by the sea, there lived a kind old man and his cat.")
    first = await run(engine, prompt, sampling=GREEDY, max_tokens=8)
    # The KV cache now holds the prompt plus every generated token but the last (never decoded).
    held = prompt + first.token_ids[:-1]

    repeat = await run(engine, prompt, sampling=GREEDY, max_tokens=8)
    assert repeat.usage.cached_tokens == len(prompt) - 1  # the last prompt token is decoded again
    assert repeat.token_ids == first.token_ids

    follow_up = prompt + first.token_ids[:4] + engine.tokenize(" The cat was sad.", add_special=False)
    before = engine.stats()
    continued = await run(engine, follow_up, sampling=GREEDY, max_tokens=8)
    expected_cached = len(prompt) + 4 + _common_prefix(held[len(prompt) + 4 :], follow_up[len(prompt) + 4 :])
    assert continued.usage.cached_tokens == expected_cached
    assert continued.usage.prompt_tokens == len(follow_up)
    assert engine.stats().cached_tokens_total - before.cached_tokens_total == expected_cached
    assert continued.token_ids == reference_greedy(reference, follow_up, 8)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_cancel_frees_the_slot(engine: Engine, how: str) -> None:
    await wait_until_idle(engine)
    generation = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), GREEDY, max_tokens=200, ignore_eos=True))
    await generation.__anext__()
    assert engine.stats().slots_busy == 1
    if how == "cancel":
        generation.cancel()
    else:
        await generation.aclose()
    rest = [delta async for delta in generation]
    assert generation.finish_reason == "cancelled"
    assert 1 <= generation.usage.completion_tokens < 200
    assert generation.usage.completion_tokens == len(generation.token_ids)  # billed exactly what was streamed
    assert len("".join(rest)) < 200
    assert engine.stats().slots_busy == 0


async def test_dropping_an_unfinished_generation_cancels_it(engine: Engine) -> None:
    await wait_until_idle(engine)
    before = engine.stats().completion_tokens_total
    generation = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[1]), GREEDY, max_tokens=200, ignore_eos=True))
    await generation.__anext__()
    del generation
    gc.collect()
    await wait_until_idle(engine)
    assert engine.stats().completion_tokens_total - before < 200


def test_requests_of_a_closed_event_loop_are_cancelled(engine: Engine) -> None:
    """A consumer loop that went away can never read its output: the scheduler frees its slot."""

    async def submit_and_leave() -> Generation:
        generation = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[2]), GREEDY, max_tokens=200, ignore_eos=True))
        await generation.__anext__()
        return generation

    before = engine.stats().completion_tokens_total
    orphan = asyncio.run(submit_and_leave())
    for _ in range(500):
        if engine.stats().slots_busy == 0:
            break
        time.sleep(0.01)
    assert engine.stats().slots_busy == 0
    assert engine.stats().completion_tokens_total - before < 200
    assert not orphan.done  # nobody is left to deliver the ending to


async def test_a_request_whose_choices_do_not_all_fit_in_the_queue_is_refused_whole(engine: Engine) -> None:
    """Room for two more, and a request with three choices: none of them is queued (before, the
    first two were started, then cancelled when the third was refused)."""
    await wait_until_idle(engine)
    long = dict(sampling=GREEDY, max_tokens=200, ignore_eos=True)
    accepted = [engine.submit(GenerationRequest(engine.tokenize(p), **long)) for p in (PROMPTS * 2)[: PARALLEL + MAX_QUEUE - 2]]
    requests_before = engine.stats().requests_total

    with pytest.raises(Overloaded, match="this request's 3 choices need 3 of them"):
        engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), **long), choices=3)

    assert engine.stats().requests_total == requests_before
    two = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), **long), choices=2)
    engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), **long), shares_prompt_with=two, choices=2)
    assert engine.stats().requests_total == requests_before + 1, "a request counts once, whatever its n"
    for generation in accepted:
        generation.cancel()
    await wait_until_idle(engine)


async def test_places_reserved_for_a_batch_are_kept_from_requests_arriving_between_its_prompts(engine: Engine) -> None:
    """A batch of prompts is admitted one prompt after another; a buyer arriving in between must
    not take the places the batch's later prompts need (they would be a 429 after the first had
    started), and places the batch did not use come back to everyone."""
    await wait_until_idle(engine)
    long = dict(sampling=GREEDY, max_tokens=200, ignore_eos=True)
    accepted = [engine.submit(GenerationRequest(engine.tokenize(p), **long)) for p in (PROMPTS * 2)[: PARALLEL + MAX_QUEUE - 3]]
    batch = []
    with engine.reserve(3) as places:
        batch.append(engine.submit(GenerationRequest(engine.tokenize(PROMPTS[1]), **long), reservation=places))
        with pytest.raises(Overloaded):  # the one place left after the batch's is not free
            engine.submit(GenerationRequest(engine.tokenize(PROMPTS[2]), **long))
        batch.append(engine.submit(GenerationRequest(engine.tokenize(PROMPTS[3]), **long), reservation=places))
    # The batch used 2 of its 3 places (its last prompt was refused, say): the third is free again.
    latecomer = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[2]), **long))
    with pytest.raises(Overloaded):
        engine.submit(GenerationRequest(engine.tokenize(PROMPTS[4]), **long))
    with pytest.raises(Overloaded, match="this request's 2 choices need 2"):
        with engine.reserve(2):
            pass
    for generation in [*accepted, *batch, latecomer]:
        generation.cancel()
    await wait_until_idle(engine)
    with engine.reserve(PARALLEL + MAX_QUEUE):  # every place came back
        pass


async def test_a_submit_that_comes_after_its_reservation_was_given_back_takes_no_place_it_does_not_have(engine: Engine) -> None:
    """A grammar request is submitted from a worker thread; a buyer who hangs up meanwhile gives
    the reservation back while that thread still runs. Its late submit took a place from the
    reservation anyway, which left the count of reserved places at -1: one more request than
    slots and queue places was admitted after each such hang-up."""
    await wait_until_idle(engine)
    long = dict(sampling=GREEDY, max_tokens=200, ignore_eos=True)
    with engine.reserve(1) as places:
        pass  # the buyer left before its request was submitted
    late = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), **long), reservation=places)
    late.cancel()
    await wait_until_idle(engine)
    accepted = [engine.submit(GenerationRequest(engine.tokenize(p), **long)) for p in (PROMPTS * 2)[: PARALLEL + MAX_QUEUE]]
    with pytest.raises(Overloaded):  # exactly the slots and the queue's places, not one more
        engine.submit(GenerationRequest(engine.tokenize(PROMPTS[1]), **long))
    for generation in accepted:
        generation.cancel()
    await wait_until_idle(engine)


async def test_a_request_cancelled_while_queued_counts_no_prompt_tokens_anywhere(engine: Engine) -> None:
    """The earnings ledger records the usage of a request its buyer left; one that left while still
    queued was recorded with its whole prompt, which the engine's counters (heartbeats, /metrics)
    never counted."""
    await wait_until_idle(engine)
    long = dict(sampling=GREEDY, max_tokens=200, ignore_eos=True)
    before = engine.stats()
    running = [engine.submit(GenerationRequest(engine.tokenize(p), **long)) for p in PROMPTS[:PARALLEL]]
    for _ in range(500):
        if engine.stats().slots_busy == PARALLEL:
            break
        await asyncio.sleep(0.01)
    queued = [engine.submit(GenerationRequest(engine.tokenize(p), **long)) for p in PROMPTS[:2]]
    for generation in queued + running:
        generation.cancel()
    for generation in queued + running:
        await generation.collect()

    assert [g.usage.prompt_tokens for g in queued] == [0, 0]
    counted = engine.stats().prompt_tokens_total - before.prompt_tokens_total
    assert counted == sum(g.usage.prompt_tokens for g in queued + running) == sum(len(engine.tokenize(p)) for p in PROMPTS[:PARALLEL])


async def test_queue_overflow_raises_overloaded(engine: Engine) -> None:
    await wait_until_idle(engine)
    long = dict(sampling=GREEDY, max_tokens=200, ignore_eos=True)
    accepted = [engine.submit(GenerationRequest(engine.tokenize(p), **long)) for p in (PROMPTS * 2)[: PARALLEL + MAX_QUEUE]]
    with pytest.raises(Overloaded, match=f"{PARALLEL + MAX_QUEUE} requests are running or waiting, for {PARALLEL} slots and {MAX_QUEUE} places"):
        engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), **long))
    stats = engine.stats()
    assert stats.slots_busy + stats.queue_depth == PARALLEL + MAX_QUEUE
    for generation in accepted:
        generation.cancel()
    for generation in accepted:
        await generation.collect()
        assert generation.finish_reason == "cancelled"
    assert sum(g.usage.completion_tokens for g in accepted) < (PARALLEL + MAX_QUEUE) * 200
    await wait_until_idle(engine)


async def test_chat_without_a_model_template_uses_the_chatml_fallback(engine: Engine) -> None:
    assert engine.chat_template_is_fallback
    assert engine.chat_stop == ("<|im_end|>",)
    messages = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A story about a cat"}]
    rendered = (
        "<|im_start|>system\nYou tell stories.<|im_end|>\n"
        "<|im_start|>user\nA story about a cat<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert engine.tokenize_chat(messages) == engine.tokenize(rendered)
    with pytest.raises(ValueError, match="role"):
        engine.tokenize_chat([{"role": "narrator", "content": "x"}])


async def test_stats_count_every_token(engine: Engine) -> None:
    await wait_until_idle(engine)
    before = engine.stats()
    generation = await run(engine, PROMPTS[4], sampling=GREEDY, max_tokens=6)
    after = engine.stats()
    assert after.requests_total - before.requests_total == 1
    assert after.prompt_tokens_total - before.prompt_tokens_total == generation.usage.prompt_tokens
    assert after.completion_tokens_total - before.completion_tokens_total == 6
    assert (after.slots_total, after.slots_busy, after.queue_depth) == (PARALLEL, 0, 0)


async def test_long_prompts_are_prefilled_in_chunks_alongside_generation(engine: Engine) -> None:
    """With n_batch 16 a 100-token prompt takes several steps while another slot keeps generating."""
    long_prompt = engine.tokenize(" ".join(PROMPTS * 2))
    assert len(long_prompt) > 60
    request = dict(sampling=GREEDY, max_tokens=20, ignore_eos=True)
    expected = [(await run(engine, p, **request)).token_ids for p in (PROMPTS[0], long_prompt)]
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=N_CTX, parallel=2, n_batch=16, n_ubatch=8)) as small:
        assert small.n_batch == 16
        short = small.submit(GenerationRequest(small.tokenize(PROMPTS[0]), **request))
        await short.__anext__()
        long = small.submit(GenerationRequest(long_prompt, **request))
        await asyncio.gather(short.collect(), long.collect())
        assert [short.token_ids, long.token_ids] == expected


async def test_close_fails_pending_generations_and_refuses_new_ones() -> None:
    engine = Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=N_CTX, parallel=1, max_queue=1))
    running = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), GREEDY, max_tokens=200, ignore_eos=True))
    await running.__anext__()
    waiting = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[1]), GREEDY, max_tokens=5))
    engine.close()
    for generation in (running, waiting):
        with pytest.raises(EngineClosed):
            await generation.collect()
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest([1, 2], GREEDY))
    with pytest.raises(EngineClosed):
        engine.tokenize("hello")
    engine.close()


def test_loading_a_missing_or_invalid_model_raises_engine_error(tmp_path) -> None:
    with pytest.raises(EngineError, match="model file not found"):
        Engine.load(EngineOptions(model_path=tmp_path / "missing.gguf"))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(EngineError, match="could not load"):
        Engine.load(EngineOptions(model_path=bogus))


def test_context_beyond_the_models_training_context_is_capped(caplog: pytest.LogCaptureFixture) -> None:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=100_000, parallel=1)) as capped:
        assert capped.n_ctx == 2048
        assert capped.options.n_ctx == 2048
    assert "context_length 100000 is more than" in caplog.text
