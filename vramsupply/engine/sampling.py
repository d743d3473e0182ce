"""Per-request llama.cpp sampler chains.

Every request gets its own chain, so its RNG stream, repetition history and grammar state never
depend on which other requests share the batch. The order follows llama-cpp-python's ``Llama``:
penalties -> grammar -> logit bias -> top-k -> top-p -> min-p -> temperature -> dist(seed), and a
plain greedy pick after the bias when the temperature is 0. ``llama_sampler_sample`` already calls
accept on the chain, so the scheduler never accepts a sampled token a second time.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import llama_cpp
from llama_cpp._internals import LlamaSampler

from .model import Model
from .types import SamplingParams

# How many recent tokens repeat/presence/frequency penalties look at (llama.cpp's default).
PENALTY_LAST_N = 64


def build_sampler(params: SamplingParams, model: Model, prompt: Sequence[int], ignore_eos: bool) -> LlamaSampler:
    """Build the chain for one request; raises ValueError for a bad grammar or logit_bias."""
    if ignore_eos and params.grammar is not None:
        # A finished grammar only allows end-of-generation, which ignore_eos forbids.
        raise ValueError("ignore_eos cannot be combined with a grammar")
    bias = _logit_bias(params, model, ignore_eos)
    sampler = LlamaSampler()
    try:
        if _has_penalties(params):
            _add_penalties(sampler, params, model, prompt)
        if params.grammar is not None:
            _add_grammar(sampler, params.grammar, model, params.grammar_triggers)
        if bias:
            sampler.add_logit_bias(model.n_vocab, bias)
        if params.greedy:
            sampler.add_greedy()
        else:
            if params.top_k > 0:
                sampler.add_top_k(params.top_k)
            if params.top_p < 1:
                sampler.add_top_p(params.top_p, 1)
            if params.min_p > 0:
                sampler.add_min_p(params.min_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(_seed(params.seed))
    except BaseException:
        sampler.close()
        raise
    return sampler


def _has_penalties(params: SamplingParams) -> bool:
    return params.repeat_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _add_penalties(sampler: LlamaSampler, params: SamplingParams, model: Model, prompt: Sequence[int]) -> None:
    """Penalties also see the end of the prompt, as in ``Llama`` and llama-server."""
    penalties = llama_cpp.llama_sampler_init_penalties(
        model.n_vocab, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
    )
    for token in prompt[-PENALTY_LAST_N:]:
        llama_cpp.llama_sampler_accept(penalties, int(token))
    llama_cpp.llama_sampler_chain_add(sampler.sampler, penalties)


def _add_grammar(sampler: LlamaSampler, grammar: str, model: Model, triggers: Sequence[str] = ()) -> None:
    if triggers:
        patterns = (ctypes.c_char_p * len(triggers))(*(t.encode("utf-8") for t in triggers))
        handle = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            model.vocab, grammar.encode("utf-8"), b"root", patterns, len(triggers), None, 0
        )
    else:
        handle = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not handle:
        raise ValueError("grammar is not valid GBNF (it needs a 'root' rule)")
    llama_cpp.llama_sampler_chain_add(sampler.sampler, handle)


def _logit_bias(params: SamplingParams, model: Model, ignore_eos: bool) -> dict[int, float]:
    bias = {}
    for token, value in params.logit_bias.items():
        if token >= model.n_vocab:
            raise ValueError(f"logit_bias token {token} is not in the vocabulary (size {model.n_vocab})")
        bias[token] = float(value)
    if ignore_eos:
        bias.update(dict.fromkeys(model.eog_tokens, -math.inf))
    return bias


def _seed(seed: int | None) -> int:
    """None means a fresh random seed; any int maps onto llama.cpp's 32-bit seed space."""
    return llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed % (1 << 32)
