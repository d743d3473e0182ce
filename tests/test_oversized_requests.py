"""A buyer's oversized request is refused cheaply, and a large answer is built off the event loop.

A review found one buyer could hold up every other: 20 bodies of 2M token ids each (under the 4 MiB
body limit) kept `/health` from answering for 6 s, since every id was checked three times on the
event loop before the prompt's length was compared with the context; 40 text prompts of 4 MiB
each, tokenized whole on the threads every buyer's long prompt shares, made a small request wait
15 s; and an answer of 16 × 1,900 tokens with 20 logprobs each was built on the event loop for
5-7 s. How long each takes is measured in ``bench/oversized_requests.py``; here, that they are
refused as before, and that an answer built on a thread is the answer built inline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from live_server import LiveServer
from vramsupply.engine import ContextOverflow
from vramsupply.server import completions

N_CTX = 256


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(n_ctx=N_CTX, parallel=2) as live:
        yield live


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http: aiohttp.ClientSession, server: LiveServer, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.post(server.url + path, json=body) as response:
        return response.status, await response.json()


async def test_token_ids_past_the_context_are_refused_for_their_count(server: LiveServer, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, server, "/v1/completions", {"prompt": [1] * 200_000, "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert f"the prompt has 200000 tokens but the context holds {N_CTX}" in body["error"]["message"]
    # in a batch too, and a batch of ids that fit is served
    status, body = await post(http, server, "/v1/completions", {"prompt": [[1, 2], [1] * 100_000], "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = await post(http, server, "/v1/completions", {"prompt": [[1, 2], [1, 3]], "max_tokens": 1})
    assert status == 200 and len(body["choices"]) == 2


async def test_a_token_id_past_64_bits_is_named_as_not_in_the_vocabulary(server: LiveServer, http: aiohttp.ClientSession) -> None:
    """It said "the prompt must be a non-empty list of integer token ids", which it was."""
    status, body = await post(http, server, "/v1/completions", {"prompt": [1, 10**22], "max_tokens": 1})
    assert status == 400 and body["error"]["message"].startswith(f"prompt token {10**22} is not in the vocabulary")


async def test_a_text_far_past_the_context_is_refused_from_its_start(server: LiveServer, http: aiohttp.ClientSession) -> None:
    long = "Once upon a time " * 5000  # 85,000 characters: past N_CTX × 16, so only its start is tokenized
    for path, body, param in (
        ("/v1/completions", {"prompt": long, "max_tokens": 1}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}], "max_tokens": 1}, "messages"),
    ):
        status, answer = await post(http, server, path, body)
        assert status == 400, answer
        error = answer["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert "the prompt has more than " in error["message"] and f"tokens but the context holds {N_CTX}" in error["message"]


def test_a_start_past_the_context_is_an_overflow_and_a_start_within_it_is_not(server: LiveServer) -> None:
    engine = server.engine
    assert engine is not None
    per_token = "Once upon a time " * 4  # about 4 characters a token, as text runs
    with pytest.raises(ContextOverflow) as info:
        engine.tokenize_prompt(per_token * 400)
    assert str(info.value).startswith("the prompt has more than ")
    assert info.value.prompt_tokens > N_CTX
    assert len(engine.tokenize_prompt(per_token * 2)) < N_CTX  # short: tokenized whole, as before


async def test_a_single_over_long_stop_string_names_stop(server: LiveServer, http: aiohttp.ClientSession) -> None:
    status, body = await post(http, server, "/v1/completions", {"prompt": "Once", "max_tokens": 1, "stop": "a" * 5000})
    assert status == 400 and body["error"]["param"] == "stop", body  # it said stop[0]: the buyer sent no list


async def test_an_answer_built_on_a_thread_is_the_answer_built_inline(
    server: LiveServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    await post(http, server, "/v1/chat/completions", request)  # the prompt is cached for both below
    _, inline = await post(http, server, "/v1/chat/completions", request)
    monkeypatch.setattr(completions, "COSTLY_LOGPROBS", 0)
    _, threaded = await post(http, server, "/v1/chat/completions", request)
    for answer in (inline, threaded):
        answer.pop("id"), answer.pop("created")
    assert threaded == inline and all(choice["logprobs"]["content"] for choice in threaded["choices"])
