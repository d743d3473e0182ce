"""How much context to serve for a model trained on less than the configured ``context_length``.

Past the training context a model's output degrades silently, so no request may be longer than
it. The KV cache is another matter. With one cache shared by the slots (the default), the
configured size is how many tokens all running requests hold together, as llama-server's ``-c``
with ``-np``: cutting it to the training context too would leave 64 slots of a 4k-trained model
4096 cells between them, and the H200 bench saw exactly that
(``bench/results/gpu-2026-12-04-second-run.json``: c = 64 fell below c = 16, with requests
waiting seconds for room). So the shared cache keeps its
size, up to what ``parallel`` requests of the longest allowed length could fill; a cache per slot
(``kv_per_slot``) is one request's, and is cut like the request.

The engine sizes its context with this, and the GPU memory plan plans the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServedContext:
    request_tokens: int  # the longest request (prompt + completion)
    cache_tokens: int  # the KV cache's size: shared by the slots, or each slot's with kv_per_slot

    def capped(self, context_length: int) -> bool:
        return self.request_tokens < context_length


def served_context(context_length: int, parallel: int, kv_per_slot: bool, n_ctx_train: int) -> ServedContext:
    """The request window and KV cache size for ``context_length`` on a model trained on
    ``n_ctx_train`` tokens (0: unknown, no cap)."""
    if n_ctx_train <= 0 or context_length <= n_ctx_train:
        return ServedContext(context_length, context_length)
    if kv_per_slot:
        return ServedContext(n_ctx_train, n_ctx_train)
    return ServedContext(n_ctx_train, min(context_length, parallel * n_ctx_train))
