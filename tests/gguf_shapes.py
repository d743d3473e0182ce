"""Header-only GGUF files of real model shapes, written with the `gguf` package.

The file holds a model's complete header (metadata, a synthetic SPM vocabulary, the tensor
table) and is then extended to its full size as a sparse file, so llama.cpp accepts it for a
`no_alloc` load (which reads only the header) while the disk holds a few MB. An 8B model's shape
therefore costs nothing to test the memory plan against llama.cpp's own accounting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

ALIGNMENT = 32


@dataclass(frozen=True)
class Shape:
    name: str
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    ctx_train: int
    weight_type: GGMLQuantizationType
    file_type: LlamaFileType
    arch: ClassVar[str] = "llama"

    def tensors(self) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
        return _llama_tensors(self)

    def add_arch_keys(self, writer: GGUFWriter) -> None:
        _add_attention_keys(writer, self)
        writer.add_rope_dimension_count(self.n_embd // self.n_head)


# The team's bench model (make_bench_model.py defaults: 768x12, ffn 2048, 12 heads, 3 KV heads, Q8_0)
# with the llama SPM vocabulary of 32000 tokens.
BENCH = Shape("bench-llama", 768, 12, 2048, 12, 3, 32000, 4096, GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)
# Llama 3.1 8B's shape at Q4_K (the bulk of a Q4_K_M file).
LLAMA_8B = Shape("llama-8b-shape", 4096, 32, 14336, 32, 8, 128256, 131072, GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M)


@dataclass(frozen=True)
class HybridShape(Shape):
    """A Qwen3.5 (``qwen35``) shape: every 4th layer attends (gated, 256-wide heads), the others
    are gated delta nets whose recurrent state is ``ssm_d_state`` x ``ssm_d_inner`` per sequence."""

    head_dim: int = 256
    ssm_d_conv: int = 4
    ssm_d_inner: int = 4096  # value heads x state size
    ssm_d_state: int = 128
    ssm_k_heads: int = 16  # ssm.group_count
    ssm_v_heads: int = 32  # ssm.time_step_rank
    arch: ClassVar[str] = "qwen35"

    def tensors(self) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
        return _hybrid_tensors(self)

    def add_arch_keys(self, writer: GGUFWriter) -> None:
        _add_attention_keys(writer, self)
        _add_hybrid_keys(writer, self)


# A Qwen3.5-9B-like shape (32 layers of 4096, 8 of them attention with 16 heads and 4 KV heads of
# 256; 24 gated delta nets of 16 key and 32 value heads of 128) at Q4_K, with a 32000-token vocabulary
# to keep the file small. The dimensions follow llama.cpp's qwen35 loader; they are not read from
# the real model's file, which this machine cannot download.
QWEN35_9B = HybridShape("qwen35-9b-shape", 4096, 32, 12288, 16, 4, 32000, 262144, GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M)


@dataclass(frozen=True)
class MambaShape(Shape):
    """llama.cpp's ``mamba``: no attention, a state of (d_conv - 1) x d_inner + d_state x d_inner per
    layer and sequence. ``n_ff``, ``n_head`` and ``n_head_kv`` are unused (0)."""

    ssm_d_inner: int = 5120
    ssm_d_state: int = 16
    ssm_dt_rank: int = 160
    arch: ClassVar[str] = "mamba"

    def tensors(self) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
        return _mamba_tensors(self)

    def add_arch_keys(self, writer: GGUFWriter) -> None:
        _add_mamba_keys(writer, self)


# Mamba-2.8B's shape (64 layers of 2560, d_inner 5120) at Q8_0 where a row allows, with a 32000-token vocabulary.
MAMBA_2_8B = MambaShape("mamba-2.8b-shape", 2560, 64, 0, 0, 0, 32000, 1 << 20, GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)


def _nbytes(rows: int, cols: int, kind: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[kind]
    return rows * cols // block * type_size


def _llama_tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    head_dim = shape.n_embd // shape.n_head
    kv = shape.n_head_kv * head_dim
    q, f32 = shape.weight_type, GGMLQuantizationType.F32
    tensors = [("token_embd.weight", (shape.n_vocab, shape.n_embd), q), ("output_norm.weight", (shape.n_embd,), f32), ("output.weight", (shape.n_vocab, shape.n_embd), q)]
    for i in range(shape.n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (shape.n_embd,), f32),
            (f"blk.{i}.attn_q.weight", (shape.n_embd, shape.n_embd), q),
            (f"blk.{i}.attn_k.weight", (kv, shape.n_embd), q),
            (f"blk.{i}.attn_v.weight", (kv, shape.n_embd), q),
            (f"blk.{i}.attn_output.weight", (shape.n_embd, shape.n_embd), q),
            (f"blk.{i}.ffn_norm.weight", (shape.n_embd,), f32),
            (f"blk.{i}.ffn_gate.weight", (shape.n_ff, shape.n_embd), q),
            (f"blk.{i}.ffn_up.weight", (shape.n_ff, shape.n_embd), q),
            (f"blk.{i}.ffn_down.weight", (shape.n_embd, shape.n_ff), q),
        ]
    return tensors


def _hybrid_tensors(shape: HybridShape) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """llama.cpp's qwen35 tensors (numpy order: its dimensions reversed)."""
    q, f32, e = shape.weight_type, GGMLQuantizationType.F32, shape.n_embd
    kv, q_gate = shape.n_head_kv * shape.head_dim, 2 * shape.n_head * shape.head_dim
    key_dim, value_dim = shape.ssm_k_heads * shape.ssm_d_state, shape.ssm_v_heads * shape.ssm_d_state
    tensors = [("token_embd.weight", (shape.n_vocab, e), q), ("output_norm.weight", (e,), f32), ("output.weight", (shape.n_vocab, e), q)]
    for i in range(shape.n_layer):
        blk = f"blk.{i}."
        tensors += [(blk + "attn_norm.weight", (e,), f32), (blk + "post_attention_norm.weight", (e,), f32)]
        if (i + 1) % 4 == 0:
            tensors += [
                (blk + "attn_q.weight", (q_gate, e), q),
                (blk + "attn_k.weight", (kv, e), q),
                (blk + "attn_v.weight", (kv, e), q),
                (blk + "attn_output.weight", (shape.n_head * shape.head_dim, e), q),
                (blk + "attn_q_norm.weight", (shape.head_dim,), f32),
                (blk + "attn_k_norm.weight", (shape.head_dim,), f32),
            ]
        else:
            tensors += [
                (blk + "attn_qkv.weight", (2 * key_dim + value_dim, e), q),
                (blk + "attn_gate.weight", (value_dim, e), q),
                (blk + "ssm_conv1d.weight", (2 * key_dim + value_dim, shape.ssm_d_conv), f32),
                (blk + "ssm_dt.bias", (shape.ssm_v_heads,), f32),
                (blk + "ssm_a", (shape.ssm_v_heads,), f32),
                (blk + "ssm_beta.weight", (shape.ssm_v_heads, e), q),
                (blk + "ssm_alpha.weight", (shape.ssm_v_heads, e), q),
                (blk + "ssm_norm.weight", (shape.ssm_d_state,), f32),
                (blk + "ssm_out.weight", (e, value_dim), q),
            ]
        tensors += [(blk + "ffn_gate.weight", (shape.n_ff, e), q), (blk + "ffn_up.weight", (shape.n_ff, e), q), (blk + "ffn_down.weight", (e, shape.n_ff), q)]
    return tensors


