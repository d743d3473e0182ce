#!/usr/bin/env python3
"""Write a random-weight hybrid GGUF the size of the bench model, for benches of models whose
state cannot be cut back (Qwen3.5's linear-attention layers, Mamba's).

No real hybrid model can be downloaded here, so this writes llama.cpp's ``jamba``: mamba layers
with an attention layer every ``--attention-every`` (Qwen3.5 has one full-attention layer in
four), a dense FFN in every layer, Q8_0 matrices, and the bench model's 32000-token tokenizer
(so prompts tokenize as they do for the bench model). The output row of EOS is zeroed, as in
the team's make_bench_model.py, so greedy decoding never stops early.

    bench/.cache/venv-llamacpp-server/bin/python bench/hybrid_model.py   # bench/.cache/bench-jamba-768x12-q8_0.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import BENCH_MODEL, CACHE  # noqa: E402

Q8 = gguf.GGMLQuantizationType.Q8_0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--attention-every", type=int, default=4, help="every n-th layer is attention (the rest mamba)")
    parser.add_argument("--out", type=Path, default=CACHE / "bench-jamba-768x12-q8_0.gguf")
    args = parser.parse_args()
    write(args.out, args.dim, args.layers, args.ffn, args.attention_every)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")


def write(out: Path, dim: int, layers: int, ffn: int, every: int) -> None:
    reader = gguf.GGUFReader(BENCH_MODEL)
    n_vocab = len(reader.get_field(gguf.Keys.Tokenizer.LIST).contents())
    heads, kv_heads, d_inner, d_state, dt_rank = dim // 64, max(1, dim // 256), 2 * dim, 16, dim // 16
    attention = [(i % every) == every - 1 for i in range(layers)]
    writer = gguf.GGUFWriter(out, arch="jamba")
    writer.add_name("bench-jamba")
    writer.add_context_length(4096)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv([kv_heads if a else 0 for a in attention])
    writer.add_ssm_conv_kernel(4)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    rng = np.random.default_rng(0)

    def mat(rows: int, cols: int, scale: float = 0.02) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * scale

    def q8(name: str, array: np.ndarray) -> None:
        writer.add_tensor(name, quantize(array, Q8), raw_dtype=Q8)

    def f32(name: str, array: np.ndarray) -> None:
        writer.add_tensor(name, array.astype(np.float32))

    embedding = mat(n_vocab, dim, 0.5)
    embedding[2] = 0.0  # tied output: EOS never wins
    q8("token_embd.weight", embedding)
    f32("output_norm.weight", np.ones(dim))
    kv = kv_heads * 64
    for i, is_attention in enumerate(attention):
        f32(f"blk.{i}.attn_norm.weight", np.ones(dim))
        if is_attention:
            q8(f"blk.{i}.attn_q.weight", mat(dim, dim))
            q8(f"blk.{i}.attn_k.weight", mat(kv, dim))
            q8(f"blk.{i}.attn_v.weight", mat(kv, dim))
            q8(f"blk.{i}.attn_output.weight", mat(dim, dim))
        else:
            q8(f"blk.{i}.ssm_in.weight", mat(2 * d_inner, dim))
            f32(f"blk.{i}.ssm_conv1d.weight", mat(d_inner, 4, 0.1))
            f32(f"blk.{i}.ssm_conv1d.bias", np.zeros(d_inner))
            q8(f"blk.{i}.ssm_x.weight", mat(dt_rank + 2 * d_state, d_inner))
            f32(f"blk.{i}.ssm_dt_norm.weight", np.ones(dt_rank))
            f32(f"blk.{i}.ssm_b_norm.weight", np.ones(d_state))
            f32(f"blk.{i}.ssm_c_norm.weight", np.ones(d_state))
            f32(f"blk.{i}.ssm_dt.weight", mat(d_inner, dt_rank, 0.1))
            f32(f"blk.{i}.ssm_dt.bias", np.zeros(d_inner))
            f32(f"blk.{i}.ssm_a", -np.exp(mat(d_inner, d_state, 0.5)))
            f32(f"blk.{i}.ssm_d", np.ones(d_inner))
            q8(f"blk.{i}.ssm_out.weight", mat(dim, d_inner))
        f32(f"blk.{i}.ffn_norm.weight", np.ones(dim))
        q8(f"blk.{i}.ffn_gate.weight", mat(ffn, dim))
        q8(f"blk.{i}.ffn_up.weight", mat(ffn, dim))
        q8(f"blk.{i}.ffn_down.weight", mat(dim, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
