"""A stream and a prompt prefilled beside it: once their rows reach a flash-attention tile, the
stream's rows and the prompt's are decoded in two ``llama_decode`` calls (``tiles.decode_parts``),
and both answers stay what they are alone. On the real tiny model."""

from __future__ import annotations

import asyncio

import pytest

import vramsupply.engine.model as model
import vramsupply.engine.scheduler as scheduler
from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.step_cost import TILE_ROWS

GREEDY = SamplingParams(temperature=0)
STORY = "Once upon a time there was a little girl named Lily. She loved to play outside in the park with her dog. "


def engine(**options: object) -> Engine:
    return Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=1024, parallel=2, threads=1, cache_ram=0, **options))  # type: ignore[arg-type]


def spy_on_decodes(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The sequence id of every row of every ``llama_decode`` call the scheduler makes."""
    calls: list[list[int]] = []
    decode = scheduler.llama_cpp.llama_decode

    def spy(ctx: object, batch: object) -> int:
        calls.append([batch.seq_id[row][0] for row in range(batch.n_tokens)])  # type: ignore[attr-defined]
        return decode(ctx, batch)

    monkeypatch.setattr(scheduler.llama_cpp, "llama_decode", spy)
    return calls


async def stream_then_prompt(engine: Engine, prompt: list[int] | None) -> tuple[list[int], list[int]]:
    """A greedy stream, and (once it has its first token) ``prompt`` beside it: their token ids."""
    stream = engine.submit(GenerationRequest(engine.tokenize("The dog"), sampling=GREEDY, max_tokens=48, ignore_eos=True))
    await stream.__anext__()
    if prompt is None:
        await stream.collect()
        return stream.token_ids, []
    beside = engine.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=8, ignore_eos=True))
    await asyncio.gather(stream.collect(), beside.collect())
    return stream.token_ids, beside.token_ids


async def test_a_prompt_beside_a_stream_is_decoded_apart_once_a_tile_is_reached_and_both_answer_as_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with engine(flash_attention="on") as alone:  # "auto" is off on an Intel CPU with AMX (gpu/options.py)
        prompt = alone.tokenize(STORY * 4)
        assert len(prompt) > 2 * TILE_ROWS
        stream_alone, _ = await stream_then_prompt(alone, None)
        generation = alone.submit(GenerationRequest(prompt, sampling=GREEDY, max_tokens=8, ignore_eos=True))
        await generation.collect()
        beside_alone = generation.token_ids
    with engine(flash_attention="on") as together:
        calls = spy_on_decodes(monkeypatch)
        stream, beside = await stream_then_prompt(together, prompt)

    assert (stream, beside) == (stream_alone, beside_alone)
    streams, prompts = set(calls[0]), {seq for call in calls for seq in call} - set(calls[0])
    assert len(streams) == len(prompts) == 1
    mixed = [call for call in calls if set(call) == streams | prompts]
    assert all(len(call) < TILE_ROWS for call in mixed), "a step that reaches a tile is never one decode"
    split = [at for at, call in enumerate(calls[:-1]) if set(call) == streams and set(calls[at + 1]) == prompts and len(calls[at + 1]) + 1 >= TILE_ROWS]
    assert split, f"the stream's row, then the prompt's {TILE_ROWS}+ rows: {[len(call) for call in calls]}"


@pytest.mark.parametrize("how", ["flash attention off", "layers on a GPU"])
async def test_without_tiled_attention_on_the_cpu_a_step_stays_one_decode(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Without ggml-cpu's tiled flash attention there is no tile to keep the streams' rows out of,
    and two calls would only read the weights twice."""
    options: dict[str, object] = {"flash_attention": "off"}
    if how == "layers on a GPU":
        monkeypatch.setattr(model, "offloads", lambda options: True)
        options = {"flash_attention": "on"}
    assert not model.tiled_cpu_attention(EngineOptions(model_path=TINY_MODEL, **options))  # type: ignore[arg-type]
    with engine(**options) as one_call:
        calls = spy_on_decodes(monkeypatch)
        prompt = one_call.tokenize(STORY * 4)
        await stream_then_prompt(one_call, prompt)
    streams = set(calls[0])
    assert any(len(call) >= TILE_ROWS and streams < set(call) for call in calls), [len(call) for call in calls]


def test_tiled_attention_on_the_cpu_is_the_default_of_a_cpu_build() -> None:
    assert model.tiled_cpu_attention(EngineOptions(model_path=TINY_MODEL, n_gpu_layers=0, flash_attention="on"))
    assert not model.tiled_cpu_attention(EngineOptions(model_path=TINY_MODEL, n_gpu_layers=0, flash_attention="off"))
