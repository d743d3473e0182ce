"""Backend sampling on the CPU backend: the same tokens as host sampling, per request, in one batch.

Each comparison runs its requests in fresh engines whose scheduler starts only once all of them
are submitted (``together``), so both sides decode the very same batches. Submitted to a running
engine, the first request could start before the others arrived, one side prefilling it alone and
the other with the rest: llama.cpp then sums in another order, and a seeded draw that fell near a
boundary went the other way once in a CI run (token 32 of one of four answers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import pytest

from conftest import TINY_MODEL, scheduler_held
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine import backend_sampling
from vramsupply.engine.backend_sampling import supports

PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park", "One day, a little girl named Sue"]
SEEDED = SamplingParams(temperature=0.9, seed=7, top_k=40, top_p=0.9, min_p=0.02)


def load(backend_sampling: bool) -> Engine:
    options = EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=4, cache_ram=0, backend_sampling=backend_sampling, threads=1)
    return Engine.load(options)


async def tokens(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    generations = [engine.submit(r) for r in requests]
    await asyncio.gather(*(g.collect() for g in generations))
    return [g.token_ids for g in generations]


async def together(monkeypatch: pytest.MonkeyPatch, backend_sampling: bool, requests: list[GenerationRequest]) -> list[list[int]]:
    """``requests`` in a fresh engine, all submitted before its scheduler starts."""
    with scheduler_held(monkeypatch):
        engine = load(backend_sampling)
    with engine:
        generations = [engine.submit(r) for r in requests]
        engine._scheduler.start()
        await asyncio.gather(*(g.collect() for g in generations))
    return [g.token_ids for g in generations]


@functools.cache
def tokenized() -> dict[str, list[int]]:
    with load(False) as engine:
        return {text: engine.tokenize(text) for text in PROMPTS}


def requests(sampling: SamplingParams, **extra: object) -> list[GenerationRequest]:
    return [GenerationRequest(tokenized()[p], sampling=sampling, max_tokens=40, **extra) for p in PROMPTS]  # type: ignore[arg-type]


BIASED = {261: 5.0, 13: -100.0}


@pytest.mark.parametrize(
    "sampling, ignore_eos",
    [
        (SamplingParams(temperature=0), False),
        (SEEDED, False),
        (SamplingParams(temperature=0, logit_bias=BIASED), False),
        (dataclasses.replace(SEEDED, logit_bias=BIASED), False),
        (SamplingParams(temperature=0), True),
        (SEEDED, True),
    ],
    ids=["greedy", "seeded", "greedy-biased", "seeded-biased", "greedy-ignore-eos", "seeded-ignore-eos"],
)
async def test_concurrent_requests_sample_the_same_tokens_on_the_backend_as_on_the_host(
    sampling: SamplingParams, ignore_eos: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampled_on_device = []

    def counting(ctx: object, chain: object, row: int) -> int:
        token = real_sample(ctx, chain, row)
        sampled_on_device.append(token)
        return token

    real_sample = backend_sampling.sample
    monkeypatch.setattr(backend_sampling, "sample", counting)
    device = await together(monkeypatch, True, requests(sampling, ignore_eos=ignore_eos))
    host = await together(monkeypatch, False, requests(sampling, ignore_eos=ignore_eos))
    assert device == host
    assert all(len(t) > 0 for t in device)
    # Every token came from the graph's sampler (EOG tokens end a request without being output).
    assert len(sampled_on_device) >= sum(len(t) for t in device)


async def test_ignore_eos_holds_on_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A strong bias towards end-of-generation ends a request at once; with ``ignore_eos`` the
    graph's -inf bias wins and the request runs to its length, as on the host."""
    with load(True) as engine:
        eos = min(engine._model.eog_tokens)
    towards_eos = SamplingParams(temperature=0, logit_bias={eos: 50.0})
    assert supports(requests(towards_eos, ignore_eos=True)[0])
    on_backend = []
    real_sample = backend_sampling.sample
    monkeypatch.setattr(backend_sampling, "sample", lambda *args: on_backend.append(real_sample(*args)) or on_backend[-1])
    assert [len(t) for t in await together(monkeypatch, True, requests(towards_eos))] == [0] * len(PROMPTS)
    held = await together(monkeypatch, True, requests(towards_eos, ignore_eos=True))
    assert [len(t) for t in held] == [40] * len(PROMPTS) and eos not in sum(held, [])
    assert held == await together(monkeypatch, False, requests(towards_eos, ignore_eos=True))
    assert len(on_backend) >= 40 * len(PROMPTS) + len(PROMPTS)  # every token, and each first EOS, from the graph


