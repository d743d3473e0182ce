"""The small parts of an answer that OpenAI clients read besides the text.

- ``system_fingerprint`` on every chat and text completion and on every streamed chunk, the same
  for the same setup (after a restart too), another for another context size;
- server-sent events as ``text/event-stream; charset=utf-8``;
- ``x-request-id`` on every response, errors included (the openai SDK's ``_request_id``), a
  client's own sane ``X-Request-Id`` echoed; the completion id ends with the request's own hex;
  where the client's id is echoed, the agent's access line names the completion id after it (it
  named the client's alone: the id in the body, also the ledger's, led to no line, nor back);
- ``max_model_len`` (vLLM's) in ``/v1/models``: the context served, by our engine or an upstream;
- the last chunk of a stream with logprobs says ``"logprobs": null``, as OpenAI's does;
- a ``response_format`` schema may recurse through ``$ref`` (``"#"`` included); one that recurses
  before writing any JSON is a 400 naming the schema, and llama.cpp logs no error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from doubles.hostile_upstream import HostileUpstream, fronted
from openai import OpenAI

from agent_process import AgentProcess
from conftest import TINY_MODEL
from live_server import MODEL_ID, LiveServer

from vramsupply.ledger import LedgerStore, default_ledger_path

STORY = [{"role": "user", "content": "Tell me a story"}]
FINGERPRINT = re.compile(r"fp_[0-9a-f]{10}")
TREE = {"type": "object", "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}}, "required": ["name"]}
LOOP = {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]}}, "$ref": "#/$defs/a"}


@pytest.fixture(scope="module")
def agent() -> Iterator[LiveServer]:
    with LiveServer(n_ctx=1024) as live:
        yield live


def post(agent: LiveServer, path: str, body: dict[str, Any], **headers: str) -> requests.Response:
    return requests.post(agent.base_url + path, json={"max_tokens": 4, **body}, headers=headers, timeout=60)


def events(response: requests.Response) -> list[dict[str, Any]]:
    blocks = [b.removeprefix("data: ") for b in response.text.split("\n\n") if b.startswith("data: ")]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


def test_every_answer_and_every_chunk_carries_the_setup_s_fingerprint(agent: LiveServer) -> None:
    chat = post(agent, "/chat/completions", {"messages": STORY}).json()
    text = post(agent, "/completions", {"prompt": "Once"}).json()
    chunks = events(post(agent, "/chat/completions", {"messages": STORY, "stream": True, "stream_options": {"include_usage": True}}))
    chunks += events(post(agent, "/completions", {"prompt": "Once", "stream": True, "logprobs": 1}))
    assert FINGERPRINT.fullmatch(chat["system_fingerprint"])
    assert {d["system_fingerprint"] for d in [chat, text, *chunks]} == {chat["system_fingerprint"]}


def test_the_fingerprint_survives_a_restart_and_changes_with_the_context(agent: LiveServer) -> None:
    before = post(agent, "/completions", {"prompt": "Once"}).json()["system_fingerprint"]
    for n_ctx, same in ((1024, True), (512, False)):
        with LiveServer(n_ctx=n_ctx) as other:
            assert (post(other, "/completions", {"prompt": "Once"}).json()["system_fingerprint"] == before) is same


def test_streams_are_utf8_event_streams(agent: LiveServer) -> None:
    for path, body in (("/chat/completions", {"messages": STORY}), ("/completions", {"prompt": "Once"})):
        response = post(agent, path, {**body, "stream": True})
        assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"


def test_every_response_names_its_request(agent: LiveServer) -> None:
    answered = post(agent, "/chat/completions", {"messages": STORY})
    own = answered.headers["x-request-id"]
    assert re.fullmatch(r"req_[0-9a-f]{24}", own) and answered.json()["id"] == "chatcmpl-" + own.removeprefix("req_")
    streamed = post(agent, "/completions", {"prompt": "Once", "stream": True})
    assert events(streamed)[0]["id"] == "cmpl-" + streamed.headers["x-request-id"].removeprefix("req_")
    failures = [
        post(agent, "/chat/completions", {"messages": "not a list"}),
        requests.get(agent.base_url + "/nowhere", timeout=10),
        requests.get(agent.base_url + "/models/unknown-model", timeout=10),
    ]
    assert [f.status_code for f in failures] == [400, 404, 404]
    ids = [f.headers["x-request-id"] for f in [*failures, answered, streamed]]
    assert len(set(ids)) == len(ids), "one id per request"


def test_a_client_s_own_request_id_is_echoed_when_it_is_a_sane_token(agent: LiveServer) -> None:
    assert post(agent, "/chat/completions", {"messages": STORY}, **{"X-Request-Id": "trace-42/a.b"}).headers["x-request-id"] == "trace-42/a.b"
    for odd in ("has space", "x" * 200, "é"):
        echoed = post(agent, "/chat/completions", {"messages": STORY}, **{"X-Request-Id": odd.encode().decode("latin-1")}).headers["x-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{24}", echoed), odd
    with OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0) as client:
        completion = client.chat.completions.create(model=MODEL_ID, messages=STORY, max_tokens=2)
    assert completion._request_id == "req_" + completion.id.removeprefix("chatcmpl-")


def test_a_buyer_who_sent_its_own_request_id_finds_its_request_by_either_id() -> None:
    with AgentProcess("--model", str(TINY_MODEL), "--no-register", "--port", "0") as agent:
        agent.wait_ready()
        with OpenAI(base_url=agent.base_url, api_key="unused", max_retries=0) as client:
            traced = client.chat.completions.with_raw_response.create(
                model=MODEL_ID, messages=STORY, max_tokens=2, extra_headers={"X-Request-Id": "trace-42"}
            )
            with client.completions.create(model=MODEL_ID, prompt="Once", max_tokens=2, stream=True, extra_headers={"X-Request-Id": "trace-43"}) as stream:
                streamed = [chunk.id for chunk in stream][0]
            plain = client.chat.completions.create(model=MODEL_ID, messages=STORY, max_tokens=2)
        assert agent.stop() == 0

    chat = traced.parse()
    assert traced.headers["x-request-id"] == "trace-42", "the buyer's own id is still echoed"
    lines = [line for line in agent.stderr if " vramsupply.access: " in line and '"POST /v1/' in line]
    assert len(lines) == 3, lines
    assert lines[0].endswith(f" trace-42 {chat.id}") and lines[1].endswith(f" trace-43 {streamed}"), lines
    assert lines[2].endswith(" req_" + plain.id.removeprefix("chatcmpl-")), "its own id names it already: said once"
    store = LedgerStore(default_ledger_path())
    assert sorted(e.request_id for e in store.entries()) == sorted([chat.id, streamed, plain.id]), "the ledger's rows are found by the access line's ids"
    store.close()


def test_the_model_list_says_the_context_served(agent: LiveServer) -> None:
    [card] = requests.get(agent.base_url + "/models", timeout=10).json()["data"]
    assert card["max_model_len"] == 1024
    assert requests.get(agent.base_url + f"/models/{MODEL_ID}", timeout=10).json()["max_model_len"] == 1024


async def test_an_upstream_s_model_list_says_the_context_it_is_sold_with() -> None:
    for options, context in (({}, 8192), ({"context_length": 4096}, 4096)):  # the upstream's /props says 8192
        async with fronted(HostileUpstream(), **options) as front:
            async with front.buyer.get(front.url + "/v1/models") as response:
                [card] = (await response.json())["data"]
                assert card["max_model_len"] == context
                assert re.fullmatch(r"req_[0-9a-f]{24}", response.headers["x-request-id"])


def test_the_last_chunk_of_a_stream_with_logprobs_has_none(agent: LiveServer) -> None:
    chunks = events(post(agent, "/chat/completions", {"messages": STORY, "stream": True, "logprobs": True, "max_tokens": 3}))
    *middle, last = [c for c in chunks if c["choices"]]
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["logprobs"] is None
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in middle if c["choices"][0]["logprobs"]) == 3


def test_a_schema_may_recurse_inside_its_json(agent: LiveServer) -> None:
    tree = {"type": "json_schema", "json_schema": {"name": "tree", "schema": TREE}}
    response = post(agent, "/chat/completions", {"messages": STORY, "response_format": tree, "max_tokens": 30, "temperature": 0})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"].replace(" ", "").startswith('{"name"')


def test_a_schema_that_recurses_before_any_json_is_a_400_naming_it(agent: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    loop = {"type": "json_schema", "json_schema": {"name": "loop", "schema": LOOP}}
    with caplog.at_level(logging.WARNING):
        response = post(agent, "/chat/completions", {"messages": STORY, "response_format": loop})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "response_format.json_schema.schema"
    assert "'#/$defs/a' refers back to $defs.a" in error["message"] and "left recursion" in error["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
