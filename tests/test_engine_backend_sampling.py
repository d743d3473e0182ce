"""Backend sampling on the CPU backend: the same tokens as host sampling, per request, in one batch."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine import backend_sampling
from vramsupply.engine.backend_sampling import supports

PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park", "One day, a little girl named Sue"]
SEEDED = SamplingParams(temperature=0.9, seed=7, top_k=40, top_p=0.9, min_p=0.02)


def load(backend_sampling: bool) -> Engine:
    options = EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=4, cache_ram=0, backend_sampling=backend_sampling, threads=1)
    return Engine.load(options)


@pytest.fixture(scope="module")
def on_device() -> Iterator[Engine]:
    with load(True) as engine:
        yield engine


@pytest.fixture(scope="module")
def on_host() -> Iterator[Engine]:
    with load(False) as engine:
        yield engine


async def tokens(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    generations = [engine.submit(r) for r in requests]
    await asyncio.gather(*(g.collect() for g in generations))
    return [g.token_ids for g in generations]


def requests(engine: Engine, sampling: SamplingParams, **extra: object) -> list[GenerationRequest]:
    return [GenerationRequest(engine.tokenize(p), sampling=sampling, max_tokens=40, **extra) for p in PROMPTS]


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
    on_device: Engine, on_host: Engine, sampling: SamplingParams, ignore_eos: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampled_on_device = []

    def counting(ctx: object, chain: object, row: int) -> int:
        token = real_sample(ctx, chain, row)
        sampled_on_device.append(token)
        return token

    real_sample = backend_sampling.sample
    monkeypatch.setattr(backend_sampling, "sample", counting)
    device = await tokens(on_device, requests(on_device, sampling, ignore_eos=ignore_eos))
    host = await tokens(on_host, requests(on_host, sampling, ignore_eos=ignore_eos))
    assert device == host
    assert all(len(t) > 0 for t in device)
    # Every token came from the graph's sampler (EOG tokens end a request without being output).
    assert len(sampled_on_device) >= sum(len(t) for t in device)


async def test_ignore_eos_holds_on_the_backend(on_device: Engine, on_host: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A strong bias towards end-of-generation ends a request at once; with ``ignore_eos`` the
    graph's -inf bias wins and the request runs to its length, as on the host."""
    eos = min(on_device._model.eog_tokens)
    towards_eos = SamplingParams(temperature=0, logit_bias={eos: 50.0})
    assert supports(requests(on_device, towards_eos, ignore_eos=True)[0])
    on_backend = []
    real_sample = backend_sampling.sample
    monkeypatch.setattr(backend_sampling, "sample", lambda *args: on_backend.append(real_sample(*args)) or on_backend[-1])
    assert [len(t) for t in await tokens(on_device, requests(on_device, towards_eos))] == [0] * len(PROMPTS)
    held = await tokens(on_device, requests(on_device, towards_eos, ignore_eos=True))
    assert [len(t) for t in held] == [40] * len(PROMPTS) and eos not in sum(held, [])
    assert held == await tokens(on_host, requests(on_host, towards_eos, ignore_eos=True))
    assert len(on_backend) >= 40 * len(PROMPTS) + len(PROMPTS)  # every token, and each first EOS, from the graph


async def test_requests_that_need_host_logits_fall_back_in_the_same_batch(on_device: Engine, on_host: Engine) -> None:
    mixed = [
        GenerationRequest(on_device.tokenize(PROMPTS[0]), sampling=SamplingParams(temperature=0), max_tokens=30),
        GenerationRequest(on_device.tokenize(PROMPTS[1]), sampling=SamplingParams(temperature=0, repeat_penalty=1.3), max_tokens=30),
        GenerationRequest(on_device.tokenize(PROMPTS[2]), sampling=SamplingParams(temperature=0, logit_bias={261: 5.0}), max_tokens=30),
        GenerationRequest(on_device.tokenize(PROMPTS[3]), sampling=SamplingParams(temperature=0), max_tokens=30, ignore_eos=True),
    ]
    assert [supports(r) for r in mixed] == [True, False, True, True]
    assert await tokens(on_device, mixed) == await tokens(on_host, mixed)


async def test_slots_are_reused_many_times_with_their_chains_detached(on_device: Engine) -> None:
    for _ in range(3):
        await tokens(on_device, requests(on_device, SEEDED))
    stats = on_device.stats()
    assert stats.slots_busy == 0 and stats.requests_total >= 12


def test_grammar_and_logprobs_requests_keep_host_sampling() -> None:
    grammar = GenerationRequest([1, 2], sampling=SamplingParams(grammar='root ::= "a"'))
    assert not supports(grammar)
    assert not supports(GenerationRequest([1, 2], sampling=SEEDED, logprobs=2))  # logprobs need the host's logits
    assert supports(GenerationRequest([1, 2], sampling=SEEDED))


def long_request(engine: Engine, prompt: str, sampling: SamplingParams) -> GenerationRequest:
    return GenerationRequest(engine.tokenize(prompt), sampling=sampling, max_tokens=200, ignore_eos=True)


async def paused_on_the_backend(sampling: SamplingParams, prompts: list[str]) -> list[list[int]]:
    """Four 200-token answers on the backend: together they outgrow the 256-cell KV cache, so
    requests are paused and resumed (``preempt.py``)."""
    with load(True) as engine:
        before = engine.stats().preemptions_total
        answers = await tokens(engine, [long_request(engine, p, sampling) for p in prompts])
        assert engine.stats().preemptions_total > before, "the KV cache really ran out"
    return answers


async def test_a_request_paused_for_kv_room_is_attached_again_when_it_resumes() -> None:
    """Each resumed request goes back to the graph with a clone of its chain (llama.cpp prepares a
    chain for the graph only once: a second time aborted the process) and, greedy, gives the tokens
    it gives alone on the host."""
    together = await paused_on_the_backend(SamplingParams(temperature=0), PROMPTS)
    with load(False) as engine:
        alone = [(await tokens(engine, [long_request(engine, p, SamplingParams(temperature=0))]))[0] for p in PROMPTS]
    assert together == alone


async def test_a_seeded_request_paused_and_resumed_on_the_backend_runs_to_its_end() -> None:
    """Seeded, a resumed request's tokens may differ from an unpaused run's (see the README): this
    only holds that every request is served whole, from the graph, with no crash."""
    answers = await paused_on_the_backend(SEEDED, PROMPTS)
    assert [len(a) for a in answers] == [200] * len(PROMPTS)
