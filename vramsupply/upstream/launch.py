"""The command lines that start vLLM and SGLang, built from typed options.

Both are started on loopback, on a free port, with a random API key, so nothing but this agent can
reach them (vLLM's ``--api-key`` covers only its ``/v1`` paths, which is another reason to keep
it behind our front). Both register the model under our canonical id (``--served-model-name``), so
the upstream's name and ours agree. What the provider passes in ``extra_args`` is appended as is,
except the arguments the agent sets itself (``agent_set_arg``): appended after ours, they would
win, and the agent would wait on a port, key or name the engine no longer uses.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
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


_OWN = {
    "--host": "the agent starts {engine} on 127.0.0.1, for itself alone; buyers reach the agent at --host (VRAM_SUPPLY_HOST)",
    "--port": "the agent starts {engine} on a free port of its own and waits for it there; buyers reach the agent at --port (VRAM_SUPPLY_PORT)",
    "--api-key": "the agent gives {engine} a random key of its own; what buyers present is the endpoint token (VRAM_SUPPLY_ENDPOINT_TOKEN)",
    "--served-model-name": "the agent names the model after --model, the name buyers ask for",
}
_WEIGHTS = "pass the weights with --model or --upstream-model"
_SETTINGS = {
    "tensor_parallel": "use --tensor-parallel-size (VRAM_SUPPLY_TENSOR_PARALLEL_SIZE)",
    "context": "use --context-length (VRAM_SUPPLY_CONTEXT_LENGTH), which the agent also offers buyers",
    "slots": "use --parallel (VRAM_SUPPLY_PARALLEL), which the agent also admits requests by",
}
AGENT_ARGS: dict[str, dict[str, str]] = {
    "vllm": {
        **_OWN,
        "--model": _WEIGHTS,
        "--tensor-parallel-size": _SETTINGS["tensor_parallel"],
        "-tp": _SETTINGS["tensor_parallel"],
        "--pipeline-parallel-size": "use --pipeline-parallel-size (VRAM_SUPPLY_PIPELINE_PARALLEL_SIZE)",
        "-pp": "use --pipeline-parallel-size (VRAM_SUPPLY_PIPELINE_PARALLEL_SIZE)",
        "--max-model-len": _SETTINGS["context"],
        "--max-num-seqs": _SETTINGS["slots"],
    },
    "sglang": {
        **_OWN,
        "--model-path": _WEIGHTS,
        "--model": _WEIGHTS,
        "--tp": _SETTINGS["tensor_parallel"],
        "--tp-size": _SETTINGS["tensor_parallel"],
        "--tensor-parallel-size": _SETTINGS["tensor_parallel"],
        "--context-length": _SETTINGS["context"],
        "--max-running-requests": _SETTINGS["slots"],
        "--nnodes": "use --nnodes (VRAM_SUPPLY_NNODES)",
        "--node-rank": "use --node-rank (VRAM_SUPPLY_NODE_RANK)",
        "--dist-init-addr": "use --dist-init-addr (VRAM_SUPPLY_DIST_INIT_ADDR)",
    },
}
"""Per launched engine: each argument the agent passes (or has a setting for), and what to use instead."""
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}


def split_engine_args(engine: str, text: str | None) -> tuple[str, ...]:
    """``--engine-args`` as the words appended to the engine's command line; LaunchError (naming
    the setting) for text that does not split, or a word the agent sets itself."""
    try:
        words = tuple(shlex.split(text or ""))
    except ValueError as exc:
        raise LaunchError(f"invalid engine_args {text!r}: {exc}") from None
    reserved = agent_set_arg(engine, words)
    if reserved is not None:
        raise LaunchError(f"engine_args may not set {reserved}")
    return words


def agent_set_arg(engine: str, extra_args: Sequence[str]) -> str | None:
    """The first of ``extra_args`` that the agent sets itself, as "FLAG: what to use instead", or None.
    ``--flag=value`` and vLLM's ``--flag_name`` spelling count as the flag."""
    own = AGENT_ARGS.get(engine, {})
    for word in extra_args:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            flag = flag.replace("_", "-")
        advice = own.get(flag)
        if advice is not None:
            return f"{flag}: {advice.format(engine=ENGINE_NAMES.get(engine, engine))}"
    return None


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
