"""A buyer asks for logprobs where the model gives some tokens no chance at all, and does arithmetic
on every logprob the answer holds, as OpenAI's SDKs type them: numbers. Such a logprob is minus
infinity, which JSON cannot carry (it went out as ``null``); it comes as -9999.0, as vLLM sends it,
in chat's ``content[].logprob`` and ``top_logprobs``, and in the legacy completions'
``token_logprobs`` and ``top_logprobs`` (an echoed prompt's included), streamed or not. Only the
echoed prompt's first token keeps its ``null``: nothing precedes it, so it has no value at all.

Our logprobs are the model's own distribution (``logit_bias`` does not move them), so the tiny
model is copied here with every token but five masked in its output layer: their logits are minus
infinity at every position (``masked_model``). Greedy answers are made of the five; top-8 lists
hold them and three masked ones; a prompt's masked tokens score minus infinity."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from openai import OpenAI

from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer
from vramsupply.engine.logprobs import TokenLogprob
from vramsupply.server.logprobs_out import chat_logprobs, text_logprobs

KEPT = ("▁there", ",", "▁was", "▁a", ".")
LOWEST = -9999.0
TOP = 8
MESSAGES = [{"role": "user", "content": "Once upon a time"}]
PROMPT = "Once upon a time"  # " Once", " upon" and " time" are masked; " a" is not


@pytest.fixture(scope="module")
def masked_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model whose output layer gives every token outside ``KEPT`` a logit of minus
    infinity: one residual dimension is made a positive constant that no layer reads or writes
    (its embedding column 0.25, its norm weights 0 in the layers and 1 in the final norm, its rows
    of the layers' output projections 0), and the masked tokens' output weight there is -inf."""
    path = tmp_path_factory.mktemp("masked") / "stories260k-masked.gguf"
    shutil.copyfile(TINY_MODEL, path)
    reader = gguf.GGUFReader(path, "r+")
    vocab = list(reader.get_field(gguf.Keys.Tokenizer.LIST).contents())
    tensors = {tensor.name: tensor.data for tensor in reader.tensors}
    tensors["token_embd.weight"][:, 0] = 0.25
    tensors["output_norm.weight"][0] = 1.0
    for name, data in tensors.items():
        if name.endswith(("attn_norm.weight", "ffn_norm.weight")):
            data[0] = 0.0
        elif name.endswith(("attn_output.weight", "ffn_down.weight")):
            data[0, :] = 0.0
    tensors["output.weight"][np.setdiff1d(np.arange(len(vocab)), [vocab.index(t) for t in KEPT]), 0] = -np.inf
    reader.data.flush()
    return path


@pytest.fixture(scope="module")
def client(masked_model: Path) -> Iterator[OpenAI]:
    with LiveServer(model_path=masked_model, parallel=2) as live:
        with OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as sdk:
            yield sdk


def sse_events(lines: Iterator[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def assert_chat_entries(entries: list[dict[str, Any]]) -> None:
    """Each token is one of the five (a number), its top 8 the five and then three at -9999.0; the
    probabilities a client works out from them add up to one."""
    assert len(entries) == 3
    for entry in entries:
        values = [top["logprob"] for top in entry["top_logprobs"]]
        assert len(values) == TOP
        assert all(LOWEST < value <= 0 for value in [entry["logprob"], *values[: len(KEPT)]])
        assert values[len(KEPT) :] == [LOWEST] * (TOP - len(KEPT))
        assert sum(math.exp(value) for value in values) == pytest.approx(1.0)


def test_chat_gives_tokens_with_no_chance_minus_9999(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=TOP  # type: ignore[arg-type]
    )
    assert '"logprob":null' not in raw.http_response.text
    content = raw.parse().choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert_chat_entries([entry.model_dump() for entry in content])


def test_a_chat_stream_gives_them_minus_9999_too(client: OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model=MODEL_ID, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=TOP, stream=True  # type: ignore[arg-type]
    ) as response:
        chunks = sse_events(response.iter_lines())
    entries = [entry for chunk in chunks for choice in chunk["choices"] for entry in (choice.get("logprobs") or {}).get("content") or []]
    assert_chat_entries(entries)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_scored_prompt_gives_its_masked_tokens_minus_9999(client: OpenAI, stream: bool) -> None:
    """lm-evaluation-harness's way: ``echo`` with ``logprobs``, summing a stretch of
    ``token_logprobs``. The first prompt token's ``null`` stays; every other value is a number."""
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": TOP - 1, "stream": stream}
    with client.completions.with_streaming_response.create(**body) as response:  # type: ignore[call-overload]
        chunks = sse_events(response.iter_lines()) if stream else [json.loads(response.read())]
    tokens, values, tops = [], [], []
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice.get("logprobs"):
                tokens += choice["logprobs"]["tokens"]
                values += choice["logprobs"]["token_logprobs"]
                tops += choice["logprobs"]["top_logprobs"]
    assert tokens[:5] == ["<s>", " Once", " upon", " a", " time"] and len(tokens) == 8
    assert values[0] is None and tops[0] is None
    masked = {1, 2, 4}  # " Once", " upon", " time"
    assert [values[i] for i in sorted(masked)] == [LOWEST] * len(masked)
    assert all(LOWEST < value <= 0 for i, value in enumerate(values) if i and i not in masked)
    for token, value, top in zip(tokens[1:], values[1:], tops[1:]):
        assert top[token] == value  # the chosen token is in its dict, with the same number
        assert sorted(top.values())[: len(top) - len(KEPT)] == [LOWEST] * (len(top) - len(KEPT))
    assert sum(values[1:5]) == pytest.approx(3 * LOWEST + values[3])


def test_nan_never_reaches_the_wire() -> None:
    """No log-softmax should give NaN, but JSON cannot carry one either: it is sent as -9999.0 too."""
    entries = [TokenLogprob(7, math.nan, ((3, -0.5), (7, math.nan), (9, -math.inf)))]
    token_bytes = lambda token: f"t{token}".encode()  # noqa: E731
    chat = json.loads(chat_logprobs(entries, token_bytes).to_json())["content"][0]
    assert chat["logprob"] == LOWEST
    assert [top["logprob"] for top in chat["top_logprobs"]] == [-0.5, LOWEST, LOWEST]
    text = json.loads(text_logprobs(entries, token_bytes, [0]).to_json())
    assert text["token_logprobs"] == [LOWEST]
    assert text["top_logprobs"] == [{"t3": -0.5, "t7": LOWEST, "t9": LOWEST}]