def _mamba_tensors(shape: MambaShape) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """llama.cpp's mamba tensors; a row too short for a Q8_0 block stays f32."""
    e, inner, state, rank, f32 = shape.n_embd, shape.ssm_d_inner, shape.ssm_d_state, shape.ssm_dt_rank, GGMLQuantizationType.F32

    def matrix(rows: int, cols: int) -> tuple[tuple[int, int], GGMLQuantizationType]:
        return (rows, cols), shape.weight_type if cols % 32 == 0 else f32

    tensors = [("token_embd.weight", *matrix(shape.n_vocab, e)), ("output_norm.weight", (e,), f32)]
    for i in range(shape.n_layer):
        blk = f"blk.{i}."
        tensors += [
            (blk + "attn_norm.weight", (e,), f32),
            (blk + "ssm_in.weight", *matrix(2 * inner, e)),
            (blk + "ssm_conv1d.weight", (inner, 4), f32),
            (blk + "ssm_conv1d.bias", (inner,), f32),
            (blk + "ssm_x.weight", *matrix(rank + 2 * state, inner)),
            (blk + "ssm_dt.weight", *matrix(inner, rank)),
            (blk + "ssm_dt.bias", (inner,), f32),
            (blk + "ssm_a", (inner, state), f32),
            (blk + "ssm_d", (inner,), f32),
            (blk + "ssm_out.weight", *matrix(e, inner)),
        ]
    return tensors


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then plain pieces: a valid SPM vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    return tokens, [0.0] * n_vocab, types


def _add_attention_keys(writer: GGUFWriter, shape: Shape) -> None:
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)


def _add_hybrid_keys(writer: GGUFWriter, shape: HybridShape) -> None:
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(64)  # partial rotary: a quarter of each head
    writer.add_rope_dimension_sections([11, 11, 10, 0])
    writer.add_ssm_conv_kernel(shape.ssm_d_conv)
    writer.add_ssm_inner_size(shape.ssm_d_inner)
    writer.add_ssm_state_size(shape.ssm_d_state)
    writer.add_ssm_time_step_rank(shape.ssm_v_heads)
    writer.add_ssm_group_count(shape.ssm_k_heads)


def _add_mamba_keys(writer: GGUFWriter, shape: MambaShape) -> None:
    writer.add_ssm_conv_kernel(4)
    writer.add_ssm_inner_size(shape.ssm_d_inner)
    writer.add_ssm_state_size(shape.ssm_d_state)
    writer.add_ssm_time_step_rank(shape.ssm_dt_rank)


def write_header_only(path: Path, shape: Shape) -> Path:
    writer = GGUFWriter(str(path), shape.arch)
    writer.add_name(shape.name)
    writer.add_context_length(shape.ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_layer_norm_rms_eps(1e-5)
    shape.add_arch_keys(writer)
    writer.add_file_type(shape.file_type)
    tokens, scores, types = _vocabulary(shape.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    data_bytes = 0
    for name, dims, kind in shape.tensors():
        nbytes = _nbytes(dims[0], dims[1], kind) if len(dims) == 2 else dims[0] * 4
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=kind)
        data_bytes += -(-nbytes // ALIGNMENT) * ALIGNMENT
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_end = path.stat().st_size
    data_offset = -(-header_end // ALIGNMENT) * ALIGNMENT
    os.truncate(path, data_offset + data_bytes)  # sparse: the weights take no disk space
    return path
