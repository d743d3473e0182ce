"""The engine decodes once before it says it is ready, and a model that cannot decode fails at load."""

from __future__ import annotations

import asyncio
import logging
import threading

import llama_cpp
import pytest
from llama_cpp import Llama

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.model import Model, create_context
from vramsupply.engine.types import EngineError
from vramsupply.engine.warmup import warm_up

OPTIONS = EngineOptions(model_path=TINY_MODEL, n_ctx=128, parallel=2, threads=1)


@pytest.fixture
def context():
    model = Model.load(TINY_MODEL, 0)
    context = create_context(model, OPTIONS)
    yield model, context
    context.close()
    model.close()


def positions(context) -> list[int]:
    return [llama_cpp.llama_memory_seq_pos_max(context.memory, seq) for seq in range(OPTIONS.parallel)]


def test_the_warm_up_decodes_with_every_expert_and_leaves_the_cache_empty(context, monkeypatch) -> None:
    model, ctx = context
    flags: list[bool] = []
    real = llama_cpp.llama_set_warmup
    monkeypatch.setattr(llama_cpp, "llama_set_warmup", lambda c, on: (flags.append(on), real(c, on))[1])
    decoded: list[int] = []
    real_decode = llama_cpp.llama_decode
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda c, batch: (decoded.append(batch.n_tokens), real_decode(c, batch))[1])

    assert warm_up(ctx, model.vocab) > 0
    assert flags == [True, False]  # on for the decode (every expert of a MoE model), off for requests
    assert decoded == [2]  # BOS and EOS
    assert positions(ctx) == [-1, -1]


def test_a_model_that_cannot_decode_fails_at_load_not_at_its_first_request(context, monkeypatch) -> None:
    model, ctx = context
    flags: list[bool] = []
    real = llama_cpp.llama_set_warmup
    monkeypatch.setattr(llama_cpp, "llama_set_warmup", lambda c, on: (flags.append(on), real(c, on))[1])
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda c, batch: -3)
    with pytest.raises(EngineError, match="could not run the model on this machine"):
        warm_up(ctx, model.vocab)
    assert flags == [True, False]  # and requests would run without it


def test_a_loaded_engine_has_warmed_up_and_answers_as_a_cold_context_does(caplog) -> None:
    caplog.set_level(logging.INFO, logger="vramsupply.engine.warmup")
    reference = Llama(model_path=str(TINY_MODEL), n_ctx=OPTIONS.n_ctx, verbose=False)  # never warmed up by us
    try:
        prompt = reference.tokenize(b"Once upon a time")
        expected = [t for _, t in zip(range(12), reference.generate(prompt, temp=0.0, repeat_penalty=1.0))]
    finally:
        reference.close()
    with Engine.load(OPTIONS) as engine:
        assert any("warmed up in" in record.getMessage() for record in caplog.records)
        first = asyncio.run(answer(engine, prompt))
    assert first == expected


def test_the_warm_up_decodes_on_the_scheduler_thread_like_every_step(monkeypatch) -> None:
    """A decode on the loading thread would leave it an OpenMP team of its own, and with two teams
    every later step of a CPU build ran about 1.5 times slower (``scheduler.py``)."""
    threads: list[str] = []
    real_decode = llama_cpp.llama_decode
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda c, batch: (threads.append(threading.current_thread().name), real_decode(c, batch))[1])
    with Engine.load(OPTIONS) as engine:
        warm_up_threads = list(threads)
        asyncio.run(answer(engine, engine.tokenize("Once upon a time")))
    assert warm_up_threads == ["vramsupply-scheduler"]  # decoded before load returned
    assert len(threads) > 1 and set(threads) == {"vramsupply-scheduler"}


def test_an_engine_whose_warm_up_fails_does_not_load_and_leaves_no_thread(monkeypatch) -> None:
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda c, batch: -3)
    before = set(threading.enumerate())
    with pytest.raises(EngineError, match="could not run the model on this machine"):
        Engine.load(OPTIONS)
    assert not [t for t in set(threading.enumerate()) - before if t.name == "vramsupply-scheduler"]


async def answer(engine: Engine, prompt: list[int]) -> list[int]:
    generation = engine.submit(GenerationRequest(prompt, SamplingParams(temperature=0.0), max_tokens=12))
    await generation.collect()
    return generation.token_ids
