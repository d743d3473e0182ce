"""Rendering chat messages into a prompt with the model's own Jinja2 chat template.

The template comes from the GGUF's ``tokenizer.chat_template`` and is rendered in a sandbox by
llama-cpp-python's ``Jinja2ChatFormatter``, the same way HuggingFace transformers render it. A
model without a template (or with one Jinja2 cannot compile) gets ``FALLBACK_TEMPLATE``, ChatML,
which is also what llama-server falls back to.
"""

from __future__ import annotations

import logging
from typing import Any

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from vramsupply.chat import ChatFormat, detect_format

from .messages import normalize_messages

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

class ChatTemplate:
    """A compiled chat template plus the special-token texts it may reference."""

    def __init__(self, template: str | None, bos_text: str, eos_text: str) -> None:
        self.bos_text = bos_text
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
        self.format: ChatFormat = detect_format(self.source, self._shows_tools())

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings a chat request needs beyond the model's end-of-generation tokens."""
        return FALLBACK_STOP if self.is_fallback else ()

    def render(self, messages: Any, tools: list[dict[str, Any]] | None = None, **variables: Any) -> str:
        """The prompt for OpenAI-style ``messages``; ``tools`` and ``variables`` (e.g.
        ``enable_thinking``) reach the template the way HuggingFace transformers pass them."""
        normalized = normalize_messages(messages)
        try:
            return self._formatter(messages=normalized, tools=tools or None, **variables).prompt
        except ValueError as exc:
            raise ValueError(f"the model's chat template rejected the messages: {exc}") from None
        except (jinja2.TemplateError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(f"the model's chat template failed on these messages: {exc}") from None


    def _shows_tools(self) -> bool:
        """Whether the template shows the model its tools: render it with a probe tool and look."""
        probe = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "", "parameters": {"type": "object"}}}
        try:
            return _PROBE_TOOL in self.render([{"role": "user", "content": "hi"}], tools=[probe])
        except ValueError:
            return False


_PROBE_TOOL = "vramsupply_probe_tool"


def _compile(template: str, bos_text: str, eos_text: str) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text, add_generation_prompt=True)
