"""Logprobs from the engine agree with llama-cpp-python's own ``Llama`` on the same model and prompt."""

from __future__ import annotations

import math

import numpy as np
import pytest
from llama_cpp import Llama

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.logprobs import logprobs_from_logits

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def engine() -> Engine:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=2, threads=1)) as loaded:
        yield loaded


async def test_greedy_logprobs_match_a_reference_log_softmax(engine: Engine) -> None:
    prompt = engine.tokenize(PROMPT)
    generation = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0), max_tokens=6, logprobs=5))
    await generation.collect()
    entries = generation.logprobs

    llama = Llama(model_path=str(TINY_MODEL), n_ctx=256, logits_all=True, verbose=False)
    try:
        llama.eval(prompt + generation.token_ids)
        for i, entry in enumerate(entries):
            logits = np.asarray(llama.scores[len(prompt) - 1 + i], dtype=np.float64)
            reference = logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())
            assert entry.token == generation.token_ids[i] == int(np.argmax(logits))
            assert entry.logprob == pytest.approx(reference[entry.token], abs=1e-3)
            assert [t for t, _ in entry.top] == list(np.argsort(-reference, kind="stable")[:5])
    finally:
        llama.close()


async def test_requests_without_logprobs_get_none(engine: Engine) -> None:
    generation = engine.submit(GenerationRequest(engine.tokenize(PROMPT), SamplingParams(temperature=0), max_tokens=4))
    await generation.collect()
    assert generation.logprobs == []


def test_log_softmax_is_a_distribution() -> None:
    logits = np.array([2.0, 1.0, 0.5, -3.0, 40.0])
    entry = logprobs_from_logits(logits, token=1, top_n=3)
    assert [t for t, _ in entry.top] == [4, 0, 1]
    assert all(lp <= 0 for _, lp in entry.top) and entry.logprob <= 0
    assert sum(math.exp(v) for v in logits - logits.max() - math.log(np.exp(logits - logits.max()).sum())) == pytest.approx(1)
    assert logprobs_from_logits(logits, token=4, top_n=0).top == ()
