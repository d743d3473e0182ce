"""Header-only GGUF files of real model shapes, written with the `gguf` package.

The file holds a llama model's complete header (metadata, a synthetic SPM vocabulary, the tensor
table) and is then extended to its full size as a sparse file, so llama.cpp accepts it for a
`no_alloc` load (which reads only the header) while the disk holds a few MB. An 8B model's shape
therefore costs nothing to test the memory plan against llama.cpp's own accounting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


# The team's bench model (make_bench_model.py defaults: 768x12, ffn 2048, 12 heads, 3 KV heads, Q8_0)
# with the llama SPM vocabulary of 32000 tokens.
BENCH = Shape("bench-llama", 768, 12, 2048, 12, 3, 32000, 4096, GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)
# Llama 3.1 8B's shape at Q4_K (the bulk of a Q4_K_M file).
LLAMA_8B = Shape("llama-8b-shape", 4096, 32, 14336, 32, 8, 128256, 131072, GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_M)


def _nbytes(rows: int, cols: int, kind: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[kind]
    return rows * cols // block * type_size


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
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


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, the 256 byte tokens, then plain pieces: a valid SPM vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    return tokens, [0.0] * n_vocab, types


def write_header_only(path: Path, shape: Shape) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(shape.name)
    writer.add_context_length(shape.ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
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
    for name, dims, kind in _tensors(shape):
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
