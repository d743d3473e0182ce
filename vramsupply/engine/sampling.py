"""Per-request llama.cpp samplers.

Every request gets its own chain, so its RNG stream, repetition history and grammar state never
depend on which other requests share the batch. The chain follows llama-cpp-python's ``Llama``:
penalties -> logit bias -> top-k -> top-p -> min-p -> temperature -> dist(seed), and a plain
greedy pick after the bias when the temperature is 0.

A grammar is kept out of the chain and applied by rejection, as llama.cpp's own common sampler
does: the chain picks a token, the grammar checks that one token, and only when it refuses is the
grammar applied to the whole vocabulary before the chain picks again. Applying a grammar to every
candidate costs one walk of its parse stacks per vocabulary entry (32k and more), for every token
of the request, on the scheduler thread that all slots share; a big schema then stalls every
other stream. Checking one token is the common case and costs one walk. Either way the token
obeys the grammar, and sampling stays deterministic for a given seed.

A greedy request without penalties or grammar (temperature 0, the common case for agents and
benchmarks) is picked with one ``argmax`` over the row's logits, plus its logit bias when it has
one. llama.cpp's chain would first copy the whole vocabulary into a candidate array for the same
answer: the first highest logit, after the same float32 bias. That copy was the larger part of the
sampling time per token at one stream.

With several streams, the argmax of every logits row of a step is one numpy call (``StepWinners``)
instead of one pointer, view and argmax per row (about 50 µs a row on the scheduler thread, which
all streams wait for). A bias that only lowers tokens (``ignore_eos``, banned tokens) cannot change
a winner it leaves alone, so only a request whose raw winner is biased takes the per-row path.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaSampler, LlamaTokenDataArray

from .batch import Batch
from .model import Model
from .types import EngineError, SamplingParams

# How many recent tokens repeat/presence/frequency penalties look at (llama.cpp's default).
PENALTY_LAST_N = 64


class RequestSampler:
    """One request's chain (``sampler``: what backend sampling attaches) and optional grammar."""

    def __init__(
        self, chain: LlamaSampler, grammar: llama_cpp.llama_sampler_p | None, n_vocab: int, argmax: ArgmaxPick | None = None
    ) -> None:
        self.chain = chain
        self.argmax = argmax
        """The pick of a plain greedy request (``ArgmaxPick``), which ``rows.py`` takes directly."""
        self.sampler = chain.sampler
        self._attached = False
        self._clone: llama_cpp.llama_sampler_p | None = None
        self._grammar = grammar
        self._candidates = LlamaTokenDataArray(n_vocab=n_vocab) if grammar is not None else None
        self._logits = np.zeros(n_vocab if grammar is not None else 0, dtype=np.single)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self.resampled = 0
        """Tokens the grammar refused, so that it was applied to the whole vocabulary."""

    @property
    def has_grammar(self) -> bool:
        return self._grammar is not None

    def sample(self, ctx: llama_cpp.llama_context_p, row: int, winners: StepWinners | None = None) -> int:
        """Sample ``row``'s logits and accept the token (into the chain and the grammar)."""
        if self.argmax is not None:
            return self.argmax.pick(ctx, row, winners)
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.sampler, ctx, row))
        self.load(ctx, row)
        return self.sample_loaded()

    def load(self, ctx: llama_cpp.llama_context_p, row: int) -> None:
        """Copy ``row``'s logits, so that ``sample_loaded`` may run after the next decode step
        (on another thread: see ``offthread.py``)."""
        logits = llama_cpp.llama_get_logits_ith(ctx, row)
        np.copyto(self._logits, np.ctypeslib.as_array(logits, shape=self._logits.shape))

    def sample_loaded(self) -> int:
        """Sample the loaded logits through the grammar by rejection, and accept the token."""
        assert self._grammar is not None
        token = self._pick(through_grammar=False)
        if not self._grammar_allows(token):
            self.resampled += 1
            token = self._pick(through_grammar=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self.sampler, token)
        return token

    def _pick(self, *, through_grammar: bool) -> int:
        candidates = self._candidates
        assert candidates is not None
        candidates.copy_logits(self._logits)
        array = ctypes.byref(candidates.candidates)
        candidates.candidates.selected = -1
        if through_grammar:
            llama_cpp.llama_sampler_apply(self._grammar, array)
        llama_cpp.llama_sampler_apply(self.sampler, array)
        selected = candidates.candidates.selected
        if not 0 <= selected < candidates.candidates.size:
            raise EngineError("the sampler chain selected no token")
        return int(candidates.candidates_data.id[selected])

    def _grammar_allows(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected, self._one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return bool(math.isfinite(self._one[0].logit))

    def for_backend(self) -> llama_cpp.llama_sampler_p:
        """The chain to attach to llama.cpp's graph (``backend_sampling``), after any detach.

        llama.cpp prepares a chain for the graph once (a second ``llama_sampler_chain_backend_init``
        aborts the process), and a chain it prepared skips its graph samplers on the host. So a
        request attached again (paused and resumed, ``preempt.py``) gets a clone of its chain,
        which carries the chain's state (the RNG of a seeded request) on.
        """
        if self._attached:
            clone = llama_cpp.llama_sampler_clone(self.sampler)
            if self._clone is not None:
                llama_cpp.llama_sampler_free(self._clone)
            self._clone = self.sampler = clone
        self._attached = True
        return self.sampler

    def close(self) -> None:
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        if self._clone is not None:
            llama_cpp.llama_sampler_free(self._clone)
            self._clone = None
        self.chain.close()


class ArgmaxPick:
    """Greedy sampling of a chain that is only ``logit_bias -> greedy``: the first highest logit."""

    def __init__(self, n_vocab: int, bias: dict[int, float]) -> None:
        self._row = ctypes.POINTER(ctypes.c_float * n_vocab)  # a logits row, viewed without a copy
        self._bias = None
        self._only_lowers = all(value <= 0 for value in bias.values())
        if bias:
            self._bias = np.zeros(n_vocab, dtype=np.single)
            self._bias[list(bias)] = list(bias.values())
            self._biased = np.empty(n_vocab, dtype=np.single)

    def pick(self, ctx: llama_cpp.llama_context_p, row: int, winners: StepWinners | None = None) -> int:
        if winners is not None:
            token = winners.of(ctx, row)
            if self._keeps(token):
                return token
        pointer = llama_cpp.llama_get_logits_ith(ctx, row)
        if not pointer:
            raise EngineError(f"llama.cpp has no logits for batch row {row}")
        logits = np.frombuffer(ctypes.cast(pointer, self._row).contents, dtype=np.single)
        if self._bias is None:
            return int(np.argmax(logits))
        np.add(logits, self._bias, out=self._biased)
        return int(np.argmax(self._biased))

    def _keeps(self, token: int) -> bool:
        """Whether the raw argmax ``token`` is also the first highest logit after the bias.

        True without a bias, and for a bias that only lowers tokens when ``token`` has none: every
        other logit stays where it was or falls, so none reaches it, and none before it ties it.
        """
        return self._bias is None or (self._only_lowers and self._bias[token] == 0)


class StepWinners:
    """The first highest logit of every logits row of one decode step, from one ``np.argmax``.

    llama.cpp keeps a step's logits contiguously, one row per batch row that asked for logits, in
    batch order (``llama_get_logits`` in llama.h), so a batch row's logits are the output row that
    counts the logits rows before it; in a step of generating streams only, every row is its own.
    ``clear`` after every decode; the argmax is taken on the first ``of`` after it, so a step
    without greedy requests costs nothing. The numpy view of the logits is kept while llama.cpp's
    buffer stays where it was with as many rows: right after a decode, the first calls into
    numpy's and ctypes' machinery run from cold caches and cost ten times what they do warm.
    """

    def __init__(self, n_vocab: int, batch: Batch) -> None:
        self._n_vocab = n_vocab
        self._batch = batch
        self._winners: np.ndarray | None = None
        self._outputs: np.ndarray | None = None
        self._view = np.zeros((0, n_vocab), dtype=np.single)
        self._view_at = (0, 0)

    def clear(self) -> None:
        self._winners = None

    def of(self, ctx: llama_cpp.llama_context_p, row: int) -> int:
        if not 0 <= row < self._batch.size or not self._batch.logits[row]:
            raise EngineError(f"batch row {row} has no logits")
        if self._winners is None:
            self._winners = self._take(ctx)
        return int(self._winners[row if self._outputs is None else self._outputs[row]])

    def _take(self, ctx: llama_cpp.llama_context_p) -> np.ndarray:
        batch = self._batch
        every_row = batch.outputs == batch.size
        self._outputs = None if every_row else np.cumsum(batch.logits[: batch.size], dtype=np.int32) - 1
        pointer = llama_cpp.llama_get_logits(ctx)
        if not pointer:
            raise EngineError("llama.cpp has no logits for this step")
        return np.argmax(self._rows(pointer, batch.outputs), axis=1)

    def _rows(self, pointer: ctypes._Pointer, count: int) -> np.ndarray:
        """The step's ``count`` logits rows, viewed without a copy."""
        at = (ctypes.cast(pointer, ctypes.c_void_p).value or 0, count)
        if at != self._view_at:
            self._view, self._view_at = np.ctypeslib.as_array(pointer, shape=(count, self._n_vocab)), at
        return self._view


def build_sampler(
    params: SamplingParams, model: Model, prompt: Sequence[int], ignore_eos: bool, min_tokens: int = 0, shown: frozenset[int] = frozenset()
) -> RequestSampler:
    """Build the sampler for one request; raises ValueError for a bad grammar or logit_bias.

    ``shown``: special tokens the answer shows as their text (``GenerationRequest.preserve``).

    ``min_tokens``: its rows' end tokens are held back for a while (``rows.py``), which the
    step's shared argmax cannot see, so such a request gets no ``ArgmaxPick``."""
    if ignore_eos and params.grammar is not None:
        # A finished grammar only allows end-of-generation, which ignore_eos forbids.
        raise ValueError("ignore_eos cannot be combined with a grammar")
    if min_tokens and params.grammar is not None:
        raise ValueError("min_tokens cannot be combined with a grammar (response_format, tools, guided_* or grammar): a finished grammar only allows the end")
    bias = _logit_bias(params, model, ignore_eos)
    if params.grammar is not None:
        bias.update(_unshown(model, shown))
    grammar = None if params.grammar is None else _grammar(params.grammar, model, params.grammar_triggers)
    try:
        plain = params.greedy and grammar is None and not _has_penalties(params) and not min_tokens
        argmax = ArgmaxPick(model.n_vocab, bias) if plain else None
        return RequestSampler(_chain(params, model, prompt, bias), grammar, model.n_vocab, argmax)
    except BaseException:
        if grammar is not None:
            llama_cpp.llama_sampler_free(grammar)
        raise


def _chain(params: SamplingParams, model: Model, prompt: Sequence[int], bias: dict[int, float]) -> LlamaSampler:
    sampler = LlamaSampler()
    try:
        if _has_penalties(params):
            _add_penalties(sampler, params, model, prompt)
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


def _grammar(grammar: str, model: Model, triggers: Sequence[str] = ()) -> llama_cpp.llama_sampler_p:
    if triggers:
        patterns = (ctypes.c_char_p * len(triggers))(*(t.encode("utf-8") for t in triggers))
        handle = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            model.vocab, grammar.encode("utf-8"), b"root", patterns, len(triggers), None, 0
        )
    else:
        handle = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
    if not handle:
        raise ValueError("grammar is not valid GBNF (it needs a 'root' rule)")
    return handle


