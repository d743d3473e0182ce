"""A buyer scores a prompt on ``/v1/completions``, as evaluation tools do (lm-evaluation-harness's
``local-completions``: ``echo`` with ``logprobs``, ``max_tokens`` 1 or 0, temperature 0): each
prompt token comes back with the log-probability the model gave it after the tokens before it,
exactly what the engine reports when it generates that token itself, however the prompt was
cached, batched, shared between choices, streamed or split into prefill chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import openai
import pytest
from openai import OpenAI
from openai.types import Completion

from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer, RecordingLedger, recording_server
from vramsupply.engine import Engine
from vramsupply.engine import logprobs as engine_logprobs

STORY = "Once upon a time, there was a little girl named Lily. She"
OTHER = "The little dog ran to the park with his ball. He"
SCORE = {"model": MODEL_ID, "temperature": 0, "echo": True, "logprobs": 2}
CLOSE = 1e-4
DEEP = 2e-2
"""Hundreds of tokens deep, or in chunks of other sizes, llama.cpp's float16 KV cache and batched
kernels give the same token's logits a little apart when its row is decoded alone (generating) or
among hundreds (a prompt chunk): the
engine's own greedy logprobs moved by up to 5e-3 with the batch sizes alone (700 tokens deep,
n_ubatch 512 or 64), and a near tie between two tokens may flip. A token scored off by one
position would be off by far more."""
LONG_PROMPT_TOKENS = 700
"""More than one prefill chunk: a prompt alone is prefilled in chunks of at most n_ubatch (512)
rows, its first one smaller (``pacing.FIRST_ALONE_ROWS``, 128)."""


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with recording_server(parallel=4, max_queue=16) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as sdk:
        yield sdk


def greedy(client: OpenAI, prompt: str, max_tokens: int = 8) -> tuple[str, list[str], list[float]]:
    """What the engine generates after ``prompt`` at temperature 0: its text, tokens, and each
    token's logprob as the engine computed it while generating."""
    choice = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1).choices[0]
    assert choice.logprobs is not None and choice.logprobs.tokens is not None and choice.logprobs.token_logprobs is not None
    return choice.text, choice.logprobs.tokens, [float(v) for v in choice.logprobs.token_logprobs]


def scored(answer: Completion, index: int = 0) -> tuple[list[str], list[float | None], list[dict[str, float] | None], list[int]]:
    logprobs = answer.choices[index].logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.text_offset is not None
    return logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset


def assert_close(got: list[float | None], expected: list[float], within: float = CLOSE) -> None:
    assert len(got) == len(expected)
    for value, want in zip(got, expected):
        assert value is not None and value == pytest.approx(want, abs=within)


def assert_scores_the_generation(client: OpenAI, prompt: str, max_tokens: int = 8, within: float = CLOSE) -> Completion:
    """Greedy-generate after ``prompt``, then score ``prompt`` + that text with ``max_tokens`` 0:
    the generated part's prompt logprobs are the ones the engine reported while generating."""
    text, generated_tokens, generated_logprobs = greedy(client, prompt, max_tokens)
    answer = client.completions.create(prompt=prompt + text, max_tokens=0, **SCORE)  # type: ignore[arg-type]
    tokens, logprobs, tops, _ = scored(answer)
    assert tokens[-max_tokens:] == generated_tokens  # (the text tokenizes back into what was generated)
    assert_close(logprobs[-max_tokens:], generated_logprobs, within)
    for logprob, top in zip(logprobs[-max_tokens:], tops[-max_tokens:]):  # greedy: each is the top one (lm-eval's is_greedy)
        assert top is not None and logprob is not None and logprob >= max(top.values()) - within  # (a near tie may flip deep down)
    return answer


def test_an_echoed_prompt_is_scored_as_the_engine_generates_it(server: LiveServer, client: OpenAI) -> None:
    ledger = server.state.accounts.recorder
    assert isinstance(ledger, RecordingLedger) and server.engine is not None
    ledger.rows.clear()

    answer = assert_scores_the_generation(client, STORY)

    choice = answer.choices[0]
    tokens, logprobs, tops, offsets = scored(answer)
    prompt = server.engine.tokenize(choice.text)
    assert choice.finish_reason == "length" and len(tokens) == len(prompt)
    assert logprobs[0] is None and tops[0] is None  # nothing precedes the first token
    assert all(v is not None and v <= 0 for v in logprobs[1:])
    assert all(top is not None and len(top) == 2 for top in tops[1:])
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(choice.text)
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 0)
    # The generation left its prompt in the KV cache; scoring decoded all of it again.
    assert answer.usage.prompt_tokens_details is not None and answer.usage.prompt_tokens_details.cached_tokens == 0
    [row] = [r for r in ledger.rows if r.completion_tokens == 0]
    assert (row.prompt_tokens, row.cached_tokens, row.complete) == (len(prompt), 0, True)


