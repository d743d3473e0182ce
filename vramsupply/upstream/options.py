"""What an upstream-backed engine needs, as one typed value built by the serve lifecycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

UpstreamEngine = Literal["upstream", "vllm", "sglang"]


@dataclass(frozen=True)
class UpstreamOptions:
    engine: UpstreamEngine
    model: str | None
    """The ``model`` setting: its marketplace id is registered (None: the upstream's own name)."""
    upstream_model: str | None
    """The name the upstream serves (``upstream``) or the weights repo it loads (``vllm``/``sglang``)."""
    url: str | None = None
    api_key: str | None = None
    context_length: int | None = None
    """Explicitly configured context; None: discovered from the upstream."""
    slots: int = 4
    slots_explicit: bool = False
    tensor_parallel: int | None = None
    pipeline_parallel: int | None = None
    nnodes: int | None = None
    node_rank: int | None = None
    dist_init_addr: str | None = None
    command: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    start_timeout: float = 1800.0
    stop_timeout: float = 30.0
    check_interval: float = 5.0
    """Seconds between looks at the upstream's /health, models and load."""
    stall_after: float = 30.0
    """Seconds /health may fail in a row before a launched engine is restarted, or (an ``upstream``)
    go unanswered before the requests in flight to it end."""
