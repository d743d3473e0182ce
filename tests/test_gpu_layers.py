"""Which layers keep attention KV and which a recurrent state, read from GGUF headers as llama.cpp's
loaders read them (vramsupply/gpu/layers.py).

Qwen3.5 and Mamba shapes are checked against llama.cpp's own accounting in test_gpu_plan.py; the
header layouts below are the other ways llama.cpp's hybrid loaders tell the layers apart, each
expected value worked out from llama.cpp's formulas (llama-hparams.cpp `n_embd_r`, `n_embd_s`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter

from vramsupply.gpu.estimate import ModelShape, Settings, estimate
from vramsupply.gpu.gguf_header import read_local_header
from vramsupply.gpu.layers import read_layers

N_EMBD = 64


def header(tmp_path: Path, arch: str, **keys: Any):
    """A GGUF holding only `{arch}.<key>` metadata (underscores in keys stand for dots) and one tensor."""
    path = tmp_path / f"{arch}.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_embedding_length(N_EMBD)
    for key, value in keys.items():
        name = f"{arch}.{key.replace('__', '.')}"
        if isinstance(value, list):
            writer.add_array(name, value)
        else:
            writer.add_uint32(name, value)
    writer.add_tensor("token_embd.weight", np.zeros((8, N_EMBD), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_local_header(path)


def test_a_per_layer_kv_head_array_marks_the_layers_without_kv_heads_as_recurrent(tmp_path: Path) -> None:
    """Granite 4 H, Jamba, LFM2: `head_count_kv` per layer, 0 where the layer is a Mamba-2 block."""
    h = header(tmp_path, "granitehybrid", block_count=4, attention__head_count=4, attention__head_count_kv=[0, 0, 0, 2],
               ssm__conv_kernel=4, ssm__inner_size=128, ssm__state_size=16, ssm__group_count=2, ssm__time_step_rank=4)
    layers = read_layers(h, 4, N_EMBD)
    assert layers.kv_heads == (0, 0, 0, 2) and layers.recurrent == (True, True, True, False)
    assert layers.state_floats == 3 * (128 + 2 * 2 * 16) + 16 * 128  # conv inputs + SSM state, per layer


def test_nemotron_h_layers_with_neither_kv_heads_nor_a_feed_forward_are_the_recurrent_ones(tmp_path: Path) -> None:
    h = header(tmp_path, "nemotron_h", block_count=4, attention__head_count=4, attention__head_count_kv=[0, 0, 2, 0],
               feed_forward_length=[0, 256, 0, 0], ssm__conv_kernel=4, ssm__inner_size=128, ssm__state_size=16, ssm__group_count=1)
    assert read_layers(h, 4, N_EMBD).recurrent == (True, False, False, True)  # layer 1 is a plain MLP


def test_a_listed_set_of_recurrent_layers_wins_over_the_interval(tmp_path: Path) -> None:
    h = header(tmp_path, "qwen35", block_count=4, attention__head_count=4, attention__head_count_kv=2, full_attention_interval=4,
               attention__recurrent_layers=[1, 0, 1, 0], ssm__conv_kernel=4, ssm__inner_size=64, ssm__state_size=16, ssm__group_count=2)
    layers = read_layers(h, 4, N_EMBD)
    assert layers.recurrent == (True, False, True, False) and layers.kv_heads == (0, 2, 0, 2)


def test_the_full_attention_interval_places_the_attention_layers(tmp_path: Path) -> None:
    given = header(tmp_path, "qwen3next", block_count=6, attention__head_count=4, attention__head_count_kv=2,
                   full_attention_interval=3, ssm__conv_kernel=4, ssm__inner_size=64, ssm__state_size=16)
    assert read_layers(given, 6, N_EMBD).kv_heads == (0, 0, 2, 0, 0, 2)
    default = header(tmp_path, "qwen35moe", block_count=8, attention__head_count=4, ssm__conv_kernel=4, ssm__inner_size=64, ssm__state_size=16)
    assert read_layers(default, 8, N_EMBD).kv_heads == (0, 0, 0, 4, 0, 0, 0, 4)  # every 4th; KV heads default to heads


def test_rwkv_is_recurrent_in_every_layer_with_token_shifts_and_a_wkv_state(tmp_path: Path) -> None:
    h = header(tmp_path, "rwkv7", block_count=3, wkv__head_size=16)
    layers = read_layers(h, 3, N_EMBD)
    assert layers.recurrent == (True,) * 3 and layers.kv_heads == (0, 0, 0)
    assert layers.state_floats == 2 * N_EMBD + N_EMBD * 16


def test_a_state_that_cannot_be_placed_is_counted_in_every_layer_beside_its_kv(tmp_path: Path) -> None:
    """Falcon-H1 runs attention and Mamba side by side in every layer; an unknown hybrid is sized
    the same way, more than llama.cpp may allocate, never less."""
    h = header(tmp_path, "falcon-h1", block_count=2, attention__head_count=4, attention__head_count_kv=2,
               ssm__conv_kernel=4, ssm__inner_size=128, ssm__state_size=16, ssm__group_count=1)
    shape = ModelShape.from_header(h, 10**6)
    assert shape.kv_heads == (2, 2) and shape.state_floats == 2 * (3 * (128 + 2 * 16) + 16 * 128)
    planned = estimate(shape, 0, Settings(256, 3))
    assert planned.kv_bytes == 256 * 2 * 2 * 16 * 2 * 2 and planned.state_bytes == 3 * 4 * shape.state_floats