def test_echo_with_logprobs_and_one_token_puts_the_prompt_first_then_the_completion(client: OpenAI) -> None:
    text, generated_tokens, generated_logprobs = greedy(client, STORY, 1)

    answer = client.completions.create(prompt=STORY, max_tokens=1, **SCORE)  # type: ignore[arg-type]

    choice = answer.choices[0]
    tokens, logprobs, tops, offsets = scored(answer)
    assert choice.text == STORY + text and choice.finish_reason == "length"
    assert tokens[-1:] == generated_tokens
    assert_close(logprobs[-1:], generated_logprobs)
    assert logprobs[0] is None and tops[0] is None and all(v is not None for v in logprobs[1:])
    assert offsets[-1] == len(STORY)  # the completion's text starts after the echoed prompt
    assert offsets == sorted(offsets) and all(0 <= o <= len(STORY) for o in offsets[:-1])
    assert answer.usage is not None and answer.usage.completion_tokens == 1


def test_choices_that_share_a_prompt_all_get_its_scores(client: OpenAI) -> None:
    alone = client.completions.create(prompt=OTHER, max_tokens=0, **SCORE)  # type: ignore[arg-type]

    shared = client.completions.create(prompt=OTHER, max_tokens=3, n=2, **SCORE)  # type: ignore[arg-type]

    _, expected, expected_tops, _ = scored(alone)
    for index in (0, 1):
        tokens, logprobs, tops, _ = scored(shared, index)
        assert tokens[: len(expected)] == scored(alone)[0]
        assert logprobs[0] is None and tops[0] is None
        assert_close(logprobs[1 : len(expected)], expected[1:])  # type: ignore[arg-type]
        assert [sorted(t) for t in tops[1 : len(expected)]] == [sorted(t) for t in expected_tops[1:]]  # type: ignore[arg-type]
        assert len(tokens) == len(expected) + 3
    assert scored(shared, 0)[1][: len(expected)] == scored(shared, 1)[1][: len(expected)]  # the very same scores
    assert shared.usage is not None and alone.usage is not None and shared.usage.prompt_tokens == alone.usage.prompt_tokens


def test_each_batched_prompt_gets_its_own_scores_whole_and_streamed(client: OpenAI) -> None:
    alone = [scored(client.completions.create(prompt=p, max_tokens=0, **SCORE))[1] for p in (STORY, OTHER)]  # type: ignore[arg-type]

    batch = client.completions.create(prompt=[STORY, OTHER], max_tokens=2, **SCORE)  # type: ignore[arg-type]
    streamed: dict[int, list[float | None]] = {0: [], 1: []}
    texts = {0: "", 1: ""}
    first_chunks: dict[int, tuple[str, int]] = {}
    for chunk in client.completions.create(prompt=[STORY, OTHER], max_tokens=2, stream=True, **SCORE):  # type: ignore[arg-type]
        for choice in chunk.choices:
            if choice.index not in first_chunks:
                assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
                first_chunks[choice.index] = (choice.text, len(choice.logprobs.token_logprobs))
            texts[choice.index] += choice.text
            if choice.logprobs is not None and choice.logprobs.token_logprobs is not None:
                streamed[choice.index] += choice.logprobs.token_logprobs

    for index, prompt in enumerate((STORY, OTHER)):
        _, logprobs, _, _ = scored(batch, index)
        expected = alone[index]
        assert logprobs[0] is None and len(logprobs) == len(expected) + 2
        assert_close(logprobs[1 : len(expected)], expected[1:])  # type: ignore[arg-type]
        assert first_chunks[index] == (prompt, len(expected))  # the echo's chunk carries the prompt's logprobs
        assert texts[index] == batch.choices[index].text
        assert streamed[index][0] is None
        assert_close(streamed[index][1:], logprobs[1:])  # type: ignore[arg-type]


def test_a_prompt_longer_than_a_prefill_chunk_is_scored_across_its_chunks(server: LiveServer, client: OpenAI) -> None:
    assert server.engine is not None
    words = " ".join([STORY, OTHER, "They played all day and were very happy."] * 40)
    long_prompt = server.engine.detokenize(server.engine.tokenize(words)[1:LONG_PROMPT_TOKENS])
    short = client.completions.create(prompt=long_prompt[:300], max_tokens=0, **SCORE)  # type: ignore[arg-type]

    answer = assert_scores_the_generation(client, long_prompt, within=DEEP)

    tokens, logprobs, _, _ = scored(answer)
    assert len(tokens) > LONG_PROMPT_TOKENS - 10
    short_tokens, short_logprobs, _, _ = scored(short)
    head = len(short_tokens) - 3  # (its text ends in the middle of a word, tokenized otherwise)
    assert short_tokens[:head] == tokens[:head]
    assert_close(logprobs[1:head], short_logprobs[1:head], DEEP)  # type: ignore[arg-type]  # (chunks of other sizes)
    assert all(v is not None for v in logprobs[1:])


