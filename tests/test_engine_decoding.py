"""The engine's tokens on the real tiny model: continuous batching, sampling, stops, grammars, logit bias.

Checked against llama-cpp-python's own single-sequence generator where it has an answer; shares the
``engine`` and ``reference`` fixtures and the helpers of test_engine.
"""

from __future__ import annotations

import asyncio
import math
from itertools import pairwise

import pytest
from llama_cpp import Llama, LlamaGrammar

from test_engine import GREEDY, PROMPTS, engine, reference, reference_greedy, run  # noqa: F401  (engine, reference: the fixtures)
from vramsupply.engine import Engine, GenerationRequest, SamplingParams


async def test_greedy_output_matches_llama_cpp_python_reference(engine: Engine, reference: Llama) -> None:
    prompt = engine.tokenize(PROMPTS[3])
    generation = await run(engine, prompt, sampling=GREEDY, max_tokens=24)
    assert generation.token_ids == reference_greedy(reference, prompt, 24)


async def test_concurrent_greedy_requests_equal_each_run_alone(engine: Engine) -> None:
    """More prompts than slots, of different lengths: batching and queueing never change tokens."""
    request = dict(sampling=GREEDY, max_tokens=32, ignore_eos=True)
    alone = [await run(engine, p, **request) for p in PROMPTS]
    together = await asyncio.gather(*(run(engine, p, **request) for p in PROMPTS))
    for single, batched in zip(alone, together, strict=True):
        assert len(single.token_ids) == 32
        assert batched.token_ids == single.token_ids
        assert batched.finish_reason == single.finish_reason == "length"
    assert len({tuple(g.token_ids) for g in alone}) == len(PROMPTS)


async def test_different_sampling_params_in_one_batch(engine: Engine) -> None:
    """Each request keeps its own sampler chain: its output does not depend on its neighbours."""
    mixes = [
        (PROMPTS[0], GREEDY),
        (PROMPTS[0], SamplingParams(temperature=0, repeat_penalty=1.5, presence_penalty=0.5)),
        (PROMPTS[1], SamplingParams(temperature=0.9, seed=7)),
        (PROMPTS[2], SamplingParams(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0, frequency_penalty=0.4, seed=3)),
    ]
    alone = [await run(engine, p, sampling=s, max_tokens=30, ignore_eos=True) for p, s in mixes]
    together = await asyncio.gather(*(run(engine, p, sampling=s, max_tokens=30, ignore_eos=True) for p, s in mixes))
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    # The penalties really act: the same greedy prompt diverges with them.
    assert alone[0].token_ids != alone[1].token_ids


async def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    def sampling(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)

    first = await run(engine, PROMPTS[0], sampling=sampling(123), max_tokens=30, ignore_eos=True)
    again = await run(engine, PROMPTS[0], sampling=sampling(123), max_tokens=30, ignore_eos=True)
    other = await run(engine, PROMPTS[0], sampling=sampling(124), max_tokens=30, ignore_eos=True)
    assert again.token_ids == first.token_ids
    assert other.token_ids != first.token_ids


async def test_stop_string_spanning_two_tokens_is_never_emitted(engine: Engine) -> None:
    baseline = await run(engine, PROMPTS[0], sampling=GREEDY, max_tokens=40, ignore_eos=True)
    pieces = [engine.detokenize([t]) for t in baseline.token_ids]
    text = "".join(pieces)
    stop, cut = _stop_across_a_token_boundary(pieces)
    generation = engine.submit(GenerationRequest(engine.tokenize(PROMPTS[0]), GREEDY, max_tokens=40, stop=[stop]))
    deltas = [delta async for delta in generation]
    assert "".join(deltas) == text[:cut]
    assert all(delta for delta in deltas)
    assert generation.finish_reason == "stop"
    assert generation.usage.completion_tokens < 40


def _stop_across_a_token_boundary(pieces: list[str]) -> tuple[str, int]:
    """A stop string made of the end of one piece and the start of the next, first found there."""
    text = "".join(pieces)
    offset = 0
    for left, right in pairwise(pieces):
        offset += len(left)
        if len(left) >= 2 and len(right) >= 2:
            stop = left[-2:] + right[:2]
            if text.find(stop) == offset - 2:
                return stop, offset - 2
    raise AssertionError(f"no usable token boundary in {pieces}")


