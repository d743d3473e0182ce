"""A thinking model's edges, through the official openai SDK: ``reasoning_effort`` sent among
``chat_template_kwargs``.

The server runs the tiny model with a gpt-oss-style template, which reads ``reasoning_effort``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from live_server import MODEL_ID, LiveServer
from test_agent_api import ASK, sdk
from vramsupply.engine import ChatRequest

EFFORTS = "'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'"


@pytest.fixture(scope="module")
def gpt_oss(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    with LiveServer(model_path=chat_models["gpt-oss"], n_ctx=2048, threads=1) as live:
        yield live


# ---- reasoning_effort in chat_template_kwargs -----------------------------------------------------


def refusal(client: openai.OpenAI, **fields: object) -> dict:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=1, **fields)  # type: ignore[arg-type]
    return refused.value.body


def test_a_reasoning_effort_in_chat_template_kwargs_is_held_to_openai_s_values(gpt_oss: LiveServer) -> None:
    """The template reads the same variable either way ("Reasoning: banana" in gpt-oss's system
    message): the top-level field was a 400, the kwargs' one reached the template as sent."""
    with sdk(gpt_oss) as client:
        for unknown in ("banana", "HIGH", "", 5, True, ["high"]):
            assert refusal(client, extra_body={"chat_template_kwargs": {"reasoning_effort": unknown}}) == {
                "message": f"Invalid value for 'chat_template_kwargs.reasoning_effort': Input should be {EFFORTS}",
                "type": "invalid_request_error", "param": "chat_template_kwargs.reasoning_effort", "code": "invalid_value",
            }, unknown
        assert refusal(client, extra_body={"chat_template_kwargs": ["high"]})["param"] == "chat_template_kwargs"


def test_reasoning_effort_given_twice_must_agree(gpt_oss: LiveServer) -> None:
    """Both set the template's ``reasoning_effort``: the same value is taken, two are a 400 (before,
    the kwargs' one won silently); a null in the kwargs is not given, as at the top level."""
    assert gpt_oss.engine is not None

    def prompt_tokens(**fields: object) -> int:
        response = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=1, seed=1, **fields)  # type: ignore[arg-type]
        assert response.usage is not None
        return response.usage.prompt_tokens

    def rendered(variables: dict) -> int:
        return len(gpt_oss.engine.prepare_chat(ChatRequest(ASK, template_variables=variables)).tokens)  # type: ignore[union-attr]

    with sdk(gpt_oss) as client:
        assert prompt_tokens(reasoning_effort="high", extra_body={"chat_template_kwargs": {"reasoning_effort": "high"}}) == rendered({"reasoning_effort": "high"})
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"reasoning_effort": "low"}}) == rendered({"reasoning_effort": "low"})
        assert prompt_tokens(reasoning_effort="low", extra_body={"chat_template_kwargs": {"reasoning_effort": None}}) == rendered({"reasoning_effort": "low"})
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"reasoning_effort": None}}) == rendered({})
        assert refusal(client, reasoning_effort="low", extra_body={"chat_template_kwargs": {"reasoning_effort": "high"}}) == {
            "message": "'reasoning_effort' ('low') and 'chat_template_kwargs.reasoning_effort' ('high') are the same setting and were given different values: send one.",
            "type": "invalid_request_error", "param": "chat_template_kwargs.reasoning_effort", "code": "invalid_value",
        }