def test_a_streamed_score_of_zero_tokens_is_the_echo_chunk_then_length(client: OpenAI) -> None:
    whole = client.completions.create(prompt=STORY, max_tokens=0, **SCORE)  # type: ignore[arg-type]

    chunks = list(client.completions.create(prompt=STORY, max_tokens=0, stream=True, stream_options={"include_usage": True}, **SCORE))  # type: ignore[arg-type]

    choices = [c for chunk in chunks for c in chunk.choices]
    assert choices[0].text == STORY
    assert choices[0].logprobs is not None and choices[0].logprobs.token_logprobs is not None
    assert choices[0].logprobs.token_logprobs[0] is None
    assert_close(choices[0].logprobs.token_logprobs[1:], scored(whole)[1][1:])  # type: ignore[arg-type]
    assert choices[0].logprobs.text_offset == scored(whole)[3]
    assert "".join(c.text for c in choices) == STORY and choices[-1].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage is not None and whole.usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, 0)


def test_echo_with_max_tokens_0_and_no_logprobs_returns_the_prompt(client: OpenAI) -> None:
    answer = client.completions.create(model=MODEL_ID, prompt=STORY, echo=True, max_tokens=0)

    assert answer.choices[0].text == STORY and answer.choices[0].logprobs is None
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 0 and answer.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),
        ({"max_tokens": -1, "echo": True}, "max_tokens"),
        ({"echo": True, "logprobs": 21}, "logprobs"),
    ],
)
def test_scoring_past_its_bounds_is_400_naming_the_field(client: OpenAI, fields: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**{"model": MODEL_ID, "prompt": STORY, **fields})  # type: ignore[call-overload]

    error = json.loads(refused.value.response.text)["error"]
    assert error["param"] == param and param in error["message"]


