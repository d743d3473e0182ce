"""``tool_choice: "none"``: the model still sees the tools, it only may not call them.

At OpenAI (and in llama-server and vLLM) the tools stay in the prompt with ``none``. Here they
were left out, so the model lost sight of them, and an agent that switches between ``auto`` and
``none`` from turn to turn lost its cached prompt prefix at each switch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from live_server import MODEL_ID, LiveServer, chat_server
from vramsupply.engine import ChatRequest
from vramsupply.engine.chat import ChatTemplate
from vramsupply.engine.conversation import prepare_chat

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    }
]


@pytest.fixture(scope="module")
def mistral(chat_models: dict[str, Path]) -> Iterator[LiveServer]:
    yield from chat_server(chat_models, "mistral")


def test_with_tool_choice_none_the_prompt_still_shows_the_tools_and_nothing_is_called(mistral: LiveServer) -> None:
    assert mistral.engine is not None
    [marker] = mistral.engine.tokenize("[TOOL_CALLS]", add_special=False)
    options = {"model": MODEL_ID, "messages": ASK, "max_tokens": 8, "temperature": 0}
    with OpenAI(base_url=mistral.base_url, api_key="unused", max_retries=0) as client:
        auto = client.chat.completions.create(**options, tools=TOOLS)
        none = client.chat.completions.create(**options, tools=TOOLS, tool_choice="none", logit_bias={str(marker): 100})
        bare = client.chat.completions.create(**options)

    assert none.usage.prompt_tokens == auto.usage.prompt_tokens > bare.usage.prompt_tokens
    assert none.usage.prompt_tokens_details.cached_tokens >= auto.usage.prompt_tokens - 1, "the switch keeps the prefix"
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "length"


def test_a_template_that_cannot_show_tools_answers_tool_choice_none_without_them() -> None:
    """Such a template is refused for ``auto`` (a 400 naming tools); with ``none`` there is nothing to refuse."""
    template = ChatTemplate(
        "{% if tools %}{{ raise_exception('this template has no tools') }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
        bos_text="<s>", eos_text="</s>",
    )
    request = ChatRequest(messages=ASK, tools=TOOLS, tool_choice="none")

    chat = prepare_chat(template, request, lambda text: [ord(c) for c in text], lambda markers: frozenset())

    assert "".join(map(chr, chat.tokens)) == "user: What is the weather in Paris?\n" and chat.syntax is None
