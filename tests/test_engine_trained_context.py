"""A model trained on a short context, served with a long one (llama-server's -c with -np):
requests are cut to what the model was trained on, and the slots keep the shared cache's room."""

from __future__ import annotations

import asyncio
import logging

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.trained_context import ServedContext, served_context
from vramsupply.config import Settings
from vramsupply.engine.types import ContextOverflow
from vramsupply.hub.local import local_model
from vramsupply.serve.options import engine_options

TRAINED = 2048  # stories260K's llama.context_length


def test_requests_are_cut_to_the_training_context_and_a_shared_cache_keeps_its_room() -> None:
    assert served_context(4096, 16, False, 32768) == ServedContext(4096, 4096)  # within training: as configured
    assert served_context(4096, 16, False, 0) == ServedContext(4096, 4096)  # unknown training context: no cap
    assert served_context(131072, 64, False, 4096) == ServedContext(4096, 131072)  # the H200 bench's 64 slots
    assert served_context(131072, 4, False, 4096) == ServedContext(4096, 16384)  # no more than 4 requests fill
    assert served_context(131072, 1, False, 4096) == ServedContext(4096, 4096)
    assert served_context(131072, 4, True, 4096) == ServedContext(4096, 4096)  # per slot: one request's cache


async def test_four_long_requests_run_side_by_side_on_a_model_trained_on_less(caplog: pytest.LogCaptureFixture) -> None:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=8192, parallel=4, threads=1, cache_ram=0)) as engine:
        assert engine.n_ctx == TRAINED
        assert engine.kv_tokens >= 8192
        assert "serving requests of up to 2048 tokens, one KV cache of 8192 tokens shared by the slots" in caplog.text
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [w for w in warnings if "n_ctx_train" in w], "llama.cpp's overflow warning is not repeated: requests are capped"

        prompts = [engine.tokenize(f"Once upon a time, {name} went to the park") for name in ("Tom", "Lily", "Sam", "Mia")]
        generations = [
            engine.submit(GenerationRequest(p, sampling=SamplingParams(temperature=0), max_tokens=1100, ignore_eos=True)) for p in prompts
        ]
        await asyncio.gather(*(g.collect() for g in generations))

        assert [len(g.token_ids) for g in generations] == [1100] * 4
        assert engine.stats().preemptions_total == 0, "four requests of ~1110 tokens (4,440 in all, over twice the 2,048 trained) fit the 8192-token cache together"
        with pytest.raises(ContextOverflow):
            engine.submit(GenerationRequest(prompts[0], max_tokens=TRAINED))  # past the training context


@pytest.mark.parametrize(("asked", "level"), [(False, logging.INFO), (True, logging.WARNING)])
def test_the_default_context_capped_by_training_is_told_at_info_and_an_asked_one_warned(
    caplog: pytest.LogCaptureFixture, asked: bool, level: int
) -> None:
    """The default context (8192) is longer than many models were trained on; that is no warning,
    but a --context-length the model cannot honour is."""
    caplog.set_level(logging.INFO)
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=8192, n_ctx_explicit=asked, parallel=2, threads=1, cache_ram=0)):
        told = [r.levelno for r in caplog.records if "is more than llama was trained on" in r.getMessage()]
    assert told == [level]


def test_serve_counts_the_context_as_asked_only_when_the_user_set_it() -> None:
    model = local_model(str(TINY_MODEL))
    assert not engine_options(Settings(), model).n_ctx_explicit
    assert engine_options(Settings(context_length=8192), model).n_ctx_explicit
    planned = Settings().model_copy(update={"context_length": 6144})  # what the memory plan sets is not asked
    assert not engine_options(planned, model, explicit=set()).n_ctx_explicit
