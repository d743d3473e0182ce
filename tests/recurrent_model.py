"""A tiny recurrent model (llama.cpp's ``mamba`` architecture, random weights, stories260K's
tokenizer): its state cannot be cut back to an earlier position, unlike attention's KV cells.

The engine's prefix reuse, host prompt cache, prefix borrowing, ``n``-choice sharing and
speculative decoding all cut or copy parts of sequences; on such models (and hybrid ones such
as Qwen3.5) they must fall back to whole sequences and stay token-identical.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from conftest import TINY_MODEL

N_EMBD, D_STATE, D_CONV, DT_RANK, N_LAYER = 64, 16, 4, 4, 2
D_INNER = 2 * N_EMBD  # llama.cpp's mamba requires it


def write_mamba_model(directory: Path, seed: int = 7) -> Path:
    target = directory / "tiny-mamba.gguf"
    reader = gguf.GGUFReader(TINY_MODEL)
    writer = gguf.GGUFWriter(target, arch="mamba")
    writer.add_name("tiny-mamba")
    writer.add_context_length(4096)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_ssm_conv_kernel(D_CONV)
    writer.add_ssm_inner_size(D_INNER)
    writer.add_ssm_state_size(D_STATE)
    writer.add_ssm_time_step_rank(DT_RANK)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(reader, writer)
    n_vocab = len(reader.get_field(gguf.Keys.Tokenizer.LIST).contents())
    for name, array in _tensors(np.random.default_rng(seed), n_vocab):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _copy_tokenizer(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)


def _tensors(rng: np.random.Generator, n_vocab: int) -> list[tuple[str, np.ndarray]]:
    """numpy shapes are llama.cpp's dimensions reversed."""

    def weight(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = [("token_embd.weight", weight(n_vocab, N_EMBD, scale=1.0)), ("output_norm.weight", np.ones(N_EMBD, np.float32))]
    for i in range(N_LAYER):
        tensors += [
            (f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32)),
            (f"blk.{i}.ssm_in.weight", weight(2 * D_INNER, N_EMBD)),
            (f"blk.{i}.ssm_conv1d.weight", weight(D_INNER, D_CONV)),
            (f"blk.{i}.ssm_conv1d.bias", weight(D_INNER, scale=0.1)),
            (f"blk.{i}.ssm_x.weight", weight(DT_RANK + 2 * D_STATE, D_INNER)),
            (f"blk.{i}.ssm_dt.weight", weight(D_INNER, DT_RANK)),
            (f"blk.{i}.ssm_dt.bias", weight(D_INNER, scale=0.1)),
            (f"blk.{i}.ssm_a", -np.exp(weight(D_INNER, D_STATE, scale=0.5))),
            (f"blk.{i}.ssm_d", np.ones(D_INNER, np.float32)),
            (f"blk.{i}.ssm_out.weight", weight(N_EMBD, D_INNER)),
        ]
    return tensors
