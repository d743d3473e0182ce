"""Prompt chunks are sized from the measured prefill speed only while other slots generate."""

from __future__ import annotations

from vramsupply.engine.pacing import MIN_CHUNK, STEP_TARGET_SECONDS, PrefillPacer


def test_a_prompt_takes_the_whole_batch_when_nobody_generates() -> None:
    pacer = PrefillPacer()
    assert pacer.budget(2048, generating=False) == 2048
    pacer.observe(2000, 1.0)
    assert pacer.budget(2048, generating=False) == 2048


def test_before_any_speed_is_known_a_prompt_next_to_a_stream_starts_small() -> None:
    """A whole 2048-token batch as the first step after start-up would be a seconds-long pause."""
    pacer = PrefillPacer()
    assert pacer.budget(2048, generating=True) == MIN_CHUNK
    assert pacer.budget(10, generating=True) == 10


def test_while_others_generate_a_step_carries_what_the_target_time_allows() -> None:
    pacer = PrefillPacer()
    pacer.observe(2000, 1.0)  # 2000 prompt tokens a second
    assert pacer.budget(2048, generating=True) == int(STEP_TARGET_SECONDS * 2000)
    pacer.observe(100, 10.0)  # a very slow step pulls the estimate towards smaller chunks, never below the floor
    assert pacer.budget(2048, generating=True) == MIN_CHUNK
    pacer.observe(4, 100.0)  # too few prompt tokens to judge: ignored
    assert pacer.budget(2048, generating=True) == MIN_CHUNK
    assert pacer.budget(10, generating=True) == 10
