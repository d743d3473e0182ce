"""The Settings schema: every option, its default, its limits, and what one value alone must be.

Field descriptions double as the README's configuration table (``test_service_readme.py`` holds
them together), so the fields' order here is the table's. What pydantic-settings needs stays on the
class: the ``VRAM_SUPPLY_`` prefix, the per-field validators, the one derived default (fewer slots
with ``kv_per_slot``, kept a default so the GPU plan may still lower it) and the source order.
Resolving the sources and naming where a value came from is ``loading.py``'s work.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from vramsupply.userpath import expand_user
from vramsupply.config.paths import config_path
from vramsupply.config.urls import HTTP_URL, URL_CHARACTERS, endpoint_url_problem, platform_url_problem, url_characters_ok
from vramsupply.hub.quant import quant_problem

ENV_PREFIX = "VRAM_SUPPLY_"


# `{org}` stands for the model's own organisation (e.g. Qwen for Qwen/Qwen3-8B).
DEFAULT_GGUF_PUBLISHERS = ("{org}", "ggml-org", "unsloth", "bartowski", "lmstudio-community")
DEFAULT_DOWNLOAD_TIMEOUT = 60.0
# Slots share one KV cache and admission waits for room in it, so a slot costs a few MB of logits
# and one more stream in each step, not a context of memory: 16 lets 16 buyers stream at once (on
# the bench model, 1.6-1.8x llama-server's 4 slots at c=16, the first token in 0.11-0.14 s instead
# of 7-8 s; see the README's streaming sweep).
# With kv_per_slot every slot holds a whole context, so there the default stays 4, and so it does
# for a model with a recurrent state (Mamba, RWKV, hybrids such as Qwen3.5: gpu/planning.py), where
# every slot holds a whole state (50 MiB on a Qwen3.5-9B shape, sized by the memory plan).
DEFAULT_PARALLEL = 16
DEFAULT_PARALLEL_KV_PER_SLOT = 4
DEFAULT_PARALLEL_RECURRENT = 4
MAX_DRAIN_SECONDS = 3600.0
"""An hour: no request runs longer, and the service manager waits this long (plus 30 s) to stop."""
MAX_HEARTBEAT_SECONDS = 120.0
"""The platform checks health every 60 s and forgets an agent silent for a few minutes."""
MAX_THREADS = 512
"""llama.cpp's own limit (``GGML_MAX_N_THREADS``). Above it thread creation failed or the process
crashed (``--threads 100000`` on 2 CPUs: a segfault, or libgomp's "Thread creation failed")."""
DEFAULT_DECODE_NICE = 10
"""Nice levels the decode runs below the agent unless told (``engine/priority.py`` reads it)."""
MAX_NICE = 19
"""The kernel's lowest priority: an offset past it would change nothing."""
MAX_STALL_SECONDS = 86400.0
"""A day: the slowest legitimate decode step takes minutes (``engine/liveness.py``), and a watchdog
that waits longer than a day watches nothing. Every float setting has a finite upper limit, which
refuses ``inf`` and ``nan`` too: the code that uses them needs a finite number (``EngineOptions``
refuses an infinite stall timeout, a socket timeout past about 10⁹ s overflows the platform's
time_t), so a value without a limit passed ``config show`` and ``service install`` and failed
later, with a traceback, in a service that could never start."""
MAX_ENGINE_START_SECONDS = 86400.0
"""A day: enough for a launched engine to download hundreds of GB of weights on a slow link."""
MAX_DOWNLOAD_TIMEOUT = 3600.0
"""An hour without a byte from the Hub is a dead connection, not a slow one."""
MAX_API_KEY_CHARS = 512
MAX_PRICE = 1_000_000
"""The highest price, in cents per million tokens: $10,000, far above what any model sells for.
The platform documents no range; a price past this is a slip (a few digits too many), and at
10¹⁴ ¢/M one short request's amount would no longer fit the ledger's 64-bit integers."""


class FlashAttention(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class EngineKind(str, Enum):
    """What produces the tokens: our llama.cpp engine, or our front before another server."""

    llama_cpp = "llama.cpp"
    vllm = "vllm"
    sglang = "sglang"
    upstream = "upstream"


class Settings(BaseSettings):
    """The agent's configuration. Field descriptions double as the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        validate_default=True,
        case_sensitive=False,
    )

    # Model and engine
    model: str | None = Field(None, description="Model to serve: `org/model` (resolved on HuggingFace) or a local .gguf path")
    quant: str = Field("Q4_K_M", description="Quantization to download when `model` is a HuggingFace id; unset, `serve`, `models pull` and `models resolve` take the best that fits (`vramsupply plan`), and this default only when no plan can be made")
    context_length: int = Field(8192, ge=16, description="Context window per request (tokens); the slots share one KV cache of this size unless `kv_per_slot`")
    parallel: int = Field(DEFAULT_PARALLEL, ge=1, le=256, description="Number of slots: requests decoded concurrently, 1 to 256 (4 by default with `kv_per_slot`)")
    kv_per_slot: bool = Field(False, description="Give every slot its own KV cache of `context_length` tokens (parallel times the memory) instead of one shared cache, so no request is ever paused for KV space")
    n_gpu_layers: int = Field(-1, ge=-1, description="Layers offloaded to the GPU (-1: all, when the build has a GPU backend)")
    n_batch: int = Field(2048, ge=1, description="Maximum tokens per decode step (prompt chunks plus generated tokens)")
    n_ubatch: int = Field(512, ge=1, description="Physical micro-batch size inside one decode step")
    flash_attention: FlashAttention = Field(FlashAttention.auto, description="Flash attention: auto (llama.cpp's choice, on where a backend supports it; off for a model on the CPU alone of an Intel CPU with AMX), on or off")
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="CPU threads for decoding and prompt processing, pinned (default: the physical cores, within a cgroup CPU quota, for both, and fewer while other programs keep them busy; at most 512)")
    decode_nice: int = Field(DEFAULT_DECODE_NICE, ge=0, le=MAX_NICE, description=f"Nice levels the decode's threads run below the agent's, so the HTTP side gets a core sooner on a busy CPU; 0 to {MAX_NICE} (0: the agent's own priority, for a machine whose other busy programs run at normal priority, beside which a niced decode got about a tenth of a core)")
    max_queue: int = Field(64, ge=0, description="Requests allowed to wait for a slot before new ones get 429")
    stall_timeout: float = Field(600.0, allow_inf_nan=False, gt=0, le=MAX_STALL_SECONDS, description="Seconds one decode step may run while requests wait before the engine counts as failed (/health 503, serve exits 1); at most 86400 (a day)")
    cache_ram: int | None = Field(None, ge=0, description="Most MiB of host RAM keeping idle conversations' KV for reuse; within it the cache keeps what its restores reach (default: a quarter of free RAM, within a cgroup memory limit, at most 8192; 0: off)")
    draft_max: int | None = Field(None, ge=0, description="Tokens prompt-lookup speculative decoding may draft per step for a request decoding alone (default 0: off; it cost a lone request tok/s on a CPU and on a GPU in our benchmarks)")
    backend_sampling: bool = Field(False, description="Sample on the device inside llama.cpp's graph so logits never cross to the host (for GPUs; requests with penalties, grammars or logprobs sample on the host)")
    stream_interval_ms: float = Field(30.0, allow_inf_nan=False, ge=0, le=1000, description="Milliseconds between hand-overs of mid-answer tokens to the HTTP side (several tokens then go in one SSE chunk; a first token and an answer's end go at once; 0: every decode step; at most 1000)")
    cache_type_k: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV cache type for keys: f16, q8_0 or q4_0 (about 1/2 or 1/4 of the f16 memory)")
    cache_type_v: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="KV cache type for values: f16, q8_0 or q4_0 (a quantized V cache needs flash attention)")
    split_mode: Literal["layer", "row", "none"] = Field("layer", description="How to split the model across GPUs: layer, row or none (all on main_gpu)")
    main_gpu: int = Field(0, ge=0, description="The GPU that holds the whole model with split_mode none")
    tensor_split: Annotated[list[float] | None, NoDecode] = Field(None, description="Share of the model per GPU, comma-separated (e.g. 3,1); default: by free memory")
    devices: Annotated[list[str] | None, NoDecode] = Field(None, description="GPUs to use, comma-separated ggml device names (e.g. CUDA0,CUDA1); default: all")

    # Other engines (see upstream/): vLLM or SGLang launched by the agent, or a running server
    engine: EngineKind = Field(EngineKind.llama_cpp, description="Engine: llama.cpp (in-process), vllm or sglang (launched and supervised), or upstream (a running OpenAI-compatible server)")
    upstream_url: str | None = Field(None, description="Base URL of the running server for `engine=upstream` (e.g. http://127.0.0.1:11434/v1)")
    upstream_api_key: SecretStr | None = Field(None, description="API key the upstream server requires, if any")
    upstream_model: str | None = Field(None, description="The model's name at the upstream (default: the one it lists), or the weights repo vLLM/SGLang load (default: `model`)")
    engine_command: str | None = Field(None, description="Command that starts the launched engine (default `vllm serve` or `python3 -m sglang.launch_server`)")
    engine_args: str | None = Field(None, description="Extra arguments appended to the launched engine's command line")
    tensor_parallel_size: int | None = Field(None, ge=1, description="GPUs one model is split across (vLLM `--tensor-parallel-size`, SGLang `--tp`)")
    pipeline_parallel_size: int | None = Field(None, ge=1, description="Pipeline stages, across GPUs or Ray nodes (vLLM `--pipeline-parallel-size`)")
    nnodes: int | None = Field(None, ge=1, description="Nodes an SGLang deployment spans (`--nnodes`)")
    node_rank: int | None = Field(None, ge=0, description="This node's rank in a multi-node SGLang deployment (`--node-rank`)")
    dist_init_addr: str | None = Field(None, description="Address of SGLang's rank-0 node, host:port (`--dist-init-addr`)")
    engine_start_timeout: float = Field(1800.0, allow_inf_nan=False, gt=0, le=MAX_ENGINE_START_SECONDS, description="Seconds a launched engine may take to become ready (it may download the weights); at most 86400 (a day)")

    # HTTP server
    host: str = Field("127.0.0.1", description="Address the OpenAI-compatible server listens on")
    port: int = Field(8080, ge=0, le=65535, description="Port the OpenAI-compatible server listens on")
    endpoint_token: SecretStr | None = Field(None, description="Bearer token required on /v1/* (generated when registering if unset)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest accepted request body in bytes (413 above)")
    drain_timeout: float = Field(30.0, allow_inf_nan=False, ge=0, le=MAX_DRAIN_SECONDS, description="Seconds in-flight requests may take to finish on shutdown; at most 3600 (an hour)")

    # Marketplace
    api_key: SecretStr | None = Field(None, description="vram.supply API key (`vramsupply login` stores it)")
    platform_url: str = Field("https://vram.supply", description="vram.supply platform API base URL, without /v1 (the agent adds /v1/...)")
    endpoint_url: str | None = Field(None, description="Public URL buyers reach this agent at (required to register, unless `tunnel` makes one)")
    tunnel: Literal["cloudflared"] | None = Field(None, description="Tunnel tool to start for a public URL without port forwarding: cloudflared")
    input_price: int = Field(100, ge=0, le=MAX_PRICE, description="Input price, cents per million tokens, at most 1000000 ($10,000 per million)")
    output_price: int = Field(200, ge=0, le=MAX_PRICE, description="Output price, cents per million tokens, at most 1000000 ($10,000 per million)")
    context_length_offered: int | None = Field(None, ge=1, description="Context length advertised to the market (default: the context actually served, at most context_length)")
    no_register: bool = Field(False, description="Serve locally only: do not register with the platform")
    heartbeat_interval: float = Field(30.0, allow_inf_nan=False, ge=0.1, le=MAX_HEARTBEAT_SECONDS, description="Seconds between heartbeats, 0.1 to 120")

    # Hub and logging
    cache_dir: Path | None = Field(None, description="HuggingFace cache dir for models (default: the shared HF cache)")
    gguf_publishers: Annotated[list[str], NoDecode] = Field(
        list(DEFAULT_GGUF_PUBLISHERS),
        description="GGUF publishers preferred when resolving `org/model`, in order, comma-separated (`{org}`: the model's own org); others rank by downloads",
    )
    download_timeout: float = Field(DEFAULT_DOWNLOAD_TIMEOUT, allow_inf_nan=False, gt=0, le=MAX_DOWNLOAD_TIMEOUT, description="Seconds a Hub request or model download may go without receiving data before it fails; at most 3600 (an hour)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")

    @field_validator("platform_url", "endpoint_url", "upstream_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not url_characters_ok(value):
            raise PydanticCustomError("url_characters", URL_CHARACTERS)
        HTTP_URL.validate_python(value)
        return value.rstrip("/")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_base_url(cls, value: str | None) -> str | None:
        """Checked whenever given, not only when registering: ``--no-register`` with a wrong URL
        would otherwise pass until the day the provider drops the flag."""
        problem = None if value is None else endpoint_url_problem(value)
        if problem is not None:
            raise PydanticCustomError("endpoint_url", problem)
        return value

    @field_validator("platform_url")
    @classmethod
    def _platform_base_url(cls, value: str) -> str:
        """The agent adds ``/v1/providers/...`` to it: a URL ending in /v1 called /v1/v1/... and got 404s forever."""
        problem = platform_url_problem(value)
        if problem is not None:
            raise PydanticCustomError("platform_url", problem)
        return value

    @field_validator("gguf_publishers", mode="before")
    @classmethod
    def _split_publishers(cls, value: Any) -> Any:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @field_validator("tensor_split", "devices", mode="before")
    @classmethod
    def _split_list(cls, value: Any, info: ValidationInfo) -> Any:
        """Comma-separated; an empty value is unset, but an empty item (``CUDA0,,CUDA1``, ``,,``) is
        refused: dropped, it would leave a device or a share other than the ones meant."""
        if not isinstance(value, str):
            return value
        if not value.strip():
            return None
        items = [item.strip() for item in value.split(",")]
        if not all(items):
            raise PydanticCustomError("empty_item", "an item between commas is empty: " + LIST_EXAMPLES[str(info.field_name)])
        return items

    @field_validator("devices")
    @classmethod
    def _named_devices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not all(name.strip() for name in value):
            raise PydanticCustomError("empty_item", "a device name is empty: " + LIST_EXAMPLES["devices"])
        return [name.strip() for name in value] if value else None

    @field_validator("tensor_split")
    @classmethod
    def _usable_shares(cls, value: list[float] | None) -> list[float] | None:
        """llama.cpp divides by the shares' sum: none may be negative, NaN or infinite, nor all zero."""
        if value and not tensor_split_ok(value):
            raise PydanticCustomError("tensor_split", TENSOR_SPLIT_RULE)
        if value and not tensor_split_fits_float32(value):
            raise PydanticCustomError("tensor_split", TENSOR_SPLIT_FLOAT32)
        return value or None

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``VRAM_SUPPLY_CACHE_DIR=`` is no path: ``Path("")`` would be the current directory
        (and the service's writable path, ``/``)."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cache_dir")
    @classmethod
    def _home_expanded(cls, value: Path | None) -> Path | None:
        """``cache_dir = "~/models"`` in the config file (or a quoted ``~`` in the env file) is the
        home's folder, as a shell would make it: not a folder named ``~`` in the current directory."""
        path = expand_user(value) if value is not None else None
        if path is not None and path.exists() and not path.is_dir():
            raise ValueError(f"{path} is not a directory: name the folder models are kept in (it is made if missing)")
        return path

    @field_validator("host")
    @classmethod
    def _named_host(cls, value: str) -> str:
        if not value.strip():  # the empty host listens on every interface
            raise ValueError("name an address: 127.0.0.1 for this machine only, 0.0.0.0 for every interface")
        return value.strip()

    @field_validator("api_key", "endpoint_token", "upstream_api_key", mode="before")
    @classmethod
    def _printable_key(cls, value: Any, info: ValidationInfo) -> Any:
        """A key travels in an HTTP header: printable ASCII without spaces (control characters made
        every platform call fail with a traceback; an endpoint token with a space or the \r of a
        CRLF env file let no buyer in, an upstream key with one blamed the upstream); an empty one
        is no key."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        if not value.strip():
            return None
        problem = api_key_problem(value, KEY_NAMES[info.field_name])
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("quant")
    @classmethod
    def _named_quant(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name a quantization, e.g. Q4_K_M")
        problem = quant_problem(value)  # a typo is said here, for every command, not as "no such file" later
        if problem is not None:
            raise PydanticCustomError("quant", problem)
        return value.strip()

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """TOML's ``parallel = true`` was taken as 1 (pydantic reads a bool as an int)."""
        if isinstance(value, bool) and _takes_a_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is not a number")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fewer_slots_with_kv_per_slot(self) -> Settings:
        """With ``kv_per_slot`` each slot holds a whole context, so unless set, 4 of them; the value
        stays a default (not in ``model_fields_set``), so the GPU plan may still lower it."""
        if self.kv_per_slot and "parallel" not in self.model_fields_set:
            self.parallel = DEFAULT_PARALLEL_KV_PER_SLOT
            self.model_fields_set.discard("parallel")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags arrive as init kwargs, then the environment, then the TOML config file."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_path()))


def _takes_a_number(annotation: Any) -> bool:
    kinds = set(get_args(annotation)) or {annotation}
    return bool(kinds & {int, float}) and bool not in kinds


SECRET_FIELDS = frozenset(name for name, f in Settings.model_fields.items() if "SecretStr" in repr(f.annotation))


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def setting_flag(field: str) -> str:
    """A setting as advice names it: its flag, and its variable, for the commands without that flag
    (``bench`` takes no --context-length, ``plan`` no --n-batch) and for the systemd service."""
    return f"--{field.replace('_', '-')} ({env_name(field)})"


LIST_EXAMPLES = {
    "devices": "name each device, e.g. CUDA0,CUDA1 (vramsupply doctor lists them)",
    "tensor_split": "give each GPU its share, e.g. 3,1",
}
TENSOR_SPLIT_RULE = "each share is a finite number, none negative and not all zero, e.g. 3,1"
TENSOR_SPLIT_FLOAT32 = "llama.cpp keeps the shares as 32-bit floats: their sum must be at most 3.4e38 and some share at least 1.2e-38; give proportions, e.g. 3,1"
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_MIN = 1.1754943508222875e-38  # the smallest normal one


def tensor_split_ok(shares: list[float] | tuple[float, ...]) -> bool:
    return all(math.isfinite(share) and share >= 0 for share in shares) and any(shares)


def tensor_split_fits_float32(shares: list[float] | tuple[float, ...]) -> bool:
    """llama.cpp divides by the sum of the shares as 32-bit floats: 1e39 is infinite there (and a
    share divided by an infinite sum no proportion), and shares that all round to zero there mean
    "by free memory", not the split that was asked for."""
    return sum(shares) <= FLOAT32_MAX and any(share >= FLOAT32_MIN for share in shares)


KEY_NAMES = {"api_key": "an API key", "endpoint_token": "an endpoint token", "upstream_api_key": "an upstream API key"}


def api_key_problem(key: str, what: str = "an API key") -> str | None:
    """What is wrong with ``key`` as an API key (or ``what`` it is), or None."""
    if not key or len(key) > MAX_API_KEY_CHARS or not all("!" <= ch <= "~" for ch in key):
        return f"{what} is 1 to {MAX_API_KEY_CHARS} printable ASCII characters without spaces"
    return None