async def test_multibyte_characters_split_across_byte_tokens_stream_intact(engine: Engine) -> None:
    """stories260K has no token for 😀 or 日本: they are generated as single-byte tokens."""
    emoji_bytes = engine.tokenize("😀", add_special=False)[1:]
    assert len(emoji_bytes) == 4
    grammar = 'root ::= "Tom saw 😀 and 日本"'
    generation = engine.submit(
        GenerationRequest(engine.tokenize(PROMPTS[0]), SamplingParams(temperature=0, grammar=grammar), max_tokens=40)
    )
    deltas = [delta async for delta in generation]
    assert "".join(deltas) == "Tom saw 😀 and 日本"
    assert all("\ufffd" not in delta for delta in deltas)
    ids = generation.token_ids
    assert any(ids[i : i + 4] == emoji_bytes for i in range(len(ids)))
    assert generation.finish_reason == "stop"


def reference_grammar_greedy(llama: Llama, prompt: list[int], grammar: str, n: int) -> list[int]:
    """llama-cpp-python applies the grammar to every candidate before picking (grammar first)."""
    llama.reset()
    tokens = []
    for token in llama.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True, grammar=LlamaGrammar.from_string(grammar, verbose=False)):
        if token == llama.token_eos() or len(tokens) == n:
            break
        tokens.append(token)
    return tokens


@pytest.mark.parametrize(
    "grammar",
    [
        r'root ::= [A-Za-z ,.!\n]+',  # what the model writes anyway: the grammar never has to step in
        r'root ::= "Tom and Lily " ("ran" | "played" | "saw") [a-z ]{3,30} "."',  # it steps in often
    ],
)
async def test_a_grammar_checks_the_chosen_token_and_steps_in_only_when_it_refuses(engine: Engine, reference: Llama, grammar: str) -> None:
    """A grammar is applied by rejection: the whole vocabulary goes through it only for the tokens
    it refuses. The text is still the grammar-first greedy answer, token for token."""
    prompt = engine.tokenize(PROMPTS[0])
    generation = await run(engine, prompt, sampling=SamplingParams(temperature=0, grammar=grammar), max_tokens=30)
    assert generation.token_ids == reference_grammar_greedy(reference, list(prompt), grammar, 30)
    resampled = generation.task.sampler.resampled
    assert (resampled == 0) if "A-Za-z" in grammar else (0 < resampled < len(generation.token_ids))


async def test_invalid_grammar_is_rejected_at_submit(engine: Engine) -> None:
    with pytest.raises(ValueError, match="GBNF"):
        engine.submit(GenerationRequest([1, 2], SamplingParams(grammar='item ::= "x"')))


async def test_max_tokens_finishes_with_length(engine: Engine) -> None:
    generation = await run(engine, PROMPTS[1], sampling=GREEDY, max_tokens=5)
    assert generation.finish_reason == "length"
    assert generation.usage.completion_tokens == 5
    assert len(generation.token_ids) == 5


async def test_eos_ends_the_request_as_one_generated_token_unless_ignored(engine: Engine) -> None:
    eos_first = SamplingParams(temperature=0, logit_bias={2: 100.0})
    ended = await run(engine, PROMPTS[1], sampling=eos_first, max_tokens=8)
    # counted, as vLLM and llama-server count it; no text, so no token id (``Generation.token_ids``)
    assert (ended.finish_reason, ended.usage.completion_tokens, ended.token_ids) == ("stop", 1, [])
    ignored = await run(engine, PROMPTS[1], sampling=eos_first, max_tokens=8, ignore_eos=True)
    assert ignored.finish_reason == "length"
    assert ignored.usage.completion_tokens == 8
    assert 2 not in ignored.token_ids


async def test_logit_bias_changes_the_choice(engine: Engine) -> None:
    baseline = await run(engine, PROMPTS[2], sampling=GREEDY, max_tokens=3)
    first = baseline.token_ids[0]
    banned = await run(engine, PROMPTS[2], sampling=SamplingParams(temperature=0, logit_bias={first: -math.inf}), max_tokens=3)
    assert banned.token_ids[0] != first
    forced_token = engine.tokenize(" ball", add_special=False)[-1]
    forced = await run(engine, PROMPTS[2], sampling=SamplingParams(temperature=0, logit_bias={forced_token: 100.0}), max_tokens=3)
    assert forced.token_ids == [forced_token] * 3


async def test_logit_bias_outside_the_vocabulary_is_rejected(engine: Engine) -> None:
    with pytest.raises(ValueError, match="not in the vocabulary"):
        engine.submit(GenerationRequest([1, 2], SamplingParams(logit_bias={10**6: 1.0})))
