"""Rendering chat messages into a prompt with the model's own Jinja2 chat template.

The template comes from the GGUF's ``tokenizer.chat_template`` and is rendered in a sandbox by
llama-cpp-python's ``Jinja2ChatFormatter``, the same way HuggingFace transformers render it. A
model without a template (or with one Jinja2 cannot compile) gets ``FALLBACK_TEMPLATE``, ChatML,
which is also what llama-server falls back to; it writes an assistant's ``tool_calls`` after its
content, one JSON object (``{"name": …, "arguments": …}``) a line, so a tool history from another
model loses nothing (such a model is offered no ``tools``: its template never shows them).

What a template needs beyond OpenAI's messages is settled here, from the template's own text and
behaviour: Mistral-style templates get nine-character call ids (``with_short_call_ids``), and a
template that can only walk an object's items (Qwen3.5's XML calls) gets a cut call's whole members
(``arguments_as_objects``), or a 400 naming a call whose arguments are no object at all, rather
than failing on a call's arguments that are text. gpt-oss's harmony template reads an assistant's
thought as ``thinking``, so it gets ``reasoning_content`` under that name too (``with_thinking``),
and shows one call a message, so an assistant message's parallel calls reach it one message a
call, each followed by its result (``one_call_a_message``).
A template that refuses the system role (Gemma 2's) gets a system message's text at the head of the
next user message (``system_in_user``).
"""

from __future__ import annotations

import logging
from typing import Any

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from vramsupply.chat import ChatFormat, detect_format
from vramsupply.chat.syntaxes import syntax_for

from .messages import arguments_as_objects, normalize_messages, one_call_a_message, system_in_user, with_short_call_ids, with_thinking

log = logging.getLogger(__name__)

# ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message (an assistant's calls after its content,
# one JSON object a line), then an open assistant turn.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A model that never saw ChatML has no end-of-turn token for it: stop on the text instead.
FALLBACK_STOP = ("<|im_end|>",)

class ChatTemplate:
    """A compiled chat template plus the special-token texts it may reference."""

    def __init__(self, template: str | None, bos_text: str, eos_text: str) -> None:
        self.bos_text = bos_text
        self._eos_text = eos_text
        self._closed: Jinja2ChatFormatter | None = None
        self.is_fallback = True
        self.source = FALLBACK_TEMPLATE
        self._formatter = _compile(FALLBACK_TEMPLATE, bos_text, eos_text)
        if template:
            try:
                self._formatter = _compile(template, bos_text, eos_text)
                self.is_fallback = False
                self.source = template
            except jinja2.TemplateError as exc:
                log.warning("the model's chat template does not compile (%s); using ChatML instead", exc)
        self._short_ids = syntax_for(self.source).id_style == "mistral"
        self._thinking = syntax_for(self.source).name == "harmony"
        self._system_in_user = False  # while the probes render a system message as it is
        self._text_arguments = True  # and text arguments as they are
        self._system_in_user = self._refuses_system()
        self._text_arguments = self._takes_text_arguments()
        self.format: ChatFormat = detect_format(self.source, self._shows_tools())

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings a chat request needs beyond the model's end-of-generation tokens."""
        return FALLBACK_STOP if self.is_fallback else ()

    def render(self, messages: Any, tools: list[dict[str, Any]] | None = None, **variables: Any) -> str:
        """The prompt for OpenAI-style ``messages``; ``tools`` and ``variables`` (e.g.
        ``enable_thinking``) reach the template the way HuggingFace transformers pass them."""
        return self.render_turn(messages, tools, variables, open_turn=True)

    def render_turn(self, messages: Any, tools: list[dict[str, Any]] | None, variables: dict[str, Any], *, open_turn: bool) -> str:
        """``render``, or without ``open_turn`` the messages alone, no assistant turn opened after
        them (vLLM's ``add_generation_prompt: false``, and the start of ``continue_final_message``)."""
        normalized = self._for_template(normalize_messages(messages))
        formatter = self._formatter if open_turn else self._closed_formatter()
        try:
            return formatter(messages=normalized, tools=tools or None, **variables).prompt
        except ValueError as exc:
            raise ValueError(f"the model's chat template rejected the messages: {exc}") from None
        except Exception as exc:  # the template is the model's code: whatever it raises on these messages
            raise ValueError(f"the model's chat template failed on these messages: {type(exc).__name__}: {exc}") from None

    def _closed_formatter(self) -> Jinja2ChatFormatter:
        """The template compiled once more with ``add_generation_prompt`` false, on first use."""
        if self._closed is None:
            self._closed = _compile(self.source, self.bos_text, self._eos_text, open_turn=False)
        return self._closed

    def _for_template(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._system_in_user:
            messages = system_in_user(messages)
        if self._thinking:
            messages = one_call_a_message(with_thinking(messages))
        if not self._text_arguments:
            messages = arguments_as_objects(messages)
        return with_short_call_ids(messages) if self._short_ids else messages

    def _refuses_system(self) -> bool:
        """Whether the template fails on a system message but renders the same user message alone
        (Gemma 2's). Agents and frameworks send one first nearly always; such a template then gets it
        in the next user message (``system_in_user``); llama-server merges it into the next message too."""
        user = {"role": "user", "content": "hi"}
        try:
            self.render([{"role": "system", "content": "Be brief."}, user])
            return False
        except ValueError:
            pass
        try:
            self.render([user])
            return True
        except ValueError:
            return False

    def _takes_text_arguments(self) -> bool:
        """Whether the template renders a call whose arguments are a string (no JSON object), or
        fails on any call whatever its arguments (then its own error is the one to give)."""

        def renders(arguments: Any) -> bool:
            call = {"id": "vsprobe01", "type": "function", "function": {"name": _PROBE_TOOL, "arguments": arguments}}
            history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
            try:
                self.render([*history, {"role": "tool", "tool_call_id": "vsprobe01", "content": "ok"}])
                return True
            except ValueError:
                return False

        return renders('{"cut": "') or not renders("{}")

    def _shows_tools(self) -> bool:
        """Whether the template shows the model its tools: render it with a probe tool and look."""
        probe = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "", "parameters": {"type": "object"}}}
        try:
            return _PROBE_TOOL in self.render([{"role": "user", "content": "hi"}], tools=[probe])
        except ValueError:
            return False


_PROBE_TOOL = "vramsupply_probe_tool"


def _compile(template: str, bos_text: str, eos_text: str, open_turn: bool = True) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text, add_generation_prompt=open_turn)
