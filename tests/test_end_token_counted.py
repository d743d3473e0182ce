"""The end-of-text token is a generated token, as vLLM and llama-server have it: the model decoded
it, so the usage, the engine's counters (heartbeats, ``/metrics``) and the earnings ledger count
it, and with ``logprobs`` its entry comes last (evaluation tools read the last entry as the one
generated token). Its text never shows in the answer.

And a text prompt that already begins with the BOS text gets no second BOS.

The bundled model rarely ends a story greedily; a logit bias on ``</s>`` makes it end at once, or,
with ``min_tokens``, right after that many tokens.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer
from vramsupply.engine import Engine, EngineOptions, GenerationRequest, SamplingParams, backend_sampling
from vramsupply.ledger import LedgerStore, LedgerWriter
from vramsupply.ledger.recorder import LedgerRecorder

TOKEN = "endpoint-token-for-end-token-tests"
STORY = "Once upon a time"
ASK = [{"role": "user", "content": "Tell me a story."}]


class Shop:
    """A live server whose ledger records every request, and a buyer's client for it."""

    def __init__(self, live: LiveServer, ledger: Path) -> None:
        self.live = live
        self.ledger = ledger
        self.client = openai.OpenAI(base_url=live.base_url, api_key=TOKEN, max_retries=0)
        assert live.engine is not None
        self.engine: Engine = live.engine
        [self.eos] = self.engine.tokenize("</s>", add_special=False)

    def ends(self, **extra: Any) -> dict[str, Any]:
        """Request fields that make the model end (at once, or after ``min_tokens``)."""
        return {"model": MODEL_ID, "logit_bias": {str(self.eos): 100}, "temperature": 0, **extra}

    def row(self, request_id: str) -> Any:
        self.live.call(self._flush)
        return next(e for e in LedgerStore(self.ledger).entries() if e.request_id == request_id)

    async def _flush(self) -> None:
        await self.live.state.accounts.flush(30)

    def metric(self, name: str) -> float:
        """One counter as a Prometheus scrape reads it."""
        request = urllib.request.Request(self.live.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.sqlite3"
    with LiveServer(endpoint_token=TOKEN, parallel=4) as live:
        writer = LedgerWriter.open(ledger)
        live.state.accounts.recorder = LedgerRecorder(writer, input_price=120, output_price=250, selling=True)
        shop = Shop(live, ledger)
        yield shop
        shop.client.close()
        live.call(shop._flush)
        writer.close()


class Counted:
    """The engine's completion tokens (heartbeats read them) and ``/metrics``' across a request."""

    def __init__(self, shop: Shop) -> None:
        self.shop = shop

    def __enter__(self) -> Counted:
        self.before = self.shop.engine.stats().completion_tokens_total, self.shop.metric("vramsupply_completion_tokens_total")
        return self

    def __exit__(self, *exc_info: object) -> None:
        after = self.shop.engine.stats().completion_tokens_total, self.shop.metric("vramsupply_completion_tokens_total")
        self.engine, self.metrics = after[0] - self.before[0], after[1] - self.before[1]


def test_a_completion_that_ends_at_once_is_one_generated_token_in_usage_counters_and_ledger(shop: Shop) -> None:
    with Counted(shop) as counted:
        answer = shop.client.completions.create(prompt=STORY, max_tokens=5, logprobs=1, **shop.ends())

    [choice] = answer.choices
    assert (choice.text, choice.finish_reason) == ("", "stop")
    assert answer.usage.completion_tokens == 1
    assert (counted.engine, counted.metrics) == (1, 1)
    assert shop.row(answer.id).completion_tokens == 1
    assert choice.logprobs.tokens == ["</s>"], "the end token by its text, as the prompt's <s> is shown"
    assert choice.logprobs.token_logprobs[0] < 0 and choice.logprobs.text_offset == [0]  # the model's own, before the bias
    assert choice.logprobs.top_logprobs[0]["</s>"] == choice.logprobs.token_logprobs[0]


def test_min_tokens_then_the_end_token_counts_every_token_and_shows_no_end_text(shop: Shop) -> None:
    greedy = shop.client.completions.create(model=MODEL_ID, prompt=STORY, max_tokens=3, temperature=0)
    with Counted(shop) as counted:
        answer = shop.client.completions.create(prompt=STORY, max_tokens=10, logprobs=1, extra_body={"min_tokens": 3}, **shop.ends())

    [choice] = answer.choices
    assert choice.finish_reason == "stop" and choice.text == greedy.choices[0].text and "</s>" not in choice.text
    assert answer.usage.completion_tokens == 4 == counted.engine == counted.metrics
    assert shop.row(answer.id).completion_tokens == 4
    assert len(choice.logprobs.tokens) == 4 and choice.logprobs.tokens[-1] == "</s>"
    assert choice.logprobs.text_offset[-1] == len(choice.text), "the end token starts where the text ends"


def test_every_choice_of_several_prompts_counts_its_end_token(shop: Shop) -> None:
    with Counted(shop) as counted:
        answer = shop.client.completions.create(prompt=[STORY, "The cat"], n=2, max_tokens=10, extra_body={"min_tokens": 2}, **shop.ends())

    assert [c.finish_reason for c in answer.choices] == ["stop"] * 4
    assert answer.usage.completion_tokens == 4 * 3 == counted.engine == counted.metrics
    assert shop.row(answer.id).completion_tokens == 12


def test_a_streamed_completion_sends_the_end_token_entry_with_its_finish_reason(shop: Shop) -> None:
    with Counted(shop) as counted:
        chunks = list(shop.client.completions.create(
            prompt=STORY, max_tokens=5, logprobs=2, stream=True, stream_options={"include_usage": True},
            extra_body={"min_tokens": 2}, **shop.ends()
        ))

    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    [last] = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.finish_reason == "stop" and last.logprobs.tokens == ["</s>"]
    assert len(tokens) == 3 and "</s>" not in "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 3 == counted.engine == counted.metrics
    assert shop.row(chunks[0].id).completion_tokens == 3


def test_a_chat_answer_that_ends_at_once_counts_and_reports_its_end_token(shop: Shop) -> None:
    with Counted(shop) as counted:
        answer = shop.client.chat.completions.create(messages=ASK, max_tokens=5, logprobs=True, top_logprobs=1, **shop.ends())

    [choice] = answer.choices
    assert (choice.message.content or "", choice.finish_reason) == ("", "stop")
    assert answer.usage.completion_tokens == 1 == counted.engine == counted.metrics
    assert shop.row(answer.id).completion_tokens == 1
    [entry] = choice.logprobs.content
    assert (entry.token, entry.bytes) == ("</s>", list(b"</s>")), "named as vLLM names it (tokenizer.decode of the id)"
    assert len(entry.top_logprobs) == 1  # the model's own (raw) top token, before the bias


def test_a_streamed_chat_answer_sends_the_end_token_entry_in_its_last_chunk(shop: Shop) -> None:
    with Counted(shop) as counted:
        chunks = list(shop.client.chat.completions.create(
            messages=ASK, max_tokens=10, logprobs=True, stream=True, stream_options={"include_usage": True},
            extra_body={"min_tokens": 2}, **shop.ends()
        ))

    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    [last] = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.finish_reason == "stop" and last.logprobs is not None and last.logprobs.content[-1].token == "</s>"
    assert len(entries) == 3 and "</s>" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 3 == counted.engine == counted.metrics
    assert shop.row(chunks[0].id).completion_tokens == 3


def test_a_grammar_answer_sampled_off_the_step_counts_its_end_token_as_one_sampled_in_it(shop: Shop) -> None:
    """Without logprobs a grammar request is sampled on the grammar worker; with them, in the step."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "enum": ["Lily"]}}, "required": ["name"]}
    fields = {"messages": ASK, "max_tokens": 40, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    with Counted(shop) as counted:
        off_step = shop.client.chat.completions.create(**fields, **shop.ends())
    in_step = shop.client.chat.completions.create(**fields, logprobs=True, **shop.ends())

    assert off_step.choices[0].message.content == in_step.choices[0].message.content
    assert in_step.choices[0].logprobs.content[-1].token == "</s>"
    assert off_step.usage.completion_tokens == len(in_step.choices[0].logprobs.content) == in_step.usage.completion_tokens
    assert counted.engine == off_step.usage.completion_tokens == shop.row(off_step.id).completion_tokens


def test_a_text_prompt_that_begins_with_the_bos_text_gets_one_bos(shop: Shop) -> None:
    """lm-evaluation-harness's ``add_bos_token`` sends "<s>..."; a second BOS would change every score."""
    def scored(prompt: str) -> Any:
        return shop.client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)

    plain, with_bos = scored(STORY), scored("<s>" + STORY)

    assert with_bos.usage.prompt_tokens == plain.usage.prompt_tokens
    assert with_bos.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens
    assert with_bos.choices[0].logprobs.tokens[:2] == ["<s>", " Once"]
    assert with_bos.choices[0].logprobs.token_logprobs == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    offsets = plain.choices[0].logprobs.text_offset
    assert with_bos.choices[0].logprobs.text_offset == [0, *(3 + o for o in offsets[1:])], "the echoed <s> is the BOS token's text"


