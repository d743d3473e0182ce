"""The engine's pure parts: streamed text, stop strings, chat rendering, request validation, slot choice."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from vramsupply.engine import ContextOverflow, EngineOptions, GenerationRequest, SamplingParams
from vramsupply.engine.chat import FALLBACK_STOP, ChatTemplate, normalize_messages
from vramsupply.engine.slots import Slot, choose_slot
from vramsupply.engine.text import StopMatcher, TextStream, Thought, stop_strings_for


def stream_all(stream: TextStream, pieces: list[bytes]) -> tuple[list[str], bool]:
    deltas = []
    for piece in pieces:
        delta = stream.push(piece)
        deltas.append(delta.text)
        if delta.stopped:
            return deltas, True
    deltas.append(stream.finish())
    return deltas, False


def test_multibyte_character_split_over_byte_tokens_is_never_emitted_broken() -> None:
    emoji = "😀".encode()
    pieces = [b" I", b" smile", b" ", *(emoji[i : i + 1] for i in range(4)), b"!"]
    deltas, stopped = stream_all(TextStream(stops=()), pieces)
    assert not stopped
    assert "".join(deltas) == " I smile 😀!"
    assert all("\ufffd" not in d for d in deltas)
    # The three leading bytes of the emoji produce no text at all; the fourth produces all of it.
    assert deltas[3:7] == ["", "", "", "😀"]


def test_dangling_bytes_at_the_end_become_one_replacement_character() -> None:
    deltas, _ = stream_all(TextStream(stops=()), [b"ok", "日".encode()[:2]])
    assert "".join(deltas) == "ok\ufffd"


def test_stop_string_spanning_two_pieces_is_cut_and_never_emitted() -> None:
    deltas, stopped = stream_all(TextStream(stops=["END"]), [b"The tale ", b"ends. E", b"ND of it"])
    assert stopped
    assert "".join(deltas) == "The tale ends. "
    assert deltas == ["The tale ", "ends. ", ""]


def test_partial_stop_match_that_diverges_is_released() -> None:
    matcher = StopMatcher(["<|im_end|>"])
    assert matcher.push("hello <|im") == ("hello ", False)
    assert matcher.push("portant") == ("<|important", False)
    assert matcher.flush() == ""


def test_held_back_partial_match_is_flushed_when_generation_ends() -> None:
    deltas, stopped = stream_all(TextStream(stops=["STOP"]), [b"almost ST"])
    assert not stopped
    assert deltas == ["almost ", "ST"]


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.push("hello world") == ("hel", True)


def test_a_stop_string_inside_a_started_tool_call_is_no_stop() -> None:
    """A lazy call grammar holds the output from its trigger on: a stop string there would cut the
    call's JSON while the answer still reported a whole call (finish_reason tool_calls)."""
    stops = stop_strings_for(['"'], "root ::= call", [r"[\s\S]*?(<tool_call>)[\s\S]*"])
    pieces = [b"Sure. ", b"<tool_call>", b'{"name": "f", ', b'"arguments": {}}', b"</tool_call>"]
    deltas, stopped = stream_all(TextStream(stops), pieces)
    assert not stopped and "".join(deltas) == 'Sure. <tool_call>{"name": "f", "arguments": {}}</tool_call>'


def test_a_stop_string_before_the_call_starts_still_stops() -> None:
    stops = stop_strings_for(["Sure"], "root ::= call", [r"[\s\S]*?(<tool_call>)[\s\S]*"])
    assert stream_all(TextStream(stops), [b"Well. Su", b"re. <tool_call>"]) == (["Well. ", ""], True)


def test_no_stop_string_applies_where_a_grammar_holds_the_whole_answer() -> None:
    """A forced call or a JSON response_format: the grammar holds the answer from its first token."""
    held = stop_strings_for(['"', ":"], "root ::= object", ())
    deltas, stopped = stream_all(TextStream(held), [b'{"a', b'": 1}'])
    assert not stopped and "".join(deltas) == '{"a": 1}'
    assert stream_all(TextStream(stop_strings_for([":"], None, ())), [b'{"a": 1}']) == (['{"a"'], True)


