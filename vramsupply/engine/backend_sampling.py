"""Backend sampling: the sampler chain runs inside llama.cpp's compute graph, on the device.

Without it every decode step copies each output row's full logits (n_vocab floats, 128 KiB for a
32k vocabulary, 600 KiB for 150k) from the device to the host and samples there. With 32 slots on a
GPU that copy, not the model, limits the step; upstream measured +48 % throughput at 32 slots
(llama.cpp #17004/#27050). With a chain attached to a sequence (``llama_set_sampler``), the graph
ends in the sampling ops and only the chosen token comes back (``llama_get_sampled_token_ith``).

Only chains made of samplers the backend implements qualify: a logit bias (``ignore_eos`` is one,
of -inf against the end-of-generation tokens), then greedy, or top-k / top-p / min-p / temperature
/ dist(seed). Grammars need the host's view of the logits, and so do requests that ask for
logprobs or ``min_tokens``. Penalties have a backend version too, but it multiplies by the reciprocal where the
host divides, which can round differently, so they stay on the host. Those requests keep host
sampling, per request, in the same batch. The chain is the request's own, so its seed and RNG stream are the ones host sampling
would use: on the CPU backend both give the same tokens (tested).

Opt-in (``--backend-sampling``), as in llama-server (``-bs``): on a CPU the logits are already in
host memory, so there is nothing to save, and it is not yet proven on every GPU backend.
"""

from __future__ import annotations

import llama_cpp

from .types import EngineError, GenerationRequest


def supports(request: GenerationRequest) -> bool:
    """True when the request's sampling runs entirely on the backend's samplers."""
    params = request.sampling
    needs_host = (
        params.grammar is not None
        or request.logprobs is not None  # computed from the host's logits
        or request.min_tokens > 0  # its end tokens are held back in the host's logits (rows.py)
        or params.repeat_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )
    return not needs_host


def attach(ctx: llama_cpp.llama_context_p, seq_id: int, chain: llama_cpp.llama_sampler_p) -> bool:
    """Run ``chain`` in the graph for ``seq_id``; False when this build or backend cannot."""
    return bool(llama_cpp.llama_set_sampler(ctx, seq_id, chain))


def detach(ctx: llama_cpp.llama_context_p, seq_id: int) -> None:
    """Back to host sampling for ``seq_id``; must happen before the chain is freed."""
    llama_cpp.llama_set_sampler(ctx, seq_id, None)


def sample(ctx: llama_cpp.llama_context_p, chain: llama_cpp.llama_sampler_p, row: int) -> int:
    """The token the graph sampled for ``row``, accepted into the chain as host sampling would."""
    token = llama_cpp.llama_get_sampled_token_ith(ctx, row)
    if token < 0:
        raise EngineError(f"llama.cpp sampled no token for batch row {row} on the backend")
    llama_cpp.llama_sampler_accept(chain, token)
    return token