def test_token_id_prompts_are_kept_as_sent(shop: Shop) -> None:
    """A prompt of token ids is the buyer's exact input: two BOS tokens, if sent, stay two."""
    ids = shop.engine.tokenize(STORY)
    answer = shop.client.completions.create(model=MODEL_ID, prompt=[ids[0], *ids], max_tokens=1, temperature=0)
    assert answer.usage.prompt_tokens == len(ids) + 1


@pytest.fixture(scope="module")
def eos() -> int:
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=256, parallel=1, cache_ram=0, threads=1)) as engine:
        [token] = engine.tokenize("</s>", add_special=False)
        return token


@pytest.mark.parametrize("options", [{"draft_max": 8}, {"backend_sampling": True}], ids=["speculative", "backend-sampling"])
async def test_the_end_token_counts_when_drafting_or_sampling_in_the_graph(eos: int, options: dict[str, Any]) -> None:
    quoting = "Tom said: the big red ball is mine. Lily said: the big red ball is mine. Tom said: the big"
    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=512, parallel=1, cache_ram=0, threads=1, **options)) as engine:
        request = GenerationRequest(engine.tokenize(quoting), sampling=SamplingParams(temperature=0, logit_bias={eos: 100}), max_tokens=30)
        if "backend_sampling" in options:
            assert backend_sampling.supports(request)
        else:  # drafts verified row by row, the end token held back until the 12th
            request = GenerationRequest(request.prompt, sampling=SamplingParams(temperature=0, logit_bias={eos: 100}), max_tokens=30, min_tokens=12)
        generation = engine.submit(request)
        await generation.collect()
        stats = engine.stats()

    generated = 13 if "draft_max" in options else 1
    assert generation.finish_reason == "stop" and generation.usage is not None
    assert generation.usage.completion_tokens == generated == stats.completion_tokens_total
    assert len(generation.token_ids) == generated - 1, "the token ids are those that brought the text"
    if "draft_max" in options:
        assert stats.draft_tokens_total > 0