def test_a_step_holds_few_scored_rows_with_a_large_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 32k vocabulary a step holds 256 scored rows (``logprobs.SCORED_LOGITS``); the bundled
    model's 512 tokens would allow thousands, so the bound is lowered here to 40 rows a step: the
    prompt is then scored over many more, smaller chunks, and its scores are the same."""
    monkeypatch.setattr("vramsupply.engine.logprobs.SCORED_LOGITS", 40 * 512)
    with LiveServer(aliases=[TINY_MODEL.name], parallel=2) as small, OpenAI(base_url=small.base_url, api_key="unused", max_retries=0) as client:
        assert small.engine is not None
        prompt = small.engine.detokenize(small.engine.tokenize(" ".join([STORY, OTHER] * 12))[1:200])
        steps_before = small.engine.stats().prefill_tokens_total  # prompt tokens decoded

        answer = assert_scores_the_generation(client, prompt, within=DEEP)

        scored_tokens = len(scored(answer)[0])  # the generation's prompt and its 8 tokens, scored whole though cached:
        assert small.engine.stats().prefill_tokens_total - steps_before == (scored_tokens - 8) + scored_tokens
    with LiveServer(aliases=[TINY_MODEL.name], parallel=2) as usual, OpenAI(base_url=usual.base_url, api_key="unused", max_retries=0) as client:
        _, expected, _, _ = scored(client.completions.create(prompt=answer.choices[0].text, max_tokens=0, **SCORE))  # type: ignore[arg-type]
    assert_close(scored(answer)[1][1:], expected[1:], DEEP)  # type: ignore[arg-type]


@pytest.mark.parametrize("vocab", [512, 32001, 151936])
@pytest.mark.parametrize("top_n", [0, 1, 5, 20])
def test_a_block_of_prompt_rows_scores_as_one_generated_token_does(vocab: int, top_n: int) -> None:
    """Prompt rows are reduced a block at a time (``logprobs.score_block``, which finds the best
    without partitioning whole rows); each row's result is what a generated token's would be."""
    rng = np.random.default_rng(vocab + top_n)
    logits = (rng.standard_normal((24, vocab)) * 4).astype(np.float32)
    tokens = rng.integers(0, vocab, 24)

    scores = engine_logprobs.score_block(logits, tokens, top_n)

    for row, token, score in zip(logits, tokens, scores):
        one = engine_logprobs.logprobs_from_logits(row.astype(np.float64), int(token), top_n)
        assert score.token == one.token and score.logprob == pytest.approx(one.logprob, abs=1e-6)
        assert [t for t, _ in score.top] == [t for t, _ in one.top]
        assert [lp for _, lp in score.top] == pytest.approx([lp for _, lp in one.top], abs=1e-6)


OFFSET_PROMPTS = [
    "Hello world, how are you?",
    "Café ünïcode 😀 test",
    " one leading space",
    "  two leading spaces",
    "<s>Once upon a time",
    "Once</s>upon a time",
    "Once</s> upon a time",
    "a<s></s>b and <unk>c",
    "<s>User: Tell me a story.</s><s>Assistant: Once upon a time",  # chat-formatted, in the tiny model's only special tokens
]
TINY_VOCAB = 512


def misplaced(engine: Engine, echoed: str, ids: list[int], tokens: list[str], offsets: list[int]) -> list[int]:
    """The prompt tokens whose text is not where ``text_offset`` points in the echo. A token is in
    place where ``echoed[offset:]`` starts with its shown text (a control token's too: "</s>"); or
    with that text less its leading space, where the tokenizer added that space to the text after
    the start or after a control token (" Once" for "Once"); or, a byte of a character split over
    several tokens (shown as U+FFFD), where the offset is that character's."""
    out = []
    for index, (token, shown, offset) in enumerate(zip(ids, tokens, offsets)):
        there = echoed[offset:]
        first_of_text = index == 0 or not engine.text_bytes(ids[index - 1])
        added_space = first_of_text and shown.startswith(" ") and there.startswith(shown[1:])
        split_byte = shown == "\ufffd" and there != "" and engine.token_bytes(token) in there[0].encode()
        if not (there.startswith(shown) or added_space or split_byte):
            out.append(index)
    return out


@pytest.mark.parametrize("prompt", OFFSET_PROMPTS)
def test_each_token_of_an_echoed_text_prompt_is_offset_at_its_own_text(server: LiveServer, client: OpenAI, prompt: str) -> None:
    """The echo is the buyer's text, special tokens' text included ("</s>" in the middle, as a raw
    chat-formatted prompt has them): each token's offset points at its text there. The one token
    whose text the echo does not hold is the BOS added before a text that does not begin with it,
    at offset 0."""
    assert server.engine is not None
    answer = client.completions.create(prompt=prompt, max_tokens=0, **SCORE)  # type: ignore[arg-type]

    tokens, _, _, offsets = scored(answer)
    echoed = answer.choices[0].text
    ids = server.engine.tokenize_prompt(prompt)
    assert echoed == prompt and len(tokens) == len(ids)
    assert offsets == sorted(offsets) and all(0 <= o <= len(echoed) for o in offsets)
    added_bos = [] if prompt.startswith("<s>") else [0]
    assert misplaced(server.engine, echoed, ids, tokens, offsets) == added_bos
    assert offsets[0] == 0


def test_text_after_a_special_token_is_offset_past_that_token_s_text(client: OpenAI) -> None:
    answer = client.completions.create(prompt="Once</s>upon a time", max_tokens=1, **SCORE)  # type: ignore[arg-type]

    tokens, _, _, offsets = scored(answer)
    assert tokens[:6] == ["<s>", " Once", "</s>", " upon", " a", " time"]
    assert offsets[:6] == [0, 0, 4, 8, 12, 14]  # "upon" at 8, not "/s>upon" at 5
    assert offsets[6] == len("Once</s>upon a time")  # the completion's text after the echo


def test_a_token_id_prompt_s_control_tokens_show_nothing_in_its_echo_and_sit_where_the_next_text_starts(
    server: LiveServer, client: OpenAI
) -> None:
    """A token-id prompt's echo is its tokens' text, control tokens as nothing: there, "<s>" can be
    only the text of the tokens "<", "s", ">", which each sit at their own character."""
    engine = server.engine
    assert engine is not None
    literal = [next(t for t in range(TINY_VOCAB) if engine.text_bytes(t) == c.encode()) for c in "<s>"]
    ids = [engine.tokenize_prompt("x")[0], *literal, *engine.tokenize("Once</s>upon a time", add_special=False)]
    control = [i for i, t in enumerate(ids) if not engine.text_bytes(t)]

    answer = client.completions.create(prompt=ids, max_tokens=0, **SCORE)  # type: ignore[arg-type]

    tokens, _, _, offsets = scored(answer)
    echoed = answer.choices[0].text
    assert echoed == engine.detokenize(ids) and echoed.startswith("<s> Once") and "</s>" not in echoed
    assert offsets[:4] == [0, 0, 1, 2]  # the BOS, then "<", "s", ">"
    assert control == [0, 5]  # the BOS and "</s>"
    for index in control:  # the control tokens' text is not in the echo: each sits where the next token's text starts
        assert offsets[index] == offsets[index + 1]
    for index, offset in enumerate(offsets):  # and every other token's text is in the echo as it is, its space too
        assert index in control or echoed[offset:].startswith(tokens[index])
