"""Tiny GGUFs of architectures whose memory is not plain attention KV (random weights,
stories260K's tokenizer), written with the gguf package:

- ``write_mamba_model``: llama.cpp's ``mamba``, a recurrent state that cannot be cut back to an
  earlier position, unlike attention's KV cells (hybrid models such as Qwen3.5 have such layers);
- ``write_swa_model``: ``cohere2`` with every layer on an 8-token sliding window, whose cache may
  drop positions that left the window;
- ``write_hybrid_model``: ``jamba`` with mamba layers 0 and 2 and attention layers 1 and 3, so a
  sequence holds both attention KV, which can be cut back, and a recurrent state, which cannot
  (as in hybrid models such as Qwen3.5); ``llama_model_is_hybrid`` is true for it.

The engine's prefix reuse, host prompt cache, prefix borrowing, ``n``-choice sharing and
speculative decoding all cut or copy parts of sequences; on these they must stay token-identical
to the prompt alone.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from conftest import TINY_MODEL

N_EMBD, D_STATE, D_CONV, DT_RANK, N_LAYER = 64, 16, 4, 4, 2
N_HEAD, N_HEAD_KV, N_FF, SWA_WINDOW = 4, 2, 128, 8
D_INNER = 2 * N_EMBD  # llama.cpp's mamba requires it
HYBRID_ATTENTION = (False, True, False, True)  # per jamba layer: attention (else mamba)


def write_mamba_model(directory: Path, seed: int = 7) -> Path:
    writer, n_vocab = _start(directory / "tiny-mamba.gguf", "mamba")
    writer.add_ssm_conv_kernel(D_CONV)
    writer.add_ssm_inner_size(D_INNER)
    writer.add_ssm_state_size(D_STATE)
    writer.add_ssm_time_step_rank(DT_RANK)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, array in _tensors(np.random.default_rng(seed), n_vocab):
        writer.add_tensor(name, array)
    return _finish(writer)


def write_hybrid_model(directory: Path, seed: int = 11) -> Path:
    """``jamba``: a layer is attention where its ``head_count_kv`` is non-zero, else mamba (the same
    tensors as ``write_mamba_model``'s plus RMS norms of dt, B and C); a dense FFN in every layer
    (no ``expert_count``, no ``ffn_gate_inp``), no RoPE, output tied to ``token_embd``."""
    writer, n_vocab = _start(directory / "tiny-hybrid.gguf", "jamba", n_layer=len(HYBRID_ATTENTION))
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv([N_HEAD_KV if attention else 0 for attention in HYBRID_ATTENTION])
    writer.add_ssm_conv_kernel(D_CONV)
    writer.add_ssm_inner_size(D_INNER)
    writer.add_ssm_state_size(D_STATE)
    writer.add_ssm_time_step_rank(DT_RANK)
    writer.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, np.float32)

    kv = N_HEAD_KV * N_EMBD // N_HEAD
    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", ones(N_EMBD))
    for i, attention in enumerate(HYBRID_ATTENTION):
        if attention:
            mixer = [
                ("attn_q.weight", weight(N_EMBD, N_EMBD)),
                ("attn_k.weight", weight(kv, N_EMBD)),
                ("attn_v.weight", weight(kv, N_EMBD)),
                ("attn_output.weight", weight(N_EMBD, N_EMBD)),
            ]
        else:
            mixer = [
                ("ssm_in.weight", weight(2 * D_INNER, N_EMBD)),
                ("ssm_conv1d.weight", weight(D_INNER, D_CONV)),
                ("ssm_conv1d.bias", weight(D_INNER, scale=0.1)),
                ("ssm_x.weight", weight(DT_RANK + 2 * D_STATE, D_INNER)),
                ("ssm_dt_norm.weight", ones(DT_RANK)),
                ("ssm_b_norm.weight", ones(D_STATE)),
                ("ssm_c_norm.weight", ones(D_STATE)),
                ("ssm_dt.weight", weight(D_INNER, DT_RANK)),
                ("ssm_dt.bias", weight(D_INNER, scale=0.1)),
                ("ssm_a", -np.exp(weight(D_INNER, D_STATE, scale=0.5))),
                ("ssm_d", ones(D_INNER)),
                ("ssm_out.weight", weight(N_EMBD, D_INNER)),
            ]
        for name, array in [
            ("attn_norm.weight", ones(N_EMBD)),
            *mixer,
            ("ffn_norm.weight", ones(N_EMBD)),
            ("ffn_gate.weight", weight(N_FF, N_EMBD)),
            ("ffn_up.weight", weight(N_FF, N_EMBD)),
            ("ffn_down.weight", weight(N_EMBD, N_FF)),
        ]:
            writer.add_tensor(f"blk.{i}.{name}", array)
    return _finish(writer)


def _start(target: Path, arch: str, n_layer: int = N_LAYER) -> tuple[gguf.GGUFWriter, int]:
    """A writer with the shape the models share and stories260K's tokenizer; its vocabulary size."""
    reader = gguf.GGUFReader(TINY_MODEL)
    writer = gguf.GGUFWriter(target, arch=arch)
    writer.add_name(target.stem)
    writer.add_context_length(4096)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(reader, writer)
    return writer, len(reader.get_field(gguf.Keys.Tokenizer.LIST).contents())


def _finish(writer: gguf.GGUFWriter) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(writer.path)


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


def write_swa_model(directory: Path, seed: int = 3) -> Path:
    """Two layers, both on the sliding window (cohere2 makes every fourth layer a full one)."""
    writer, n_vocab = _start(directory / "tiny-swa.gguf", "cohere2")
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_sliding_window(SWA_WINDOW)
    writer.add_logit_scale(1.0)
    writer.add_layer_norm_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    kv = N_HEAD_KV * N_EMBD // N_HEAD
    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    for i in range(N_LAYER):
        for name, array in (
            ("attn_norm.weight", np.ones(N_EMBD, np.float32)),
            ("attn_q.weight", weight(N_EMBD, N_EMBD)),
            ("attn_k.weight", weight(kv, N_EMBD)),
            ("attn_v.weight", weight(kv, N_EMBD)),
            ("attn_output.weight", weight(N_EMBD, N_EMBD)),
            ("ffn_gate.weight", weight(N_FF, N_EMBD)),
            ("ffn_up.weight", weight(N_FF, N_EMBD)),
            ("ffn_down.weight", weight(N_EMBD, N_FF)),
        ):
            writer.add_tensor(f"blk.{i}.{name}", array)
    return _finish(writer)
