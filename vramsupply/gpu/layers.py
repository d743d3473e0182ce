"""Which layers of a model keep attention KV, which keep a recurrent state, and how big that state is.

Hybrid models (Qwen3.5, Granite 4 H, Jamba, LFM2, Nemotron-H) mix two kinds of layers. An
attention layer keeps KV that grows with the context. A layer with a recurrent state (Mamba's SSM,
a gated delta net, a short convolution, RWKV's time mix) keeps one state of fixed size per
sequence, whatever its length. llama.cpp allocates KV only for the attention layers, and for each
recurrent layer `n_embd_r + n_embd_s` f32 values for each of the context's `n_seq_max` sequences
(llama-hparams.cpp, llama-memory-recurrent.cpp). Qwen3.5-9B's 24 gated-delta-net layers hold about
50 MB per sequence, and its 8 attention layers a quarter of the KV a plain 32-layer model would.

Which layer is which, read as llama.cpp's loaders read it:

- an `attention.recurrent_layers` array names them;
- else a per-layer `attention.head_count_kv` array: a layer without KV heads is recurrent (in
  Nemotron-H, one without a feed-forward either);
- else `full_attention_interval` (Qwen3-Next, Qwen3.5: every 4th layer attends unless it says
  otherwise);
- else a model with no attention heads (Mamba, RWKV) is recurrent in every layer;
- else a model with a recurrent state we cannot place (Falcon-H1 has both kinds in every layer) is
  counted with both in every layer: more than llama.cpp allocates, never less.

Every count is read through `count` and `per_layer`, which turn a value of the wrong type (a
string, an array, NaN) into one ShapeError line instead of a Python traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramsupply.gpu.gguf_header import ArrayLength, GgufHeader

# Header keys only models with a recurrent state have (Mamba, RWKV, LFM2, and the linear-attention
# layers of hybrids such as Qwen3.5): one state per sequence, whatever its length.
RECURRENT_KEYS = ("ssm.state_size", "ssm.conv_kernel", "wkv.head_size", "shortconv.l_cache")
# Architectures whose attention layers come every `full_attention_interval` layers (default 4)
# when the header does not list them.
INTERVAL_ARCHITECTURES = frozenset({"qwen3next", "qwen35", "qwen35moe"})
DEFAULT_INTERVAL = 4
RWKV_TOKEN_SHIFTS = 2  # llama.cpp's default token_shift_count


class ShapeError(ValueError):
    """The header lacks what the estimate needs (an architecture we cannot size), or holds what
    llama.cpp cannot load; the message is one line."""


@dataclass(frozen=True)
class Layers:
    """Per layer: its attention KV heads (0 where it keeps no KV) and whether it keeps a state."""

    kv_heads: tuple[int, ...]
    recurrent: tuple[bool, ...]
    state_floats: int  # one recurrent layer's state, per sequence (f32 values)

    @property
    def state_floats_per_sequence(self) -> int:
        return self.state_floats * sum(self.recurrent)


def read_layers(header: GgufHeader, n_layer: int, n_embd: int) -> Layers:
    """The layers of the model in `header`; `n_head_kv` defaults to the head count, as in llama.cpp."""
    has_state = any(header.arch(key) is not None for key in RECURRENT_KEYS)
    heads = per_layer(header, "attention.head_count", n_layer)
    kv_heads = heads if header.arch("attention.head_count_kv") is None else per_layer(header, "attention.head_count_kv", n_layer)
    if not has_state:
        return Layers(kv_heads, (False,) * n_layer, 0)
    recurrent = _recurrent_layers(header, n_layer, kv_heads)
    if recurrent is None:  # not placed: both kinds in every layer
        return Layers(kv_heads, (True,) * n_layer, state_floats(header, n_embd))
    kv_heads = tuple(0 if r else k for r, k in zip(recurrent, kv_heads))
    return Layers(kv_heads, recurrent, state_floats(header, n_embd))


def count(header: GgufHeader, key: str, default: int = 0) -> int:
    """The `{architecture}.{key}` count: `default` when absent, else a whole number >= 0."""
    value = header.arch(key)
    if value is None:
        return default
    if not _is_count(value):
        raise ShapeError(f"{header.architecture}.{key} is {_described(value)}, not a count")
    return value


def per_layer(header: GgufHeader, key: str, n_layer: int) -> tuple[int, ...]:
    """A count given once for all layers or as an array of one per layer; 0 when absent."""
    value = header.arch(key)
    if value is None:
        return (0,) * n_layer
    if not isinstance(value, tuple):
        return (count(header, key),) * n_layer
    bad = next((v for v in value[:n_layer] if not _is_count(v)), None)
    if bad is not None:
        raise ShapeError(f"{header.architecture}.{key} holds {_described(bad)} among its per-layer counts")
    return tuple(value[:n_layer]) + (0,) * max(0, n_layer - len(value))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _described(value: Any) -> str:
    """A wrong value, short: `'2048' (a string)`, `nan`, `an array of 600 values`."""
    if isinstance(value, (tuple, ArrayLength)):
        n = len(value) if isinstance(value, tuple) else value.length
        return f"an array of {n} value{'' if n == 1 else 's'}"
    if isinstance(value, str):
        return f"{value[:40]!r} (a string)"
    return repr(value)


def _recurrent_layers(header: GgufHeader, n_layer: int, kv_heads: tuple[int, ...]) -> tuple[bool, ...] | None:
    listed = header.arch("attention.recurrent_layers")
    if isinstance(listed, tuple):  # flags: bools, or counts of 0 and 1
        return tuple(bool(v) for v in listed[:n_layer]) + (False,) * max(0, n_layer - len(listed))
    if isinstance(header.arch("attention.head_count_kv"), tuple):
        if header.architecture.startswith("nemotron_h"):  # a layer with neither is a plain MLP
            ffn = per_layer(header, "feed_forward_length", n_layer)
            return tuple(k == 0 and f == 0 for k, f in zip(kv_heads, ffn))
        return tuple(k == 0 for k in kv_heads)
    if header.arch("full_attention_interval") is not None or header.architecture in INTERVAL_ARCHITECTURES:
        every = count(header, "full_attention_interval", DEFAULT_INTERVAL)
        if every == 0:  # llama.cpp would divide by it
            raise ShapeError(f"{header.architecture}.full_attention_interval is 0")
        return tuple((i + 1) % every != 0 for i in range(n_layer))
    if not any(kv_heads):
        return (True,) * n_layer
    return None


def state_floats(header: GgufHeader, n_embd: int) -> int:
    """One recurrent layer's state per sequence, in f32 values: llama.cpp's n_embd_r + n_embd_s."""
    if count(header, "wkv.head_size"):  # RWKV: token shifts, and a head_size-wide state per channel
        return (count(header, "token_shift_count") or RWKV_TOKEN_SHIFTS) * n_embd + n_embd * count(header, "wkv.head_size")
    d_state, d_inner = count(header, "ssm.state_size"), count(header, "ssm.inner_size")
    ssm = d_state * d_inner
    if count(header, "shortconv.l_cache"):  # LFM2's short convolution keeps its last l_cache - 1 inputs
        return n_embd * (count(header, "shortconv.l_cache") - 1) + ssm
    d_conv, groups = count(header, "ssm.conv_kernel"), count(header, "ssm.group_count")
    return max(0, d_conv - 1) * (d_inner + 2 * groups * d_state) + ssm
