"""The marketplace bench's trace: seeded multi-turn conversations arriving as a Poisson process.

Paid traffic is not bench/run.py's one shape: conversations resend a growing history behind a
shared ~300-token system prompt, prompts run from 50 to 2,000 tokens and answers from 20 to 400.
A trace is drawn from one seed, so every server at a rate replays the very same conversations, and
its filler text is sized with the model's own tokenizer, so planned lengths are in the tokens the
server sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM_TOKENS = 300
MAX_PROMPT_TOKENS = 2000
WORDS = (
    "market order price buyer seller token model answer question provider latency budget contract summary report "
    "data table chart value change reason result draft review update plan risk cost share team client request "
    "service region network memory storage compute energy batch cache queue stream window context history turn"
).split()


@dataclass(frozen=True)
class Turn:
    user_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Conversation:
    index: int
    starts_at: float
    system: bool
    opening: str
    turns: tuple[Turn, ...]
    think_s: tuple[float, ...]


class Words:
    """Filler text of a wanted token length, measured with the model's own tokenizer."""

    def __init__(self, model: Path) -> None:
        from llama_cpp import Llama

        self._llama = Llama(model_path=str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False))

    def text(self, rng: random.Random, tokens: int) -> str:
        words = [rng.choice(WORDS) for _ in range(tokens)]
        text = " ".join(words)
        while self.count(text) > tokens and words:
            words.pop()
            text = " ".join(words)
        return text


def build_trace(words: Words, rng: random.Random, conversations: int, rate: float) -> tuple[str, list[Conversation]]:
    """Conversation starts are a Poisson process at ``rate`` per second; each has 1-4 turns.

    Four in five chats share the system prompt; the rest are one-off questions without it. A
    conversation ends before its prompt would pass MAX_PROMPT_TOKENS.
    """
    system = "System: You are a helpful assistant on the vram.supply marketplace. " + words.text(rng, SYSTEM_TOKENS - 16)
    trace, clock = [], 0.0
    for index in range(conversations):
        clock += rng.expovariate(rate)
        has_system = rng.random() < 0.8
        history = SYSTEM_TOKENS if has_system else 0
        turns = []
        for number in range(rng.randint(1, 4) if has_system else 1):
            user = rng.randint(50, 600) if number == 0 else rng.randint(20, 300)
            output = min(400, max(20, int(rng.lognormvariate(4.3, 0.8))))
            if history + user > MAX_PROMPT_TOKENS:
                break
            turns.append(Turn(user, output))
            history += user + output
        think = tuple(rng.expovariate(1 / 3.0) for _ in turns)
        trace.append(Conversation(index, clock, has_system, words.text(rng, turns[0].user_tokens), tuple(turns), think))
    return system, trace
