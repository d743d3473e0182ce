"""A buyer whose code was written for vLLM sends options this server does not have: beam search,
``prompt_logprobs``, ``allowed_token_ids``, ``priority``… Before, each was a 200 whose answer
ignored it. Now a value other than vLLM's default is a 400 naming the field, saying it is not
supported and, where there is one, what to send instead; the default (or null), which vLLM's
clients send for every field, is still a 200.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from live_server import MODEL_ID, LiveServer

COMPLETION = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}

REFUSED: list[tuple[str, Any, str]] = [
    ("prompt_logprobs", 1, "send echo: true with logprobs N"),
    ("prompt_logprobs", 0, "send echo: true with logprobs N"),
    ("use_beam_search", True, "no beam search"),
    ("length_penalty", 0.5, "beam search"),
    ("allowed_token_ids", [1, 2], "send logit_bias instead"),
    ("bad_words", ["dragon"], "send logit_bias instead"),
    ("logits_processors", ["my.module:Processor"], "not supported"),
    ("truncate_prompt_tokens", 8, "send it shorter"),
    ("return_tokens_as_token_ids", True, "not supported"),
    ("priority", 5, "served in the order"),
    ("skip_special_tokens", False, "special tokens' text is never shown"),
    ("priority", "high", "not supported"),  # a wrong type gets the same 400, not a type error
]
DEFAULTS: list[tuple[str, Any]] = [
    ("prompt_logprobs", None),
    ("use_beam_search", False),
    ("length_penalty", 1.0),
    ("length_penalty", 1),
    ("allowed_token_ids", []),
    ("allowed_token_ids", None),
    ("bad_words", []),
    ("logits_processors", None),
    ("truncate_prompt_tokens", None),
    ("return_tokens_as_token_ids", False),
    ("priority", 0),
    ("skip_special_tokens", True),
    ("spaces_between_special_tokens", False),  # accepted on purpose: it only joins text never shown
]


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer() as server:
        yield server


async def post(live: LiveServer, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{live.base_url}/{route}", json=body) as response:
            return response.status, await response.json()


@pytest.mark.parametrize(("field", "value", "instead"), REFUSED)
async def test_a_vllm_option_this_server_lacks_is_a_400_naming_it(live: LiveServer, field: str, value: Any, instead: str) -> None:
    status, body = await post(live, "completions", {**COMPLETION, field: value})

    assert status == 400, body
    error = body["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert f"{field} is not supported by this server" in error["message"] and instead in error["message"]


@pytest.mark.parametrize(("field", "value", "instead"), [case for case in REFUSED if case[0] in ("prompt_logprobs", "use_beam_search", "skip_special_tokens")])
async def test_the_chat_route_refuses_them_too(live: LiveServer, field: str, value: Any, instead: str) -> None:
    status, body = await post(live, "chat/completions", {**CHAT, field: value})

    assert status == 400, body
    assert body["error"]["param"] == field and instead in body["error"]["message"]


@pytest.mark.parametrize(("field", "value"), DEFAULTS)
@pytest.mark.parametrize(("route", "request_body"), [("completions", COMPLETION), ("chat/completions", CHAT)])
async def test_their_default_values_are_accepted(live: LiveServer, route: str, request_body: dict[str, Any], field: str, value: Any) -> None:
    status, body = await post(live, route, {**request_body, field: value})

    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"


async def test_vllm_clients_defaults_all_at_once_are_a_200(live: LiveServer) -> None:
    sent = {**COMPLETION, **dict(DEFAULTS)}
    status, body = await post(live, "completions", sent)

    assert status == 200, body
