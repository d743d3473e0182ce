"""How much memory a model needs, from its GGUF header alone: weights, KV cache, compute buffers.

The numbers follow what llama.cpp allocates (checked against its own accounting of a `no_alloc`
load in tests/test_gpu_plan.py, within 10 %):

- weights: the tensor data, i.e. the file minus its header;
- KV cache: cells × (the attention layers' KV heads) × (head size K × bytes per K value + the
  same for V), for one context shared by all slots (the default), or for each slot with
  `kv_per_slot`. llama.cpp rounds the cells of a context up to a multiple of 256;
- recurrent state (Mamba, RWKV, and the linear-attention layers of hybrids such as Qwen3.5): one
  fixed-size f32 state per recurrent layer for each slot, whatever the context (`layers.py`);
- compute: the scheduler's reserved graph memory, whose peak is either the logits of a full
  micro-batch (ubatch × vocabulary, f32) or attention: without flash attention the f32 score
  matrix ubatch × cells × heads, with it only the f16 mask ubatch × cells. Plus the per-slot
  logits output buffer the context keeps on the host.

Before any of that, `check_loadable` refuses in one line what llama.cpp would not refuse but abort
the whole process on (a GGML_ASSERT while it loads, or an exception through its C API when a
prompt is tokenized): the plan reads every header before llama.cpp sees the file.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from functools import lru_cache

from vramsupply.gpu.gguf_header import TOKENS_KEY, ArrayLength, GgufHeader, TokenList
from vramsupply.gpu.layers import Layers, ShapeError, count, per_layer, read_layers

KV_CELL_PADDING = 256
# Bytes per value of each KV cache type (quantized blocks hold 32 values).
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
# llama.cpp's LLAMA_MAX_LAYERS (llama-hparams.h): a header with more layers aborts the process.
LLAMA_MAX_LAYERS = 512
# Bytes UTF-8 text can hold: an SPM tokenizer spells a character missing from its vocabulary
# with byte tokens `<0xNN>`, and llama.cpp throws through its C API (abort) for a byte without one.
UTF8_BYTES = frozenset(range(0xC0)) | frozenset(range(0xC2, 0xF5))


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide memory use, read from a GGUF header."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int  # the most of any layer
    kv_heads: tuple[int, ...]  # per layer; 0 where a layer keeps no attention KV
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    header_bytes: int  # where the tensor data starts
    input_bytes: int  # token embeddings: llama.cpp keeps them in host memory even with full offload
    state_floats: int = 0  # the recurrent layers' state for one sequence (f32 values)
    recurrent: bool = False  # some layers keep a recurrent state per sequence

    @property
    def n_head_kv(self) -> int:
        return max(self.kv_heads, default=0)

    @classmethod
    def from_header(cls, header: GgufHeader, file_bytes: int) -> ModelShape:
        check_loadable(header)
        n_layer, n_embd = _required(header, "block_count"), _required(header, "embedding_length")
        layers = read_layers(header, n_layer, n_embd)
        n_head, head_k, head_v = _attention(header, n_embd, layers)
        tokens = header.get(TOKENS_KEY)
        sizes = header.tensor_bytes(file_bytes)
        return cls(
            architecture=header.architecture,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            kv_heads=layers.kv_heads,
            head_dim_k=head_k,
            head_dim_v=head_v,
            n_vocab=count(header, "vocab_size") or (tokens.length if isinstance(tokens, ArrayLength) else 0),
            n_ctx_train=count(header, "context_length"),
            header_bytes=header.data_offset,
            input_bytes=sizes.get("token_embd.weight", 0),
            state_floats=layers.state_floats_per_sequence,
            recurrent=any(layers.recurrent),
        )


def check_loadable(header: GgufHeader) -> None:
    """Refuse what llama.cpp aborts on while it loads (GGML_ASSERT), or when it tokenizes; and an
    architecture it does not know, which it refuses only once the download is done."""
    known = known_architectures()
    if known and header.architecture not in known:
        raise ShapeError(f"llama.cpp does not know architecture {header.architecture!r}: this build cannot load the model (a newer llama-cpp-python may)")
    n_layer = count(header, "block_count")
    if n_layer > LLAMA_MAX_LAYERS:
        raise ShapeError(f"{header.architecture}.block_count is {n_layer}, more than the {LLAMA_MAX_LAYERS} layers llama.cpp can load")
    _check_experts(header, n_layer)
    _check_norm_epsilons(header)
    tokens = header.get(TOKENS_KEY)
    if isinstance(tokens, TokenList) and header.get("tokenizer.ggml.model") not in ("no_vocab", "none"):
        _check_vocabulary(tokens, header.get("tokenizer.ggml.model"))


# llama.cpp's `const char * llm_arch_name(llm_arch)`: no C API lists the architectures, but this
# function of its own has kept its signature (the mangled name encodes it) since 2023. Where the
# symbol is missing (another ABI, a build that hides it) the check is skipped, never guessed.
_ARCH_NAME_SYMBOL = "_Z13llm_arch_name8llm_arch"
_UNKNOWN_ARCH = b"(unknown)"  # LLM_ARCH_UNKNOWN, the enum's last value
_MAX_ARCHITECTURES = 4096


@lru_cache(maxsize=1)
def known_architectures() -> frozenset[str]:
    """The `general.architecture` names this llama.cpp build loads, read from its own table
    (microseconds); empty where it cannot be read reliably, and then nothing is refused."""
    import llama_cpp

    name = getattr(llama_cpp.llama_cpp._lib, _ARCH_NAME_SYMBOL, None)
    if name is None:
        return frozenset()
    name.argtypes, name.restype = [ctypes.c_int], ctypes.c_char_p
    names = []
    for arch in range(_MAX_ARCHITECTURES):  # enum llm_arch counts up from 0 to LLM_ARCH_UNKNOWN
        text = name(arch)
        if text == _UNKNOWN_ARCH:
            return frozenset(names) if "llama" in names else frozenset()
        if text is None:
            break
        names.append(text.decode("utf-8", "replace"))
    return frozenset()


def _check_experts(header: GgufHeader, n_layer: int) -> None:
    """llama.cpp asserts that a token uses at least one and at most `expert_count` experts, and none
    in a model without experts (llama-model.cpp, load_hparams)."""
    n_expert = count(header, "expert_count")
    used = max(per_layer(header, "expert_used_count", n_layer), default=0)
    arch = header.architecture
    if used > n_expert:
        has = f"{arch}.expert_count is {n_expert}" if n_expert else f"there is no {arch}.expert_count"
        raise ShapeError(f"{arch}.expert_used_count is {used} but {has}: more experts per token than the model has")
    if n_expert and not used:
        raise ShapeError(f"{arch}.expert_count is {n_expert} but {arch}.expert_used_count is 0 or missing: llama.cpp needs both")


NORM_EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")


def _check_norm_epsilons(header: GgufHeader) -> None:
    """llama.cpp asserts ``eps >= 0`` in every norm of the graph: a negative or NaN epsilon (a
    damaged file) aborted the agent with a native backtrace at its first decode."""
    for key in NORM_EPSILONS:
        value = header.arch(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ShapeError(f"{header.architecture}.{key} is {value!r}, not a finite number of at least 0: the file is damaged")


def _check_vocabulary(tokens: TokenList, model: object) -> None:
    if tokens.duplicate is not None:
        first, second = tokens.duplicate
        raise ShapeError(f"the vocabulary holds the same token twice (ids {first} and {second}), which llama.cpp cannot load")
    missing = UTF8_BYTES - tokens.byte_tokens if model == "llama" else frozenset()
    if missing:
        raise ShapeError(
            f"the SPM vocabulary has no byte token for {len(missing)} of the bytes text can hold (<0x{min(missing):02X}> first): "
            "llama.cpp would crash on a prompt with a character outside the vocabulary"
        )


def _attention(header: GgufHeader, n_embd: int, layers: Layers) -> tuple[int, int, int]:
    """The most heads of any layer, and the K and V head sizes; all 0 for a model with no
    attention at all (a recurrent one whose head count is 0 or absent), which has no KV cache."""
    if any(layers.recurrent) and not any(layers.kv_heads):
        return 0, 0, 0
    n_head = max(per_layer(header, "attention.head_count", len(layers.kv_heads)), default=0)
    if n_head == 0:
        raise ShapeError("the GGUF header has no attention.head_count")
    head_k = count(header, "attention.key_length") or n_embd // n_head
    return n_head, head_k, count(header, "attention.value_length") or head_k


def _required(header: GgufHeader, key: str) -> int:
    value = count(header, key)
    if value == 0:
        raise ShapeError(f"the GGUF header has no {key}")
    return value


@dataclass(frozen=True)
class Settings:
    """The serving settings that change memory use."""

    context_length: int
    parallel: int
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attention: bool = True
    n_batch: int = 2048
    n_ubatch: int = 512
    kv_per_slot: bool = False  # a KV cache per slot instead of one shared by the slots
    gpu_layers: int = -1  # layers offloaded to the GPUs (-1: all); the rest, their weights and KV, stay in host RAM

    @property
    def kv_contexts(self) -> int:
        """How many contexts of `context_length` the KV cache holds."""
        return self.parallel if self.kv_per_slot else 1

    def describe(self) -> str:
        """The slots and their context, as the plan's lines say it."""
        if self.kv_per_slot:
            return f"{self.parallel} slot(s) x {self.context_length} tokens"
        return f"{self.parallel} slot(s) sharing {self.context_length} tokens"


