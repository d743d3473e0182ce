"""Many buyers at once, as a busy provider sees them: each gets the answer it would get alone.

Every other engine test drives one mechanism on purpose. Here seeded random traffic drives them
all together on the real tiny model, in a context small enough to fill: buyers arriving a few
milliseconds apart, prompts sharing a few system prompts (borrowed from running slots and the
host prompt cache), follow-up turns that resend a history with the previous answer's tokens,
``n`` > 1 choices, drafts, buyers who hang up, and requests paused when the KV cache is full.

Greedy answers must match the same request decoded alone in an engine with one slot, token for
token, except where the two sit at a numerical near-tie: llama.cpp's sums run in another order in a
batch of other rows, which moves a log-probability by about 1e-3 (0.015 at most in 300 random rounds of
this traffic, about 6,000 requests, wave 2's 32nd session), and where the two best tokens are that
close the greedy pick may flip. So each answer is compared up to its first differing token, whose
step must be such a tie, with every earlier token's log-probability within ``TIE`` of the other's.
A mistake in which cells a sequence reads (a borrowed prefix one cell too long, a cut in the wrong
place, a restore of another conversation's state) moves them by far more than that.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from conftest import TINY_MODEL
from vramsupply.engine import Engine, EngineOptions, Generation, GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0)
TIE = 0.05
WORDS = "once upon a time there was a little girl named Lily she loved to play in the park with her dog Max one day they found a big red ball".split()


@dataclass
class Buyer:
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool
    choices: list[Generation]
    hangs_up: bool
    answers: asyncio.Future[list[str | BaseException]]

    def request(self) -> GenerationRequest:
        return GenerationRequest(self.prompt, sampling=GREEDY, max_tokens=self.max_tokens, ignore_eos=self.ignore_eos, logprobs=2)


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def next_prompt(rng: random.Random, engine: Engine, systems: list[list[int]], earlier: list[Buyer]) -> list[int]:
    """A new conversation behind one of the system prompts, or the next turn of an earlier one."""
    if earlier and rng.random() < 0.3:
        turn = rng.choice(earlier)
        return turn.prompt + turn.choices[0].token_ids + engine.tokenize(words(rng, 1, 20))[1:]
    return rng.choice(systems) + engine.tokenize(words(rng, 1, 30))[1:]


async def hang_up(buyer: Buyer, after: float) -> None:
    await asyncio.sleep(after)
    for choice in buyer.choices:
        choice.cancel()


async def busy_traffic(engine: Engine, rng: random.Random, n_ctx: int) -> list[Buyer]:
    systems = [engine.tokenize(words(rng, 1, 40)) for _ in range(3)]
    buyers: list[Buyer] = []
    for _ in range(rng.randint(15, 30)):
        await asyncio.sleep(rng.choice([0, 0, 0, 0.001, 0.005, 0.02]))
        prompt = next_prompt(rng, engine, systems, [b for b in buyers if not b.hangs_up and rng.random() < 0.5])
        max_tokens = rng.randint(1, 40)
        if len(prompt) + max_tokens > n_ctx - 8:
            continue
        buyer = Buyer(prompt, max_tokens, rng.random() < 0.5, [], rng.random() < 0.15, asyncio.get_running_loop().create_future())
        first = engine.submit(buyer.request())
        buyer.choices = [first, *(engine.submit(buyer.request(), shares_prompt_with=first) for _ in range(rng.choice([0, 0, 0, 1, 2])))]
        buyer.answers = asyncio.ensure_future(asyncio.gather(*(c.collect() for c in buyer.choices), return_exceptions=True))
        if buyer.hangs_up:
            asyncio.ensure_future(hang_up(buyer, rng.choice([0, 0.002, 0.01, 0.05])))
        buyers.append(buyer)
    await asyncio.wait_for(asyncio.gather(*(b.answers for b in buyers)), 120)
    return buyers


def differs_beyond_a_tie(got: Generation, alone: Generation) -> str | None:
    """Why ``got`` is not ``alone`` up to numerical noise, or None when it is."""
    a, b = got.token_ids, alone.token_ids
    split = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
    if split is None:
        return None if len(a) == len(b) else f"{len(a)} tokens against {len(b)} ({got.finish_reason} / {alone.finish_reason})"
    for i in range(split):
        if abs(got.logprobs[i].logprob - alone.logprobs[i].logprob) > TIE:
            return f"token {i}: log-probability {got.logprobs[i].logprob:.4f} against {alone.logprobs[i].logprob:.4f}"
    mine, theirs = dict(got.logprobs[split].top), dict(alone.logprobs[split].top)
    for top in (mine, theirs):
        if a[split] not in top or b[split] not in top or abs(top[a[split]] - top[b[split]]) > TIE:
            return f"token {split}: {a[split]} against {b[split]}, not a tie ({got.logprobs[split].top} / {alone.logprobs[split].top})"
    return None


@pytest.mark.parametrize("seed", range(8))
async def test_every_buyer_in_busy_mixed_traffic_gets_the_answer_it_would_get_alone(seed: int) -> None:
    rng = random.Random(seed)
    n_ctx, fa = rng.choice([256, 512, 1024]), rng.choice(["on", "off"])
    options = EngineOptions(
        model_path=TINY_MODEL, n_ctx=n_ctx, parallel=rng.choice([2, 4, 8]), flash_attention=fa, draft_max=rng.choice([None, 4]), cache_ram=rng.choice([None, 0, 200_000])
    )
    with Engine.load(options) as engine:
        buyers = await busy_traffic(engine, rng, n_ctx)
        for _ in range(200):  # hang-ups are freed by the scheduler's thread, a moment later
            if ((stats := engine.stats()).slots_busy, stats.queue_depth) == (0, 0):
                break
            await asyncio.sleep(0.05)
        assert (stats.slots_busy, stats.queue_depth) == (0, 0), "every slot is idle once the traffic has ended"

    with Engine.load(EngineOptions(model_path=TINY_MODEL, n_ctx=n_ctx, parallel=1, flash_attention=fa, cache_ram=0)) as lone:
        for buyer in (b for b in buyers if not b.hangs_up):
            alone = lone.submit(buyer.request())
            await alone.collect()
            for choice, answer in zip(buyer.choices, buyer.answers.result()):
                assert not isinstance(answer, BaseException), answer
                assert differs_beyond_a_tie(choice, alone) is None, f"prompt of {len(buyer.prompt)}: {differs_beyond_a_tie(choice, alone)}"
