"""vLLM's ``guided_regex`` holds the whole answer, and a whole answer may hold ``<``.

The regex went through the converter of a JSON schema's string ``pattern`` in the form meant for
Qwen3.5's XML ``<parameter>`` values, which never writes ``<`` (it could start ``</parameter>``):
``guided_regex: "<[a-z]+>"`` or ``"a<b"`` was a 400, and ``[^a]`` could never answer ``<``. A
whole answer has nothing after it to spoil, so now every character stands as itself (but NUL,
which llama.cpp's grammar never matches); XML parameter values are still written without ``<``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from openai import BadRequestError, OpenAI

from live_server import MODEL_ID, LiveServer
from vramsupply.chat.pattern import PatternError, pattern_to_gbnf

SEEDS = (1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def client() -> Iterator[OpenAI]:
    with LiveServer() as live, OpenAI(base_url=live.base_url, api_key="unused", max_retries=0) as openai:
        yield openai


def sampled(client: OpenAI, seed: int, chat: bool = False, **extra: Any) -> str:
    options = {"model": MODEL_ID, "temperature": 1.0, "seed": seed, "max_tokens": 60, "extra_body": extra}
    if chat:
        answer = client.chat.completions.create(messages=[{"role": "user", "content": "Tag it"}], **options)
        return answer.choices[0].message.content or ""
    return client.completions.create(prompt="Once upon a time", **options).choices[0].text


def test_a_regex_that_needs_angle_brackets_is_answered_with_them(client: OpenAI) -> None:
    for regex in (r"<[A-Z][a-z]{1,5}>", r"a<b", r"<b>[a-z ]{1,12}</b>", r"(<|>)<[0-9]"):
        for seed in SEEDS:
            text = sampled(client, seed, guided_regex=regex)
            assert re.fullmatch(regex, text), (regex, seed, text)
            assert "<" in text


def test_a_control_tokens_text_never_stands_in_for_the_characters_a_regex_needs(client: OpenAI) -> None:
    """llama.cpp's grammar reads a control token by its text: ``<s>`` fits ``<[a-z]{1,6}>``, and
    the tiny model picked it at seed 1; but an answer shows a control token as nothing, so the
    buyer got "" for a regex that needs three characters at least."""
    regex = r"<[a-z]{1,6}>"
    for seed in range(1, 13):
        text = sampled(client, seed, guided_regex=regex)
        assert re.fullmatch(regex, text), (seed, text)


def test_structured_outputs_regex_in_a_chat_answers_with_angle_brackets(client: OpenAI) -> None:
    regex = r"^<tag>[A-Za-z ]{1,12}</tag>$"
    for seed in SEEDS:
        text = sampled(client, seed, chat=True, structured_outputs={"regex": regex})
        assert re.fullmatch(regex, text), (seed, text)


def test_any_character_but_one_may_be_an_angle_bracket(client: OpenAI) -> None:
    """``[^a]`` and ``.`` leave out only what they say (and NUL): ``<`` is one of their characters.
    (Two characters: no control token's text fits.)"""
    for regex in (r"[^a]{2}", r".{2}"):
        for seed in SEEDS:
            assert re.fullmatch(regex, sampled(client, seed, guided_regex=regex)), (regex, seed)
    assert "\\x3C" not in pattern_to_gbnf("[^a]", "text") and "<" not in pattern_to_gbnf(".", "text")


def test_a_regex_no_answer_can_match_is_a_400_in_the_answers_words(client: OpenAI) -> None:
    for regex, words in (("a\x00b", "which the answer cannot hold raw"), (r"(a)\1", "not supported in a regex")):
        with pytest.raises(BadRequestError) as caught:
            sampled(client, 1, guided_regex=regex)
        body: dict[str, Any] = caught.value.body  # type: ignore[assignment]
        assert body["param"] == "guided_regex" and words in body["message"], body
        assert "XML" not in body["message"] and "pattern" not in body["message"]


def test_a_regex_whose_own_text_says_pattern_is_quoted_as_sent(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as caught:
        sampled(client, 1, guided_regex="pattern(")
    assert "pattern(" in caught.value.body["message"]  # type: ignore[index]


def test_xml_parameter_values_still_never_hold_an_angle_bracket() -> None:
    for pattern in (r"[^a]", r".", r"\W", r"[\x00-\x7f]", r"[;-=]+"):
        classes = re.findall(r"\[(?:[^\]\\]|\\.)*\]", pattern_to_gbnf(pattern, "xml"))
        assert classes and not any(_admits(cls, "<") for cls in classes), pattern
        assert any(_admits(cls, "<") for cls in re.findall(r"\[(?:[^\]\\]|\\.)*\]", pattern_to_gbnf(pattern, "text"))), pattern
    for pattern in (r"a<b", r"[<]"):
        with pytest.raises(PatternError, match="XML parameter value"):
            pattern_to_gbnf(pattern, "xml")


def _admits(gbnf_class: str, char: str) -> bool:
    """Whether a GBNF ``[...]`` the converter wrote matches ``char``."""
    negated = gbnf_class.startswith("[^")
    body = gbnf_class[2 if negated else 1 : -1]
    codes = [int(m.group(1) or m.group(2) or m.group(3), 16) if m.group(4) is None else ord(m.group(4))
             for m in re.finditer(r"\\x([0-9A-F]{2})|\\u([0-9A-F]{4})|\\U([0-9A-F]{8})|(-|[^\\])", body)]
    inside, i = False, 0
    while i < len(codes):
        if i + 2 < len(codes) and codes[i + 1] == ord("-"):
            inside |= codes[i] <= ord(char) <= codes[i + 2]
            i += 3
        else:
            inside |= codes[i] == ord(char)
            i += 1
    return inside != negated
