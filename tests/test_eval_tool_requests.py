"""An evaluation tool scores and samples our model through ``/v1/completions`` exactly as
EleutherAI's lm-evaluation-harness does with its ``local-completions`` model (read from its
``openai_completions.py`` and ``api_models.py``; lm_eval itself is not installed here, and its
tasks need datasets from the Hub).

What it sends, and how it reads the answer, re-told here in our own words:

- loglikelihood: the context's and the continuation's tokens joined, as token ids (or, with
  ``tokenized_requests=False``, decoded back to strings), several prompts to a request, with
  ``temperature`` 0, ``max_tokens`` 1, ``logprobs`` 1, ``echo`` and ``seed`` 1234. From each
  choice (taken in ``index`` order) it keeps ``token_logprobs[ctxlen:-1]``: the last entry is the
  one generated token, the ones before ``ctxlen`` the context's (the first, ``null``, among them).
  Their sum is the continuation's loglikelihood; it is greedy when each of those logprobs equals
  the largest value in its ``top_logprobs`` dict.
- loglikelihood_rolling: the text's tokens in windows, the first after the BOS token alone, each
  window one such prompt; the windows' sums add up to the text's.
- generate_until: the contexts as token ids, ``max_tokens`` (its ``max_gen_toks``), ``temperature``
  0, ``stop`` (the task's ``until`` plus the EOS text, not cut to four) and ``seed``; each choice's
  ``text`` is the answer, in ``index`` order.

A score must be the number, not a look-alike: the loglikelihood of a continuation the model
generated greedily is the sum of the logprobs the server reported while generating it.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer
from vramsupply.engine import Engine

CONTEXTS = (
    "Once upon a time, there was a little girl named Lily. She",
    "The little dog ran to the park with his ball. He",
    "Tom and his mom went to the store to buy",
)
CLOSE = 1e-3
SEED = 1234


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(aliases=[TINY_MODEL.name], parallel=4, max_queue=32) as live:
        yield live


@pytest.fixture
def engine(server: LiveServer) -> Engine:
    assert server.engine is not None
    return server.engine


def post(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    """One request as the tool sends it: plain JSON over HTTP, any non-2xx an error."""
    request = urllib.request.Request(
        server.base_url + "/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:  # a 4xx or 5xx raises HTTPError
        return json.loads(response.read())


def scoring_body(prompts: Sequence[str] | Sequence[list[int]]) -> dict[str, Any]:
    """lm_eval's loglikelihood request (its ``_create_payload`` with ``generate=False``)."""
    return {"model": MODEL_ID, "prompt": list(prompts), "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": SEED, "echo": True}


def encode_pair(engine: Engine, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The tool's split of a pair into tokens: the context's trailing spaces go to the
    continuation, the whole is tokenized once (no special tokens), the context's length cut off."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = engine.tokenize(context + continuation, add_special=False)
    context_tokens = engine.tokenize(context, add_special=False)
    return context_tokens, whole[len(context_tokens) :]


def loglikelihoods(answer: dict[str, Any], ctxlens: Sequence[int]) -> list[tuple[float, bool]]:
    """The tool's reading of a scored batch: per choice, the sum of the continuation's logprobs
    and whether each was the top one."""
    results = []
    for choice, ctxlen in zip(sorted(answer["choices"], key=lambda c: c["index"]), ctxlens):
        assert ctxlen > 0
        values = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        results.append((sum(values), all(value == max(top.values()) for value, top in zip(values, tops))))
    return results


def generations(answer: dict[str, Any]) -> list[str]:
    """The tool's reading of a generate_until batch: each choice's text at its index."""
    texts: list[str] = [""] * len(answer["choices"])
    for choice in answer["choices"]:
        texts[choice["index"]] = choice["text"]
    return texts


@dataclass
class Greedy:
    text: str
    tokens: list[str]
    logprobs: list[float]
    finish_reason: str


def greedy(server: LiveServer, prompt: str | list[int], max_tokens: int) -> Greedy:
    """What the server generates after ``prompt`` at temperature 0, with each token's logprob as
    it reported it while generating."""
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1}
    [choice] = post(server, body)["choices"]
    logprobs = choice["logprobs"]
    return Greedy(choice["text"], logprobs["tokens"], logprobs["token_logprobs"], choice["finish_reason"])


