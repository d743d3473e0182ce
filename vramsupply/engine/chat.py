"""Rendering chat messages into a prompt with the model's own Jinja2 chat template.

The template comes from the GGUF's ``tokenizer.chat_template`` and is rendered in a sandbox by
llama-cpp-python's ``Jinja2ChatFormatter``, the same way HuggingFace transformers render it. A
model without a template (or with one Jinja2 cannot compile) gets ``FALLBACK_TEMPLATE``, ChatML,
which is also what llama-server falls back to.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

log = logging.getLogger(__name__)

# ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message, then an open assistant turn.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A model that never saw ChatML has no end-of-turn token for it: stop on the text instead.
FALLBACK_STOP = ("<|im_end|>",)

ROLES = frozenset({"system", "user", "assistant", "tool"})
# OpenAI's newer name for the system role; templates only know "system".
ROLE_ALIASES = {"developer": "system"}


class ChatTemplate:
    """A compiled chat template plus the special-token texts it may reference."""

    def __init__(self, template: str | None, bos_text: str, eos_text: str) -> None:
        self.bos_text = bos_text
        self.is_fallback = True
        self._formatter = _compile(FALLBACK_TEMPLATE, bos_text, eos_text)
        if template:
            try:
                self._formatter = _compile(template, bos_text, eos_text)
                self.is_fallback = False
            except jinja2.TemplateError as exc:
                log.warning("the model's chat template does not compile (%s); using ChatML instead", exc)

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings a chat request needs beyond the model's end-of-generation tokens."""
        return FALLBACK_STOP if self.is_fallback else ()

    def render(self, messages: Any) -> str:
        normalized = normalize_messages(messages)
        try:
            return self._formatter(messages=normalized).prompt
        except ValueError as exc:
            raise ValueError(f"the model's chat template rejected the messages: {exc}") from None
        except (jinja2.TemplateError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"the model's chat template failed on these messages: {exc}") from None


def _compile(template: str, bos_text: str, eos_text: str) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text, add_generation_prompt=True)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style messages and flatten text-part lists, so templates see plain strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ValueError(f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(sorted(ROLES | set(ROLE_ALIASES)))}, got {role!r}")
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        content = ""
    return {**message, "role": role, "content": _content_text(where, content)}


def _content_text(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of text parts")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{i}] must be a text part {{'type': 'text', 'text': '...'}}")
        texts.append(part["text"])
    return "\n".join(texts)
