"""The command lines that start vLLM and SGLang, built from typed options.

Both are started on loopback, on a free port, with a random API key, so nothing but this agent can
reach them (vLLM's ``--api-key`` covers only its ``/v1`` paths, which is another reason to keep
it behind our front). Both register the model under our canonical id (``--served-model-name``), so
the upstream's name and ours agree. What the provider passes in ``extra_args`` is appended as is.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Literal

LaunchedEngine = Literal["vllm", "sglang"]

DEFAULT_COMMANDS: dict[str, str] = {
    "vllm": "vllm serve",
    "sglang": "python3 -m sglang.launch_server",
}
"""The program and its leading words; ``--engine-command`` replaces them (another venv, a wrapper)."""


@dataclass(frozen=True)
class LaunchOptions:
    engine: LaunchedEngine
    model: str
    """The weights repo (safetensors, AWQ, FP8) or a local directory: never a GGUF."""
    served_name: str
    port: int
    api_key: str
    tensor_parallel: int | None = None
    pipeline_parallel: int | None = None
    max_model_len: int | None = None
    max_running: int | None = None
    nnodes: int | None = None
    node_rank: int | None = None
    dist_init_addr: str | None = None
    command: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)


class LaunchError(ValueError):
    """The options cannot be turned into a command line; the message says which."""


def command_line(options: LaunchOptions) -> list[str]:
    prefix = shlex.split(options.command or DEFAULT_COMMANDS[options.engine])
    if not prefix:
        raise LaunchError("the engine command is empty")
    build = _vllm_args if options.engine == "vllm" else _sglang_args
    return [*prefix, *build(options), *options.extra_args]


def _vllm_args(o: LaunchOptions) -> list[str]:
    if o.nnodes is not None or o.node_rank is not None or o.dist_init_addr is not None:
        raise LaunchError("--nnodes/--node-rank/--dist-init-addr are SGLang's; vLLM spans nodes through a Ray cluster (see the README)")
    args = [o.model, "--host", "127.0.0.1", "--port", str(o.port), "--api-key", o.api_key, "--served-model-name", o.served_name]
    args += _opt("--tensor-parallel-size", o.tensor_parallel)
    args += _opt("--pipeline-parallel-size", o.pipeline_parallel)
    args += _opt("--max-model-len", o.max_model_len)
    args += _opt("--max-num-seqs", o.max_running)
    return args


def _sglang_args(o: LaunchOptions) -> list[str]:
    if o.pipeline_parallel is not None:
        raise LaunchError("--pipeline-parallel-size is vLLM's; SGLang spans nodes with --nnodes/--node-rank/--dist-init-addr")
    if o.node_rank:
        raise LaunchError(f"the agent runs on SGLang's rank-0 node, not rank {o.node_rank}: start the other ranks with `python -m sglang.launch_server ... --node-rank N` directly")
    args = ["--model-path", o.model, "--host", "127.0.0.1", "--port", str(o.port), "--api-key", o.api_key]
    args += ["--served-model-name", o.served_name, "--enable-metrics"]
    args += _opt("--tp", o.tensor_parallel)
    args += _opt("--context-length", o.max_model_len)
    args += _opt("--max-running-requests", o.max_running)
    args += _opt("--nnodes", o.nnodes)
    args += _opt("--node-rank", o.node_rank)
    args += _opt("--dist-init-addr", o.dist_init_addr)
    return args


def _opt(flag: str, value: int | str | None) -> list[str]:
    return [] if value is None else [flag, str(value)]


def redacted(argv: list[str]) -> str:
    """The command line for the log, with the API key masked."""
    shown = list(argv)
    for i, word in enumerate(shown[:-1]):
        if word == "--api-key":
            shown[i + 1] = "****"
    return shlex.join(shown)
