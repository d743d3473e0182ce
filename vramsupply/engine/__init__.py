"""The inference engine: llama.cpp with continuous batching across parallel slots.

Knows nothing of HTTP. ``Engine.load`` a GGUF, ``submit`` a ``GenerationRequest`` from an asyncio
loop and iterate the returned ``Generation`` for text deltas.
"""

from .conversation import ChatPrompt, ChatRequest, ChatRequestError
from .engine import Engine
from .generation import Generation
from .types import (
    ContextOverflow,
    EngineClosed,
    EngineError,
    EngineFailed,
    EngineOptions,
    EngineStats,
    MAX_TOP_K,
    GenerationRequest,
    Overloaded,
    SamplingParams,
    Usage,
)

__all__ = [
    "ChatPrompt",
    "ChatRequest",
    "ChatRequestError",
    "ContextOverflow",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineFailed",
    "EngineOptions",
    "EngineStats",
    "Generation",
    "GenerationRequest",
    "MAX_TOP_K",
    "Overloaded",
    "SamplingParams",
    "Usage",
]
