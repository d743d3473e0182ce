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
    EngineOptions,
    EngineStats,
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
    "EngineOptions",
    "EngineStats",
    "Generation",
    "GenerationRequest",
    "Overloaded",
    "SamplingParams",
    "Usage",
]