def test_stop_strings_apply_in_a_thought_a_grammar_lets_come_first_and_not_after_it() -> None:
    """A JSON answer or a forced call after a thought the prompt left open: the thought is text no
    grammar holds, so a stop string there stops, as it does without the grammar."""
    in_thought = stop_strings_for([" "], "root ::= thought answer", (), thought=Thought("</think>"))
    assert stream_all(TextStream(in_thought), [b"Hmm, let", b" me see</think>{}"]) == (["Hmm,"], True)
    after = stop_strings_for(['"', " "], "root ::= thought answer", (), thought=Thought("</think>"))
    deltas, stopped = stream_all(TextStream(after), [b"Hmm</think>", b'\n{"a": ', b"1}"])
    assert not stopped and "".join(deltas) == 'Hmm</think>\n{"a": 1}'


HARMONY_THOUGHT = Thought("<|end|>", opening="<|channel|>analysis<|message|>")
"""gpt-oss's optional thought before a held answer: its analysis message (``server/grammar.free_thought``)."""


def harmony_held(stops: list[str], pieces: list[bytes]) -> tuple[str, bool]:
    """The text a harmony answer held by a grammar (a JSON final message, a forced call) keeps."""
    deltas, stopped = stream_all(TextStream(stop_strings_for(stops, "root ::= prelude answer", (), thought=HARMONY_THOUGHT)), pieces)
    return "".join(deltas), stopped


def test_stop_strings_apply_in_harmony_s_analysis_message_before_a_held_answer_and_not_in_the_answer() -> None:
    """The analysis message is text no grammar holds: a stop string there stops, as with no grammar.
    Once its ``<|end|>`` is written, or where the answer comes without a thought, none applies."""
    thought = [b"<|channel|>analysis<|message|>Hmm, let", b" me see<|end|>", b"<|start|>assistant"]
    assert harmony_held([" "], thought) == ("<|channel|>analysis<|message|>Hmm,", True)
    assert harmony_held(["<|end|>"], thought) == ("<|channel|>analysis<|message|>Hmm, let me see", True)
    answer = [b"<|channel|>final<|message|>", b'{"a": 1, "b": "fine"}']
    stops = ['"', " ", ":", "fin"]
    assert harmony_held(stops, [b"<|channel|>analysis<|message|>Hmm<|end|>", b"<|start|>assistant", *answer]) == (
        '<|channel|>analysis<|message|>Hmm<|end|><|start|>assistant<|channel|>final<|message|>{"a": 1, "b": "fine"}', False
    )
    assert harmony_held(stops, answer) == ('<|channel|>final<|message|>{"a": 1, "b": "fine"}', False)
    call = [b"<|channel|>commentary to=functions.f <|constrain|>json<|message|>", b'{"a": 1}']
    assert harmony_held(["com", " "], call) == ('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}', False)
    # a stop string inside the thought's own header stops, as it does there with no grammar
    assert harmony_held(["lysis"], thought) == ("<|channel|>ana", True)


def test_stop_string_inside_one_piece_cuts_that_piece() -> None:
    deltas, stopped = stream_all(TextStream(stops=["\n\n"]), [b"line one\n\nline two"])
    assert stopped
    assert deltas == ["line one"]


LLAMA2_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)


def test_model_chat_template_renders_with_its_special_tokens() -> None:
    chat = ChatTemplate(LLAMA2_STYLE_TEMPLATE, bos_text="<s>", eos_text="</s>")
    assert not chat.is_fallback
    assert chat.stop == ()
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "Tell"}, {"type": "text", "text": "a story"}]},
    ]
    assert chat.render(messages) == "<s>[INST] Hi [/INST]Hello</s>[INST] Tell\na story [/INST]"