@dataclass(frozen=True)
class Estimate:
    weights_bytes: int
    kv_bytes: int  # all slots
    compute_bytes: int
    kv_bytes_per_context: int  # one context of `context_length` tokens
    state_bytes: int = 0  # recurrent state: one per slot

    @property
    def memory_bytes(self) -> int:
        """What the context keeps per token and per sequence: the KV cache and recurrent states."""
        return self.kv_bytes + self.state_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.memory_bytes + self.compute_bytes


def kv_cells(context_length: int) -> int:
    return -(-context_length // KV_CELL_PADDING) * KV_CELL_PADDING


def kv_bytes_per_context(shape: ModelShape, settings: Settings) -> int:
    per_head = shape.head_dim_k * CACHE_TYPE_BYTES[settings.cache_type_k] + shape.head_dim_v * CACHE_TYPE_BYTES[settings.cache_type_v]
    return int(kv_cells(settings.context_length) * sum(shape.kv_heads) * per_head)


def state_bytes(shape: ModelShape, settings: Settings) -> int:
    """Recurrent states in f32, one per sequence the context holds (llama.cpp: at least one)."""
    return 4 * shape.state_floats * max(1, settings.parallel)


def compute_bytes(shape: ModelShape, settings: Settings) -> int:
    ubatch = min(settings.n_ubatch, settings.n_batch, settings.context_length * settings.kv_contexts)
    cells = kv_cells(settings.context_length)
    logits = 4 * ubatch * (shape.n_vocab + 2 * shape.n_embd)
    if not any(shape.kv_heads):  # no attention layer (Mamba, RWKV)
        attention = 0
    elif settings.flash_attention:
        attention = 2 * ubatch * cells + 48 * ubatch * shape.n_embd
    else:
        attention = 4 * ubatch * cells * (shape.n_head + 1) + 24 * ubatch * shape.n_embd
    output_buffer = 4 * shape.n_vocab * settings.parallel
    return max(logits, attention) + output_buffer


def estimate(shape: ModelShape, weights_bytes: int, settings: Settings) -> Estimate:
    per_context = kv_bytes_per_context(shape, settings)
    return Estimate(weights_bytes, per_context * settings.kv_contexts, compute_bytes(shape, settings), per_context, state_bytes(shape, settings))
