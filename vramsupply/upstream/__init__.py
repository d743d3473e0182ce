"""Serving through another engine: vLLM or SGLang launched and supervised by the agent, or an
OpenAI-compatible server the provider already runs (Ollama, llama-server, LM Studio).

Whatever the engine, buyers and the platform meet our own front (``front``): the endpoint token,
OpenAI-shaped errors, body-size limits, the model-name check, ``/health``, ``/metrics`` and exact
usage (``usage``). Requests are forwarded (``proxy``, one ``exchange`` each) and streamed back
event by event (``stream``, ``sse``); the upstream's errors are mapped for the buyer (``refusal``),
and what it may make us wait for or hold is bounded (``limits``). ``monitor`` watches a running
upstream; ``supervisor`` launches (``launch``) and restarts one.
"""

from __future__ import annotations

from vramsupply.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "vramsupply.upstream.backend": ("UpstreamBackend", "UpstreamError"),
        "vramsupply.upstream.options": ("UpstreamOptions",),
    },
)