def test_template_raise_exception_becomes_value_error() -> None:
    chat = ChatTemplate(LLAMA2_STYLE_TEMPLATE, bos_text="<s>", eos_text="</s>")
    with pytest.raises(ValueError, match="tools are not supported"):
        chat.render([{"role": "tool", "content": "42"}])


def test_any_error_the_template_raises_on_the_messages_is_theirs_to_fix() -> None:
    """A template's own arithmetic or attribute errors were a 500 with a traceback in the log."""
    for body in ("{{ 1 // 0 }}", "{{ messages[0].content.nope() }}", "{{ 'x' * (10 ** 20) }}"):
        chat = ChatTemplate("{% for message in messages %}" + body + "{% endfor %}", bos_text="<s>", eos_text="</s>")
        with pytest.raises(ValueError, match="the model's chat template failed on these messages"):
            chat.render([{"role": "user", "content": "Hi"}])


def test_missing_or_broken_template_falls_back_to_chatml() -> None:
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for template in (None, "{% for m in messages %}{{ m.content }"):
        chat = ChatTemplate(template, bos_text="<s>", eos_text="</s>")
        assert chat.is_fallback
        assert chat.stop == FALLBACK_STOP
        assert chat.render(messages) == expected


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\].role must be one of"),
        ([{"role": ["user"], "content": "x"}], r"messages\[0\].role must be one of"),
        ([{"role": {"a": 1}, "content": "x"}], r"messages\[0\].role must be one of"),
        ([{"role": "user"}], r"messages\[0\].content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"content\[0\] content parts of type 'image_url'"),
        ([{"role": "user", "content": [{"text": "no type"}]}], r"content\[0\] must be a text part"),
        ([{"role": "user", "content": "x", "audio": {"id": "a"}}], r"messages\[0\].audio is not supported"),
        ([{"role": "user", "content": "x", "tool_calls": []}], r"messages\[0\].tool_calls is not supported in a user message"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}], r"tool_calls\[0\]\.function\.arguments must be a string"),
        ([{"role": "tool", "content": "42", "tool_call_id": 7}], r"messages\[0\].tool_call_id must be a string"),
        ([{"role": "assistant", "content": "x", "audio": {"id": "a"}}], r"messages\[0\].audio is not supported in an assistant message"),
        ([{"role": "assistant", "content": "x", "annotations": "cited"}], r"messages\[0\].annotations must be a list"),
    ],
)
def test_bad_chat_messages_get_a_clear_error(messages: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        normalize_messages(messages)


def test_an_assistant_message_as_openai_returns_it_is_taken_its_annotations_dropped() -> None:
    """OpenAI's messages carry ``annotations`` (``[]`` mostly), and agents append them to the history as they came."""
    returned = {"role": "assistant", "content": "hi", "refusal": None, "annotations": [], "audio": None, "function_call": None}
    assert normalize_messages([returned]) == [{"role": "assistant", "content": "hi"}]
    cited = {**returned, "annotations": [{"type": "url_citation", "url_citation": {"url": "https://x"}}]}
    assert normalize_messages([cited]) == [{"role": "assistant", "content": "hi"}]


def test_assistant_tool_call_message_without_content_is_accepted_with_arguments_decoded() -> None:
    """Templates write arguments with ``tojson``, so the wire format's JSON string becomes an object."""
    calls = [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    [message] = normalize_messages([{"role": "assistant", "content": None, "tool_calls": calls}])
    assert message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
    }


def test_names_and_tool_results_reach_the_template() -> None:
    messages = [
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "tool", "content": "22 C", "tool_call_id": "call_1", "name": "get_weather"},
    ]
    assert normalize_messages(messages) == messages


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: SamplingParams(temperature=-1), "temperature"),
        (lambda: SamplingParams(top_p=-0.1), "top_p"),
        (lambda: SamplingParams(min_p=1.5), "min_p"),
        (lambda: SamplingParams(top_k=-1), "top_k"),
        (lambda: SamplingParams(repeat_penalty=0), "repeat_penalty"),
        (lambda: SamplingParams(logit_bias={-3: 1.0}), "logit_bias"),
        (lambda: SamplingParams(grammar="  "), "grammar"),
        (lambda: GenerationRequest(prompt=[]), "at least one token"),
        (lambda: GenerationRequest(prompt=[1], max_tokens=-1), "max_tokens"),  # (0 scores a prompt: test_prompt_logprobs.py)
        (lambda: GenerationRequest(prompt=[1], prompt_logprobs=1), "prompt_logprobs"),
        (lambda: GenerationRequest(prompt=[1], stop="END"), "not a single string"),
        (lambda: GenerationRequest(prompt=[1], stop=[""]), "non-empty"),
        (lambda: EngineOptions(model_path=Path("m.gguf"), parallel=0), "parallel"),
        (lambda: EngineOptions(model_path=Path("m.gguf"), parallel=8, n_batch=4), "n_batch"),
        (lambda: EngineOptions(model_path=Path("m.gguf"), flash_attention="maybe"), "flash_attention"),
        (lambda: EngineOptions(model_path=Path("m.gguf"), max_queue=-1), "max_queue"),
    ],
)
def test_invalid_options_and_requests_are_rejected_with_the_field_named(build, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()


def test_context_overflow_message_gives_the_numbers() -> None:
    assert str(ContextOverflow(200, 100, 256)) == (
        "the prompt (200 tokens) plus max_tokens (100) is 300 tokens, more than the context of 256"
    )
    error = ContextOverflow(300, None, 256)
    assert (error.prompt_tokens, error.max_tokens, error.n_ctx) == (300, None, 256)
    assert "300 tokens" in str(error) and "256" in str(error)


def slots_holding(*held: list[int]) -> list[Slot]:
    slots = []
    for seq_id, tokens in enumerate(held):
        slot = Slot(seq_id, 64)
        slot.record(np.array(tokens, dtype=np.int32))
        slots.append(slot)
    return slots


def test_with_a_kv_cache_per_slot_idle_slots_are_taken_lowest_first_when_no_prefix_covers_the_prompt() -> None:
    slots = slots_holding([1, 5, 6], [1, 7, 8, 9], [], [1, 7, 2])
    idle = [slots[1], slots[2], slots[3]]

    # Only the BOS token is shared: not worth a scattered slot, so the lowest idle id wins.
    slot, prefix = choose_slot(idle, np.array([1, 4, 4, 4, 4], dtype=np.int32), packed=True)
    assert (slot.seq_id, prefix) == (1, 1)
    slot, prefix = choose_slot([slots[2], slots[3]], np.array([2, 3], dtype=np.int32), packed=True)
    assert (slot.seq_id, prefix) == (2, 0)
    # A third of the prompt cached in slot 3 is not worth the gap either.
    slot, prefix = choose_slot(idle, np.array([1, 7, 2, 4, 4, 4, 4], dtype=np.int32), packed=True)
    assert (slot.seq_id, prefix) == (1, 2)


def test_with_the_shared_kv_cache_the_longest_cached_prefix_wins() -> None:
    slots = slots_holding([1, 5, 6], [1, 7, 8, 9], [], [1, 7, 2])
    idle = [slots[1], slots[2], slots[3]]

    slot, prefix = choose_slot(idle, np.array([1, 7, 2, 4, 4, 4, 4], dtype=np.int32))
    assert (slot.seq_id, prefix) == (3, 3)
    slot, prefix = choose_slot([slots[2], slots[3]], np.array([2, 3], dtype=np.int32))
    assert (slot.seq_id, prefix) == (2, 0)


def test_where_idle_slots_keep_their_kv_a_short_shared_prefix_does_not_overwrite_a_conversation() -> None:
    slots = slots_holding([1, 5, 6, 8, 9], [1, 7, 8, 9, 6], [], [1, 7, 2, 3, 5])
    slots[0].started, slots[1].started, slots[3].started = 3, 1, 2
    prompt = np.array([1, 7, 4, 4], dtype=np.int32)

    # Slots 1 and 3 share two tokens but would lose three: the empty slot instead (before: slot 1).
    assert choose_slot(slots, prompt) == (slots[1], 2)
    assert choose_slot(slots, prompt, kept=True) == (slots[2], 0)
    # No empty slot, equal losses: the least recently used one, not the lowest id.
    assert choose_slot([slots[0], slots[1], slots[3]], np.array([2, 3], dtype=np.int32), kept=True) == (slots[1], 0)
    # Else the one that loses least: a long history costs most to prefill again.
    slots[0].n_cached = 3  # the most recently used, but the shortest
    assert choose_slot([slots[0], slots[1], slots[3]], np.array([2, 3], dtype=np.int32), kept=True) == (slots[0], 0)
    slots[0].n_cached = 5
    # A prefix at least as long as what the slot would lose is a conversation's next turn: reused.
    assert choose_slot(slots, np.array([1, 7, 2, 9], dtype=np.int32), kept=True) == (slots[3], 3)
    assert choose_slot(slots, np.array([1, 7, 8, 5], dtype=np.int32), kept=True) == (slots[1], 3)


@pytest.mark.parametrize("packed", [True, False])
def test_a_slot_whose_cache_covers_most_of_the_prompt_is_reused(packed: bool) -> None:
    slots = slots_holding([1, 5, 6], [1, 7, 8, 9], [1, 7, 2, 3])

    slot, prefix = choose_slot(slots, np.array([1, 7, 2, 3, 4], dtype=np.int32), packed)
    assert (slot.seq_id, prefix) == (2, 4)
    # Equal prefixes covering most of the prompt: the lower sequence id.
    slot, prefix = choose_slot(slots, np.array([1, 7, 5], dtype=np.int32), packed)
    assert (slot.seq_id, prefix) == (1, 2)


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the output must end: at the first character that completes any stop string, the
    earliest start among the stop strings completed there."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return min(starts)
    return None


@pytest.mark.parametrize("seed", range(300))
def test_stop_matching_agrees_with_a_brute_force_search_however_the_text_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    matcher = StopMatcher(stops)
    out, stopped = "", False
    for piece in pieces:
        emitted, stopped = matcher.push(piece)
        out += emitted
        if stopped:
            break
    end = first_stop(text, stops)
    if end is None:
        assert not stopped and out + matcher.flush() == text
    else:
        assert stopped and out == text[:end]


def test_a_long_stop_string_that_keeps_almost_matching_is_held_back_and_released() -> None:
    """A text that is always a partial match of a long stop string: held, never searched again."""
    stop = "a" * 5000 + "b"
    matcher = StopMatcher([stop])
    emitted = "".join(matcher.push("a" * 10)[0] for _ in range(600))
    assert emitted == "a" * 1000, "only what can no longer start the stop string is emitted"
    text, stopped = matcher.push("c")
    assert not stopped and emitted + text + matcher.flush() == "a" * 6000 + "c"


def test_a_thought_sent_back_as_reasoning_is_the_reasoning_content() -> None:
    """Newer vLLM and OpenRouter return the thought as ``reasoning``; clients echo it under that name
    (gpt-oss needs its thought back on tool turns), and it was a 400."""
    assert normalize_messages([{"role": "assistant", "content": "hi", "reasoning": "think"}]) == [
        {"role": "assistant", "content": "hi", "reasoning_content": "think"}
    ]
    both = {"role": "assistant", "content": "hi", "reasoning": "other", "reasoning_content": "think"}
    assert normalize_messages([both])[0]["reasoning_content"] == "think"
    openrouter = {"role": "assistant", "content": "hi", "reasoning": "think", "reasoning_details": [{"type": "reasoning.text", "text": "think"}]}
    assert normalize_messages([openrouter]) == [{"role": "assistant", "content": "hi", "reasoning_content": "think"}]
    with pytest.raises(ValueError, match=r"messages\[0\].reasoning must be a string"):
        normalize_messages([{"role": "assistant", "content": "hi", "reasoning": {"effort": "low"}}])
