"""A greedy request's token is one argmax over the logits, and it is the token llama.cpp's chain picks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import llama_cpp
import numpy as np
import pytest

from conftest import TINY_MODEL
from vramsupply.engine.batch import Batch
from vramsupply.engine.model import Model, create_context
from vramsupply.engine.sampling import StepWinners, build_sampler
from vramsupply.engine.types import EngineError, EngineOptions, SamplingParams

PROMPTS = ["Once upon a time", "Tom and Lily went to the park. They saw a big", "The cat", "Sue had a red"]


def decode_prompts(add: Callable[[Batch, list[int], int], int]) -> tuple[Model, object, Batch, list[tuple[list[int], int]]]:
    """Each prompt in its own sequence, added by ``add`` (which returns the row of its last token's logits)."""
    options = EngineOptions(model_path=TINY_MODEL, n_ctx=128, parallel=len(PROMPTS), threads=1)
    model = Model.load(options.model_path, options.n_gpu_layers, options.gpu)
    context = create_context(model, options)
    batch = Batch(256)
    rows = []
    for seq, text in enumerate(PROMPTS):
        tokens = model.tokenize(text, True)
        rows.append((tokens, add(batch, tokens, seq)))
    assert llama_cpp.llama_decode(context.ctx, batch.for_decode()) == 0
    return model, context, batch, rows


@pytest.fixture(scope="module")
def decoded() -> Iterator[tuple[Model, object, Batch, list[tuple[list[int], int]]]]:
    """Every token of every prompt asks for logits."""
    model, context, batch, rows = decode_prompts(lambda batch, tokens, seq: [batch.add(t, p, seq) for p, t in enumerate(tokens)][-1])
    yield model, context, batch, rows
    context.close()


@pytest.fixture(scope="module")
def one_step() -> Iterator[tuple[Model, object, Batch, list[tuple[list[int], int]]]]:
    """The prompts as one step's chunks, as the scheduler adds them: logits for each last token only."""
    model, context, batch, rows = decode_prompts(
        lambda batch, tokens, seq: batch.add_chunk(np.array(tokens, dtype=np.int32), 0, seq, logits_for_last=True)
    )
    yield model, context, batch, rows
    context.close()


def chain_pick(model: Model, context: object, tokens: list[int], row: int, params: SamplingParams, ignore_eos: bool) -> int:
    sampler = build_sampler(params, model, tokens, ignore_eos)
    sampler.argmax = None  # the llama.cpp chain this shortcut stands in for
    try:
        return sampler.sample(context.ctx, row)  # type: ignore[attr-defined]
    finally:
        sampler.close()


@pytest.mark.parametrize(
    "params, ignore_eos",
    [
        (SamplingParams(temperature=0), False),
        (SamplingParams(temperature=0), True),
        (SamplingParams(temperature=0, logit_bias={13: 100.0}), False),
        (SamplingParams(temperature=0, logit_bias={13: -100.0, 29: 2.5, 400: 7.0}), True),
    ],
)
def test_argmax_picks_what_the_chain_picks(decoded: tuple, params: SamplingParams, ignore_eos: bool) -> None:
    model, context, _, rows = decoded
    for tokens, row in rows:
        sampler = build_sampler(params, model, tokens, ignore_eos)
        assert sampler.argmax is not None
        try:
            assert sampler.sample(context.ctx, row) == chain_pick(model, context, tokens, row, params, ignore_eos)
        finally:
            sampler.close()


def test_a_bias_can_force_the_token(decoded: tuple) -> None:
    model, context, _, rows = decoded
    tokens, row = rows[0]
    sampler = build_sampler(SamplingParams(temperature=0, logit_bias={300: math.inf}), model, tokens, False)
    assert sampler.sample(context.ctx, row) == 300
    sampler.close()


def test_sampled_penalized_or_grammar_requests_keep_the_chain(decoded: tuple) -> None:
    model, _, _, rows = decoded
    tokens, _ = rows[0]
    for params in (SamplingParams(temperature=0.8), SamplingParams(temperature=0, repeat_penalty=1.3), SamplingParams(temperature=0, grammar='root ::= "a"')):
        sampler = build_sampler(params, model, tokens, False)
        assert sampler.argmax is None
        sampler.close()


def test_one_argmax_for_the_whole_step_picks_what_the_chain_picks(one_step: tuple) -> None:
    model, context, batch, rows = one_step
    winners = StepWinners(model.n_vocab, batch)
    raw = [winners.of(context.ctx, row) for _, row in rows]
    assert len(set(raw)) > 1  # the rows' winners differ: each row is read from its own logits
    lowered_winner = {raw[0]: -3.0}  # a bias that lowers the first row's winner: that row takes the per-row path
    for params, ignore_eos in [
        (SamplingParams(temperature=0), False),
        (SamplingParams(temperature=0), True),
        (SamplingParams(temperature=0, logit_bias=lowered_winner), True),
        (SamplingParams(temperature=0, logit_bias={13: -100.0, 29: 2.5}), False),
    ]:
        for tokens, row in rows:
            sampler = build_sampler(params, model, tokens, ignore_eos)
            try:
                picked = sampler.sample(context.ctx, row, winners)
            finally:
                sampler.close()
            assert picked == chain_pick(model, context, tokens, row, params, ignore_eos)
    first_tokens, first_row = rows[0]
    lowered = build_sampler(SamplingParams(temperature=0, logit_bias={raw[0]: -100.0}), model, first_tokens, False)
    assert lowered.sample(context.ctx, first_row, winners) != raw[0]
    lowered.close()


def test_when_every_row_has_logits_each_row_is_its_own_output_row(decoded: tuple) -> None:
    model, context, batch, _ = decoded
    assert batch.outputs == batch.size
    winners = StepWinners(model.n_vocab, batch)
    params = SamplingParams(temperature=0)
    for row in range(batch.size):
        sampler = build_sampler(params, model, [], True)
        try:
            assert sampler.sample(context.ctx, row, winners) == chain_pick(model, context, [], row, params, True)
        finally:
            sampler.close()


def test_a_row_without_logits_is_an_engine_error(one_step: tuple) -> None:
    model, context, batch, rows = one_step
    winners = StepWinners(model.n_vocab, batch)
    with pytest.raises(EngineError, match="no logits"):
        winners.of(context.ctx, rows[0][1] - 1)  # the prompt's second-to-last token
