"""A model whose chat template refuses the system role (Gemma 2's raises "System role not
supported") still serves agents, which send a system message first nearly always: its text goes at
the head of the next user message (``engine/messages.py`` ``system_in_user``)."""

from __future__ import annotations

from pathlib import Path

from chat_models import template_text
from live_server import MODEL_ID, LiveServer
from test_agent_api import sdk
from vramsupply.engine import ChatRequest
from vramsupply.engine.chat import ChatTemplate

GEMMA2 = ChatTemplate(template_text("gemma2"), "<bos>", "<eos>")
SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def test_a_system_message_opens_the_first_user_turn_of_a_template_without_the_system_role() -> None:
    prompt = GEMMA2.render([SYSTEM, {"role": "user", "content": "Hi there"}])
    assert prompt == "<bos><start_of_turn>user\nYou are a terse assistant.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_developer_messages_and_later_system_messages_go_to_the_user_turn_after_them() -> None:
    messages = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Salut"},
        {"role": "system", "content": "Now answer in German."},
        {"role": "user", "content": "Bye"},
    ]
    assert GEMMA2.render(messages) == (
        "<bos><start_of_turn>user\nAnswer in French.\n\nHi<end_of_turn>\n<start_of_turn>model\nSalut<end_of_turn>\n"
        "<start_of_turn>user\nNow answer in German.\n\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_a_system_message_with_no_user_message_after_it_is_a_user_turn_of_its_own() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, SYSTEM]
    assert GEMMA2.render(messages).endswith("<start_of_turn>user\nYou are a terse assistant.<end_of_turn>\n<start_of_turn>model\n")


def test_a_template_that_takes_the_system_role_gets_it_as_sent() -> None:
    llama3 = ChatTemplate(template_text("llama3"), "<s>", "</s>")
    prompt = llama3.render([SYSTEM, {"role": "user", "content": "Hi there"}])
    assert "You are a terse assistant.<|eot_id|>" in prompt and "You are a terse assistant.\n\nHi there" not in prompt


def test_the_template_s_own_errors_are_still_the_buyer_s_400() -> None:
    """Roles out of turn fail in the template as before, system or not."""
    try:
        GEMMA2.render([SYSTEM, {"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}])
    except ValueError as error:
        assert "Conversation roles must alternate" in str(error)
    else:
        raise AssertionError("the template's own error was lost")


def test_an_agent_with_a_system_prompt_is_served_by_a_gemma_2_style_model(chat_models: dict[str, Path]) -> None:
    messages = [SYSTEM, {"role": "user", "content": "Once upon a time"}]
    with LiveServer(model_path=chat_models["gemma2"], n_ctx=2048, threads=1) as live, sdk(live) as client:
        response = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4, seed=1)  # type: ignore[arg-type]
        assert live.engine is not None
        merged = [{"role": "user", "content": "You are a terse assistant.\n\nOnce upon a time"}]
        assert response.usage is not None
        assert response.usage.prompt_tokens == len(live.engine.prepare_chat(ChatRequest(merged)).tokens)
        assert response.choices[0].finish_reason in ("length", "stop")


def test_a_system_message_before_an_assistant_turn_being_continued_stays_in_the_prompt() -> None:
    """vLLM's continue_final_message: the assistant's text is continued, so nothing may go after it."""
    messages = [
        {"role": "user", "content": "Write a poem"},
        {"role": "system", "content": "Answer only in French."},
        {"role": "assistant", "content": "Once"},
    ]
    prompt = GEMMA2.render_turn(messages, None, {}, open_turn=False)
    assert prompt == "<bos><start_of_turn>user\nWrite a poem\n\nAnswer only in French.<end_of_turn>\n<start_of_turn>model\nOnce<end_of_turn>\n"