async def test_requests_that_need_host_logits_fall_back_in_the_same_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [tokenized()[p] for p in PROMPTS]
    mixed = [
        GenerationRequest(prompts[0], sampling=SamplingParams(temperature=0), max_tokens=30),
        GenerationRequest(prompts[1], sampling=SamplingParams(temperature=0, repeat_penalty=1.3), max_tokens=30),
        GenerationRequest(prompts[2], sampling=SamplingParams(temperature=0, logit_bias={261: 5.0}), max_tokens=30),
        GenerationRequest(prompts[3], sampling=SamplingParams(temperature=0), max_tokens=30, ignore_eos=True),
    ]
    assert [supports(r) for r in mixed] == [True, False, True, True]
    assert await together(monkeypatch, True, mixed) == await together(monkeypatch, False, mixed)


async def test_slots_are_reused_many_times_with_their_chains_detached() -> None:
    with load(True) as engine:
        for _ in range(3):
            await tokens(engine, requests(SEEDED))
        stats = engine.stats()
    assert stats.slots_busy == 0 and stats.requests_total >= 12


def test_grammar_and_logprobs_requests_keep_host_sampling() -> None:
    grammar = GenerationRequest([1, 2], sampling=SamplingParams(grammar='root ::= "a"'))
    assert not supports(grammar)
    assert not supports(GenerationRequest([1, 2], sampling=SEEDED, logprobs=2))  # logprobs need the host's logits
    assert supports(GenerationRequest([1, 2], sampling=SEEDED))


def long_request(prompt: str, sampling: SamplingParams) -> GenerationRequest:
    return GenerationRequest(tokenized()[prompt], sampling=sampling, max_tokens=200, ignore_eos=True)


async def paused_on_the_backend(
    monkeypatch: pytest.MonkeyPatch, sampling: SamplingParams, prompts: list[str], on_backend: bool = True,
) -> list[list[int]]:
    """Four 200-token answers (on the backend unless told): together they outgrow the 256-cell KV
    cache, so requests are paused and resumed (``preempt.py``)."""
    with scheduler_held(monkeypatch):
        engine = load(on_backend)
    with engine:
        generations = [engine.submit(long_request(p, sampling)) for p in prompts]
        engine._scheduler.start()
        await asyncio.gather(*(g.collect() for g in generations))
        assert engine.stats().preemptions_total > 0, "the KV cache really ran out"
    return [g.token_ids for g in generations]


async def test_a_request_paused_for_kv_room_is_attached_again_when_it_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each resumed request goes back to the graph with a clone of its chain (llama.cpp prepares a
    chain for the graph only once: a second time aborted the process) and, greedy, gives the tokens
    host sampling gives through the very same pauses. (Not always those of an unpaused run: a
    resumed request's KV sits in other cells, and without flash attention, the default on an Intel
    CPU with AMX, llama.cpp then sums in another order; one answer here parted at token 186.)"""
    paused = await paused_on_the_backend(monkeypatch, SamplingParams(temperature=0), PROMPTS)
    assert [len(a) for a in paused] == [200] * len(PROMPTS)
    assert paused == await paused_on_the_backend(monkeypatch, SamplingParams(temperature=0), PROMPTS, on_backend=False)


async def test_a_seeded_request_paused_and_resumed_on_the_backend_runs_to_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded, a resumed request's tokens may differ from an unpaused run's (see the README): this
    only holds that every request is served whole, from the graph, with no crash."""
    answers = await paused_on_the_backend(monkeypatch, SEEDED, PROMPTS)
    assert [len(a) for a in answers] == [200] * len(PROMPTS)
