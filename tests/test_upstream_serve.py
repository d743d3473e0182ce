"""Selling a server the provider already runs: `vramsupply serve --engine upstream` in front of a
real third-party OpenAI server (llama-cpp-python's `python -m llama_cpp.server`), end to end
through the reference platform."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest
from agent_process import AgentProcess
from conftest import run_cli
from live_platform import API_KEY, LivePlatform, free_port
from llama_cpp_upstream import LlamaCppServer, request_json, wait_until
from openai import OpenAI

from vramsupply.ledger import LedgerStore, default_ledger_path
from vramsupply.upstream import UpstreamBackend, UpstreamError, UpstreamOptions
from vramsupply.upstream.backend import pick_model
from vramsupply.upstream.client import DiscoveredModel

TOKEN = "upstream-endpoint-token"
MESSAGES = [{"role": "user", "content": "Once upon a time"}]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def agent_env(platform_url: str) -> dict[str, str]:
    return {
        "VRAM_SUPPLY_PLATFORM_URL": platform_url,
        "VRAM_SUPPLY_API_KEY": API_KEY,
        "VRAM_SUPPLY_HEARTBEAT_INTERVAL": "0.2",
        "VRAM_SUPPLY_ENDPOINT_TOKEN": TOKEN,
        "VRAM_SUPPLY_MAX_BODY_BYTES": "65536",
    }


def metric(endpoint: str, name: str) -> float:
    with urllib.request.urlopen(endpoint + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def test_a_running_llama_cpp_server_is_sold_with_exact_usage_streamed_and_taken_off_the_market() -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with LlamaCppServer() as upstream, LivePlatform() as platform:
        agent = AgentProcess(
            "--engine", "upstream", "--upstream-url", upstream.base_url, "--context-length", "512",
            "--port", str(port), "--endpoint-url", endpoint, env=agent_env(platform.url),
        )  # fmt: skip
        try:
            agent.wait_for(lambda: len(platform.providers) == 1, "registration once the upstream is ready")
            [provider] = platform.providers
            assert (provider.offer.model, provider.offer.context_length_offered, provider.offer.gguf_repo) == ("stories260k", 512, None)
            ready = f"serving stories260k at {endpoint}/v1 through upstream at {upstream.base_url}"
            agent.wait_for(lambda: agent.printed(ready), "the ready line (read from the agent's stdout by a thread)")

            # What the upstream itself bills for this request, asked directly and without streaming.
            body = {"messages": MESSAGES, "max_tokens": 24, "temperature": 0}
            _, direct = request_json(upstream.base_url + "/chat/completions", body)
            expected = (direct["usage"]["prompt_tokens"], direct["usage"]["completion_tokens"])

            status, bought = request_json(platform.url + "/v1/chat/completions", {**body, "model": "stories260k"}, {"Authorization": f"Bearer {API_KEY}"})
            assert status == 200 and bought["model"] == "stories260k"
            assert (bought["usage"]["prompt_tokens"], bought["usage"]["completion_tokens"]) == expected
            assert bought["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]

            # llama_cpp.server streams without usage: the front counts it with the model's tokenizer.
            with OpenAI(base_url=platform.url + "/v1", api_key=API_KEY, max_retries=0) as client:
                chunks = list(
                    client.chat.completions.create(
                        model="stories260k", messages=MESSAGES, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
                    )
                )
            pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert len(pieces) > 1, "passed through chunk by chunk"
            assert "".join(pieces) == direct["choices"][0]["message"]["content"]
            assert chunks[-1].usage is not None and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == expected
            assert all(c.model == "stories260k" for c in chunks)

            # The same for /v1/completions, asked of the agent directly.
            prompt = {"prompt": "Lily and Tom", "max_tokens": 30, "temperature": 0}
            _, plain = request_json(upstream.base_url + "/completions", prompt)
            with OpenAI(base_url=endpoint + "/v1", api_key=TOKEN, max_retries=0) as client:
                text_chunks = list(client.completions.create(model="stories260k", **prompt, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
            assert "".join(c.choices[0].text for c in text_chunks if c.choices) == plain["choices"][0]["text"]
            assert text_chunks[-1].usage is not None
            assert (text_chunks[-1].usage.prompt_tokens, text_chunks[-1].usage.completion_tokens) == (plain["usage"]["prompt_tokens"], plain["usage"]["completion_tokens"])

            agent.wait_for(lambda: provider.routed_completion_tokens == 2 * expected[1], "the platform billing both answers")
            served = 2 * expected[1] + plain["usage"]["completion_tokens"]
            agent.wait_for(lambda: provider.reported_completion_tokens == served, "heartbeats carrying the served tokens")

            # A buyer who hangs up mid-stream: the front cancels and closes the upstream request.
            long_stream = json.dumps({"prompt": "Once", "max_tokens": 400, "stream": True}).encode()
            request = urllib.request.Request(endpoint + "/v1/completions", long_stream, {"Content-Type": "application/json", **AUTH})
            with urllib.request.urlopen(request, timeout=30) as reply:
                assert reply.status == 200 and reply.readline().startswith(b"data: ")
            wait_until(lambda: metric(endpoint, "vramsupply_requests_in_flight") == 0, "the forwarded request ended")

            # Our front's own checks, before anything reaches the upstream.
            assert request_json(endpoint + "/v1/chat/completions", body)[0] == 401
            status, error = request_json(endpoint + "/v1/chat/completions", {**body, "model": "gpt-4"}, AUTH)
            assert status == 404 and error["error"]["code"] == "model_not_found"
            status, error = request_json(endpoint + "/v1/chat/completions", {**body, "messages": "x" * 70_000}, AUTH)
            assert status == 413 and error["error"]["code"] == "request_too_large" and "65536" in error["error"]["message"]

            # The upstream dies: /health says 503, and the next heartbeat (sent at once, not waiting
            # for the platform's own health check) takes us off the market.
            upstream.kill()
            wait_until(lambda: request_json(endpoint + "/health")[0] == 503, "/health 503 once the upstream is gone", timeout=30)
            status, error = request_json(endpoint + "/v1/chat/completions", body, AUTH)
            assert status == 503 and error["error"]["code"] == "upstream_unavailable"
            agent.wait_for(lambda: provider.status == "offline", "the platform told by a heartbeat")
            agent.wait_for(lambda: f"told the platform to route nothing to {provider.id}" in agent.log, "the agent saying so")
            status, error = request_json(platform.url + "/v1/chat/completions", {**body, "model": "stories260k"}, {"Authorization": f"Bearer {API_KEY}"})
            assert status >= 400, "no buyer is routed to an agent whose upstream is down"

            # It comes back: the agent serves again, and the platform's next health check lists us.
            with LlamaCppServer(port=upstream.port):
                wait_until(lambda: request_json(endpoint + "/health")[0] == 200, "/health 200 once the upstream is back", timeout=60)
                agent.wait_for(lambda: "serving again" in agent.log, "a heartbeat saying we serve again")
                platform.check_health_now()
                assert provider.status == "online"
                status, bought = request_json(platform.url + "/v1/chat/completions", {**body, "model": "stories260k"}, {"Authorization": f"Bearer {API_KEY}"})
                assert status == 200 and bought["usage"]["completion_tokens"] == expected[1]
                served += expected[1]

            assert agent.stop(signal.SIGTERM) == 0
        finally:
            agent.kill()
        assert platform.providers == [], "deregistered on SIGTERM"
    assert "upstream not ready: the upstream server at" in agent.log
    ledger = LedgerStore(default_ledger_path()).entries()
    assert len(ledger) == 4 and sum(e.completion_tokens for e in ledger) == served, "every answer in the earnings ledger"
    assert "Traceback" not in agent.log and TOKEN not in agent.log


def test_an_upstream_that_does_not_say_its_context_needs_the_flag() -> None:
    with LlamaCppServer() as upstream:
        result = run_cli("serve", "--engine", "upstream", "--upstream-url", upstream.base_url, "--port", "0", "--no-register")
    assert result.returncode == 1
    assert "error: the upstream does not say its context length: pass --context-length" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_upstream_that_is_not_running_is_named_in_one_line() -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    result = run_cli("serve", "--engine", "upstream", "--upstream-url", nowhere, "--no-register")
    assert result.returncode == 1
    assert f"error: cannot ask the upstream which model it serves ({nowhere}/models:" in result.stderr
    assert "pass --upstream-model" in result.stderr and "Traceback" not in result.stderr


async def test_the_upstream_engine_needs_a_url_and_a_choice_among_several_models() -> None:
    with pytest.raises(UpstreamError, match="needs the server's URL: pass --upstream-url"):
        await UpstreamBackend(UpstreamOptions("upstream", model=None, upstream_model=None)).prepare()
    listed = [DiscoveredModel("qwen3:8b", None), DiscoveredModel("llama3.1:8b", None)]
    assert pick_model(listed[:1], None) == "qwen3:8b"
    assert pick_model(listed, "LLAMA3.1:8B") == "llama3.1:8b"
    with pytest.raises(UpstreamError, match=r"several models \(qwen3:8b, llama3.1:8b\): pass --upstream-model NAME"):
        pick_model(listed, None)