def _logit_bias(params: SamplingParams, model: Model, ignore_eos: bool) -> dict[int, float]:
    bias = {}
    for token, value in params.logit_bias.items():
        if token >= model.n_vocab:
            raise ValueError(f"logit_bias token {token} is not in the vocabulary (size {model.n_vocab})")
        bias[token] = float(value)
    if ignore_eos:
        bias.update(dict.fromkeys(model.eog_tokens, -math.inf))
    return bias


def _unshown(model: Model, shown: frozenset[int]) -> dict[int, float]:
    """Tokens an answer shows as nothing (control tokens, ``<unk>``), never sampled under a grammar.

    llama.cpp's grammar matches a token by its text with control tokens shown, so ``<s>`` could
    satisfy ``<[a-z]+>``; but the answer showed it as nothing, and the buyer got "" for a regex
    that needs three characters at least. The markers the answer shows as text (``shown``: a
    thought's ``</think>``, a call's ``<|python_tag|>``) are what the grammar reads, so they stay."""
    return {token: -math.inf for token in model.hidden_tokens - shown}


def _seed(seed: int | None) -> int:
    """llama.cpp's 32-bit seed for a request's seed (OpenAI's are 64-bit, any int here).

    None, and -1 (llama-server's way to ask for a random seed), mean a fresh random seed. 0 to 2**32 - 2
    are llama.cpp's seeds as they are. Any other int (2**32 - 1 would mean random to llama.cpp)
    is hashed whole into 32 bits, so seeds that differ only above bit 32, such as 2**32 and 0,
    get unrelated streams instead of one; the hash never gives the random-seed value."""
    import hashlib

    random = llama_cpp.LLAMA_DEFAULT_SEED
    if seed is None or seed == -1:
        return random
    if 0 <= seed < random:
        return seed
    whole = seed.to_bytes(seed.bit_length() // 8 + 1, "little", signed=True)
    folded = int.from_bytes(hashlib.blake2b(whole, digest_size=4, person=b"vramsupply-seed").digest(), "little")
    return folded if folded != random else random - 1
