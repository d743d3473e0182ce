"""Scoring a prompt (``echo`` with ``logprobs``) does not pause the server's other streams.

Each chunk of a scored prompt used to be reduced to log-probabilities on the thread that steps
every stream: tens of milliseconds a step at a 32k vocabulary, during which no other buyer got a
token. The scheduler thread now only copies the rows, and a worker reduces them. Here a buyer
scores prompts over HTTP while the reduction is watched (``logprobs.score_block``, which does it):
it runs on another thread than the scheduler's; held up there, it holds up no other buyer, and its
own buyer may hang up meanwhile; and one that fails fails its request alone."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest
from openai import OpenAI

from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer
from vramsupply.engine import logprobs as engine_logprobs

STORY = "Once upon a time, there was a little girl named Lily. She"
OTHER = "The little dog ran to the park with his ball. He"
SCORE = {"model": MODEL_ID, "temperature": 0, "echo": True, "logprobs": 2}
Reduction = Callable[[np.ndarray, np.ndarray, int], list[engine_logprobs.TokenLogprob]]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(aliases=[TINY_MODEL.name], parallel=2) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as sdk:
        yield sdk


def watch_reduction(monkeypatch: pytest.MonkeyPatch, before: Callable[[], None]) -> None:
    """Run ``before`` on the thread of each reduction of prompt rows, ahead of the reduction."""
    reduce: Reduction = engine_logprobs.score_block

    def watched(logits: np.ndarray, tokens: np.ndarray, top_n: int) -> list[engine_logprobs.TokenLogprob]:
        before()
        return reduce(logits, tokens, top_n)

    monkeypatch.setattr("vramsupply.engine.logprobs.score_block", watched)


def prompt_logprobs(client: OpenAI, prompt: str) -> list[float | None]:
    logprobs = client.completions.create(prompt=prompt, max_tokens=0, **SCORE).choices[0].logprobs  # type: ignore[call-overload]
    assert logprobs is not None and logprobs.token_logprobs is not None
    return list(logprobs.token_logprobs)


def send_score_request(server: LiveServer, prompt: str) -> socket.socket:
    """A buyer who sends a scoring request and may hang up before its answer."""
    address = urlsplit(server.url)
    body = json.dumps({**SCORE, "prompt": prompt, "max_tokens": 0}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    buyer = socket.create_connection((address.hostname, address.port))
    buyer.sendall(head.encode() + body)
    return buyer


def test_a_prompt_is_reduced_to_its_logprobs_off_the_thread_that_steps_every_stream(
    server: LiveServer, client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.engine is not None
    expected = prompt_logprobs(client, STORY)
    threads: list[int] = []
    watch_reduction(monkeypatch, lambda: threads.append(threading.get_ident()))

    scored = prompt_logprobs(client, STORY)

    assert scored == expected and scored[0] is None and len(scored) > 10
    scheduler = server.engine._scheduler._thread.ident
    assert threads and scheduler is not None
    assert scheduler not in threads


def test_while_a_prompt_s_reduction_is_held_up_another_buyer_is_served_and_its_own_may_hang_up(
    server: LiveServer, client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.engine
    assert engine is not None
    expected = prompt_logprobs(client, OTHER)
    entered, release = threading.Event(), threading.Event()
    watch_reduction(monkeypatch, lambda: (entered.set(), release.wait(120)))
    try:
        buyer = send_score_request(server, STORY)
        assert entered.wait(60), "the prompt's rows reached the reduction"

        other = client.completions.create(model=MODEL_ID, prompt=OTHER, max_tokens=8, temperature=0)  # while it is held

        assert other.choices[0].finish_reason == "length" and other.usage is not None and other.usage.completion_tokens == 8
        buyer.close()  # the scoring buyer hangs up before its scores are made
        for _ in range(600):
            if engine.stats().slots_busy == 0:
                break
            threading.Event().wait(0.05)
        assert engine.stats().slots_busy == 0, "the slot of the buyer who hung up is free, its reduction still held"
    finally:
        release.set()
    monkeypatch.undo()
    assert prompt_logprobs(client, OTHER) == expected  # the worker goes on scoring


def test_a_reduction_that_fails_fails_its_own_request_and_the_server_goes_on(
    server: LiveServer, client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = prompt_logprobs(client, STORY)

    def fail() -> None:
        raise MemoryError("no room for the temporaries")

    watch_reduction(monkeypatch, fail)
    with pytest.raises(openai.InternalServerError) as failed:
        client.completions.create(prompt=STORY, max_tokens=1, **SCORE)  # type: ignore[call-overload]
    monkeypatch.undo()

    error = json.loads(failed.value.response.text)["error"]
    assert error["type"] == "server_error" and "scoring this request's prompt failed" in error["message"]
    assert "no room for the temporaries" in error["message"]
    assert prompt_logprobs(client, STORY) == expected
    answer = client.completions.create(model=MODEL_ID, prompt=OTHER, max_tokens=4, temperature=0)
    assert answer.usage is not None and answer.usage.completion_tokens == 4
