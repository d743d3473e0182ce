"""The inference engine: llama.cpp with continuous batching across parallel slots.

Knows nothing of HTTP. ``Engine.load`` a GGUF, ``submit`` a ``GenerationRequest`` from an asyncio
loop and iterate the returned ``Generation`` for text deltas.
"""

from __future__ import annotations

from vramsupply.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(
    __name__,
    {
        "vramsupply.engine.conversation": ("ChatPrompt", "ChatRequest", "ChatRequestError"),
        "vramsupply.engine.engine": ("Engine",),
        "vramsupply.engine.generation": ("Generation",),
        "vramsupply.engine.types": ("ContextOverflow", "EngineClosed", "EngineError", "EngineFailed", "EngineOptions", "EngineStats", "MAX_TOP_K", "GenerationRequest", "Overloaded", "SamplingParams", "Usage"),
    },
)