def by_length(pairs: list[tuple[list[int], list[int]]]) -> list[int]:
    """The order the tool sends pairs in: longest first (its ``Collator``)."""
    return sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0] + pairs[i][1]))


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The tool's disjoint rolling windows over ``tokens`` (context, then tokens to predict): the
    first predicts as many as fit after ``prefix``; each later one the next ones, after as many
    earlier tokens as fit (one token of context at least)."""
    max_seq_len = max_length - 1
    first = min(max_seq_len, len(tokens))
    overlapping = [([prefix, *tokens[: first - 1]], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, max_seq_len)
        end = predicted + count
        overlapping.append((tokens[max(end - max_seq_len - 1, 0) : end - 1], tokens[end - count : end]))
        predicted = end
    windows = [(context[: len(context) - (len(predict) - 1)], predict) for context, predict in overlapping]  # disjoint
    return windows


def test_a_batch_of_token_id_pairs_scores_greedy_continuations_as_their_generation(server: LiveServer, engine: Engine) -> None:
    pairs, expected = [], []
    for context in CONTEXTS:
        generated = greedy(server, engine.tokenize(context, add_special=False), 5)
        assert generated.finish_reason == "length"
        pairs.append(encode_pair(engine, context, generated.text))
        expected.append((sum(generated.logprobs), True, generated.tokens))
        pairs.append(encode_pair(engine, context, " purple banana"))
        expected.append((None, False, None))
    order = by_length(pairs)

    answer = post(server, scoring_body([pairs[i][0] + pairs[i][1] for i in order]))

    assert [c["index"] for c in answer["choices"]] == list(range(len(pairs)))
    results = dict(zip(order, loglikelihoods(answer, [len(pairs[i][0]) for i in order])))
    for position, choice in zip(order, sorted(answer["choices"], key=lambda c: c["index"])):
        context_tokens, continuation = pairs[position]
        total, is_greedy = results[position]
        want_total, want_greedy, want_tokens = expected[position]
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(context_tokens) + len(continuation) + 1  # the prompt, then one generated
        assert choice["finish_reason"] == "length"
        assert is_greedy is want_greedy
        if want_tokens is not None:
            assert logprobs["tokens"][len(context_tokens) : -1] == want_tokens  # the very tokens it generated
            assert total == pytest.approx(want_total, abs=CLOSE)
        else:
            assert total < 0
    assert answer["usage"]["completion_tokens"] == len(pairs)
    assert answer["usage"]["prompt_tokens"] == sum(len(c) + len(t) for c, t in pairs)


def test_string_prompts_score_the_same_once_the_bos_the_server_adds_is_counted(server: LiveServer, engine: Engine) -> None:
    """With ``tokenized_requests=False`` the tool sends the pairs' text. The server tokenizes text
    as OpenAI's, vLLM's and llama-server's do: with the model's BOS first, which the echo shows
    (with ``null``); a tool counting the context with the same tokenizer counts it too."""
    bos = engine.tokenize("", add_special=True)
    assert len(bos) == 1  # the bundled model adds a BOS
    pairs, expected = [], []
    for context in CONTEXTS[:2]:
        generated = greedy(server, context, 4)
        pairs.append((context, generated.text))
        expected.append((sum(generated.logprobs), True))
        pairs.append((context, " purple banana"))
        expected.append(None)

    answer = post(server, scoring_body([context + continuation for context, continuation in pairs]))

    ctxlens = [len(engine.tokenize(context, add_special=True)) for context, _ in pairs]
    for (context, continuation), choice, result, want in zip(pairs, answer["choices"], loglikelihoods(answer, ctxlens), expected):
        assert choice["text"].startswith(context + continuation)
        assert choice["logprobs"]["tokens"][0] == "<s>"
        assert choice["logprobs"]["token_logprobs"][0] is None and choice["logprobs"]["top_logprobs"][0] is None
        assert choice["logprobs"]["text_offset"][0] == 0
        if want is None:
            assert result[1] is False
        else:
            assert result[0] == pytest.approx(want[0], abs=CLOSE) and result[1] is True


def test_a_rolling_loglikelihood_is_the_sum_of_the_text_as_it_was_generated(server: LiveServer, engine: Engine) -> None:
    [bos] = engine.tokenize("", add_special=True)
    generated = greedy(server, [bos], 12)
    document = generated.text.removeprefix(" ")  # the tokenizer writes a word's leading space itself
    tokens = engine.tokenize(document, add_special=False)
    assert [engine.token_bytes(t).decode() for t in tokens] == generated.tokens  # the text tokenizes back into what was generated

    [(context, predicted)] = rolling_windows(tokens, bos, max_length=2048)
    answer = post(server, scoring_body([context + predicted]))

    [(total, _)] = loglikelihoods(answer, [len(context)])
    assert total == pytest.approx(sum(generated.logprobs), abs=CLOSE)


def test_a_rolling_loglikelihood_in_short_windows_scores_every_token_once(server: LiveServer, engine: Engine) -> None:
    [bos] = engine.tokenize("", add_special=True)
    text = " ".join(CONTEXTS)
    tokens = engine.tokenize(text, add_special=False)
    windows = rolling_windows(tokens, bos, max_length=9)
    assert len(windows) > 3 and sum(len(t) for _, t in windows) == len(tokens)

    answer = post(server, scoring_body([c + t for c, t in windows]))

    scores = loglikelihoods(answer, [len(c) for c, _ in windows])
    first_alone = post(server, scoring_body([windows[0][0] + windows[0][1]]))
    assert scores[0][0] == pytest.approx(loglikelihoods(first_alone, [1])[0][0], abs=CLOSE)
    for choice, (context, predicted) in zip(answer["choices"], windows):
        values = choice["logprobs"]["token_logprobs"][len(context) : -1]
        assert len(values) == len(predicted) and all(v is not None and v <= 0 for v in values)


def test_generate_until_cuts_each_batched_answer_at_the_first_of_many_stops(server: LiveServer, engine: Engine) -> None:
    stops = ["\n\n", ".", "Question:", ",", "!", "</s>"]  # the task's until, then the EOS text: more than four
    prompts = [engine.tokenize(context, add_special=False) for context in CONTEXTS]
    free = [greedy(server, prompt, 24).text for prompt in prompts]
    body = {"prompt": prompts, "model": MODEL_ID, "max_tokens": 24, "temperature": 0, "stop": stops, "seed": SEED}

    answer = post(server, body)

    expected = [min((text[: text.index(s)] for s in stops if s in text), key=len, default=text) for text in free]
    assert generations(answer) == expected
    for choice, text, cut in zip(sorted(answer["choices"], key=lambda c: c["index"]), free, expected):
        assert choice["finish_reason"] == ("stop" if cut != text else "length")
        assert choice["logprobs"] is None
    assert any(cut != text for cut, text in zip(expected, free))  # a stop was met


def test_each_scored_token_is_in_its_top_logprobs_as_openai_documents_them(server: LiveServer, engine: Engine) -> None:
    """``logprobs: n`` gives the n most likely tokens and the chosen one too (up to n + 1), so a
    tool can look up a token it scored; ``logprobs: 0`` names just the chosen one."""
    prompt = engine.tokenize(CONTEXTS[0] + " purple banana", add_special=False)

    for top_n in (0, 1):
        answer = post(server, {**scoring_body([prompt]), "logprobs": top_n})

        logprobs = answer["choices"][0]["logprobs"]
        for token, value, top in zip(logprobs["tokens"][1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:]):
            assert top[token] == value and top_n <= len(top) <= top_n + 1
        assert any(len(top) == top_n + 1 for top in logprobs["top_logprobs"][1:])  # " purple" was not the top one


def test_a_continuation_the_model_would_end_after_still_scores_its_last_token(server: LiveServer, engine: Engine) -> None:
    """The one token generated after the scored prompt may end the text (EOS); the tool still drops
    the last entry as that token, so it must be there, as vLLM and OpenAI put it. The bundled model
    rarely ends a story greedily; a logit bias makes it end here."""
    context, continuation = encode_pair(engine, CONTEXTS[1], " He was very happy.")
    eos = engine.tokenize("</s>", add_special=False)
    assert len(eos) == 1
    plain = loglikelihoods(post(server, scoring_body([context + continuation])), [len(context)])

    answer = post(server, {**scoring_body([context + continuation]), "logit_bias": {str(eos[0]): 100}})

    [choice] = answer["choices"]
    assert choice["finish_reason"] == "stop"
    assert loglikelihoods(answer, [len(context)])[0][0] == pytest.approx(plain[0][0], abs=CLOSE)
    assert len(choice["logprobs"]["token_logprobs"]) == len(context) + len(continuation) + 1
