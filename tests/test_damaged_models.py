"""Damaged or hostile GGUF files: one readable line and a non-zero exit, never an abort or a traceback.

llama.cpp refuses most damaged files itself, and says why (its own words end up in our error).
Some it does not refuse but aborts the whole process on (GGML_ASSERT, or a C++ exception thrown
through its C API): those the memory plan refuses from the header, before llama.cpp sees the file.
The files are copies of the tiny model with one metadata value changed, written with `gguf`.
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from conftest import TINY_MODEL, run_cli
from fakehub import FakeFile, FakeHub, FakeRepo
from test_hub_cli import env_for
from vramsupply.engine.model import Model
from vramsupply.engine.types import EngineError
from vramsupply.gpu.gguf_header import GgufError, read_local_header
from vramsupply.gpu.source import SourceError, local_source

T = gguf.GGUFValueType


def tiny_with(directory: Path, name: str, changes: dict[str, MetadataDetails], remove: tuple[str, ...] = ()) -> Path:
    """stories260K with `changes` to its metadata (and `remove` keys gone), as `<name>.gguf`."""
    reader = gguf.GGUFReader(TINY_MODEL)
    target = directory / f"{name}.gguf"
    writer = gguf.GGUFWriter(target, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(), endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, dict(changes), list(remove))
    return target


def tokens_with(change: dict[int, str]) -> dict[str, MetadataDetails]:
    tokens = list(gguf.GGUFReader(TINY_MODEL).get_field(gguf.Keys.Tokenizer.LIST).contents())
    for token_id, text in change.items():
        tokens[token_id] = text
    return {gguf.Keys.Tokenizer.LIST: MetadataDetails(T.ARRAY, tokens, sub_type=T.STRING)}


def no_byte_tokens() -> dict[int, str]:
    """The 256 `<0xNN>` tokens (ids 3 to 258 in stories260K) renamed, so bytes have no token."""
    return {3 + byte: f"BYTE_{byte}" for byte in range(256)}


def one(value: float, kind: T = T.UINT32) -> MetadataDetails:
    return MetadataDetails(kind, value)


# What llama.cpp 0.3.36 aborts on while loading (GGML_ASSERT) or when it tokenizes a prompt.
ABORTS = {
    "blocks_513": ({"llama.block_count": one(513)}, r"llama.block_count is 513, more than the 512 layers llama.cpp can load"),
    "experts_unused": ({"llama.expert_count": one(1000)}, r"llama.expert_count is 1000 but llama.expert_used_count is 0 or missing"),
    "experts_used_only": ({"llama.expert_used_count": one(2)}, r"llama.expert_used_count is 2 but there is no llama.expert_count"),
    "experts_used_more": (
        {"llama.expert_count": one(4), "llama.expert_used_count": one(8)},
        r"llama.expert_used_count is 8 but llama.expert_count is 4: more experts per token than the model has",
    ),
    "dup_tokens": (tokens_with({12: "<0x08>"}), r"the vocabulary holds the same token twice \(ids 11 and 12\), which llama.cpp cannot load"),
    "no_byte_tokens": (tokens_with(no_byte_tokens()), r"the SPM vocabulary has no byte token for \d+ of the bytes text can hold .*would crash on a prompt"),
    # GGML_ASSERT(eps >= 0.0f) at the first decode: serve died with a native backtrace, and a
    # `models pull` of the file had said it was ready
    "eps_negative": (
        {"llama.attention.layer_norm_rms_epsilon": one(-1.0, T.FLOAT32)},
        r"llama.attention.layer_norm_rms_epsilon is -1.0, not a finite number of at least 0: the file is damaged",
    ),
    "eps_nan": ({"llama.attention.layer_norm_rms_epsilon": one(float("nan"), T.FLOAT32)}, r"llama.attention.layer_norm_rms_epsilon is nan, not a finite"),
}


@pytest.mark.parametrize("name", sorted(ABORTS))
def test_the_plan_refuses_what_llama_cpp_would_abort_on(tmp_path: Path, name: str) -> None:
    changes, message = ABORTS[name]
    refused_with(tmp_path, name, changes, message)


def refused_with(tmp_path: Path, name: str, changes: dict, message: str) -> None:
    """The tiny model with ``changes`` to its header is refused by the plan, with ``message``."""
    path = tiny_with(tmp_path, name, changes)
    with pytest.raises(SourceError, match=rf"^{re.escape(str(path))}: {message}"):
        local_source(str(path))


def test_a_moe_header_with_consistent_expert_counts_and_a_full_vocabulary_passes(tmp_path: Path) -> None:
    path = tiny_with(tmp_path, "moe", {"llama.expert_count": one(4), "llama.expert_used_count": one(2)})
    assert local_source(str(path)).shape.n_layer == 5


def test_serving_a_file_llama_cpp_would_abort_on_ends_with_one_line_not_sigabrt(tmp_path: Path) -> None:
    for name in ("blocks_513", "dup_tokens", "experts_used_more", "eps_negative"):
        path = tiny_with(tmp_path, name, ABORTS[name][0])
        served = run_cli("serve", "--model", str(path), "--no-register", "--port", "0", timeout=60)
        assert served.returncode == 1, (name, served.returncode, served.stderr[-2000:])
        assert served.stderr.strip().splitlines()[-1].startswith(f"error: {path}: "), served.stderr
        assert "Traceback" not in served.stderr


def test_models_pull_of_a_local_file_serve_would_refuse_is_no_ready_model(tmp_path: Path) -> None:
    damaged = tiny_with(tmp_path, "eps", ABORTS["eps_negative"][0])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(TINY_MODEL.read_bytes()[:100_000])
    for path in (damaged, truncated):
        pulled = run_cli("models", "pull", str(path))
        assert pulled.returncode == 1 and "ready" not in pulled.stdout, (pulled.stdout, pulled.stderr)  # before: "ready", exit 0
        assert pulled.stderr.strip().startswith(f"error: {path}")
    assert run_cli("models", "pull", str(TINY_MODEL)).returncode == 0


def test_a_hub_model_llama_cpp_would_abort_on_is_refused_before_it_is_downloaded(tmp_path: Path) -> None:
    data = tiny_with(tmp_path, "dup", ABORTS["dup_tokens"][0]).read_bytes()
    with FakeHub([FakeRepo("x/Dup-GGUF", {"Dup-Q4_K_M.gguf": FakeFile(data)}, ["gguf"])]) as hub:
        served = run_cli("serve", "--model", "x/Dup-GGUF", "--no-register", "--port", "0", env=env_for(hub, tmp_path / "hf-home"), timeout=60)
    assert served.returncode == 1, served.stderr[-2000:]
    assert served.stderr.strip().splitlines()[-1] == (
        "error: x/Dup-GGUF/Dup-Q4_K_M.gguf: the vocabulary holds the same token twice (ids 11 and 12), which llama.cpp cannot load"
    )
    assert all(r.headers.get("Range", "").startswith("bytes=0-") for r in hub.downloads_of("Dup-Q4_K_M.gguf")), "only its header was read"


def test_a_vocabulary_that_would_crash_on_a_prompt_is_refused_before_it_is_served(tmp_path: Path) -> None:
    """stories260K without its byte tokens loads, but the first prompt with a character outside
    its vocabulary ("漢") makes llama.cpp throw std::out_of_range through ctypes: an abort."""
    path = tiny_with(tmp_path, "no_byte_tokens", tokens_with(no_byte_tokens()))
    planned = run_cli("plan", "--model", str(path))
    assert planned.returncode == 1
    assert planned.stderr.strip().startswith(f"error: {path}: the SPM vocabulary has no byte token for ")


# Values of the wrong type where a number is expected: one line each, never a Python traceback.
WRONG_TYPES = {
    "align_str": ({"general.alignment": MetadataDetails(T.STRING, "abc")}, r"general.alignment is of type string, not uint32"),
    "align_arr": ({"general.alignment": MetadataDetails(T.ARRAY, [32, 32], sub_type=T.UINT32)}, r"general.alignment is of type array"),
    "align_nan": ({"general.alignment": one(float("nan"), T.FLOAT32)}, r"general.alignment is of type float32"),
    "align_inf": ({"general.alignment": one(float("inf"), T.FLOAT32)}, r"general.alignment is of type float32"),
    "align_7": ({"general.alignment": one(7)}, r"general.alignment 7 is not a power of 2"),
    "vocab_arr": ({"llama.vocab_size": MetadataDetails(T.ARRAY, [1, 2], sub_type=T.UINT32)}, r"llama.vocab_size is an array of 2 values, not a count"),
    "ctx_arr": ({"llama.context_length": MetadataDetails(T.ARRAY, [1, 2], sub_type=T.UINT32)}, r"llama.context_length is an array of 2 values"),
    "keylen_arr": ({"llama.attention.key_length": MetadataDetails(T.ARRAY, [8], sub_type=T.UINT32)}, r"llama.attention.key_length is an array of 1 value, not"),
    "keylen_nan": ({"llama.attention.key_length": one(float("nan"), T.FLOAT32)}, r"llama.attention.key_length is nan, not a count"),
    "ssm_arr": ({"llama.ssm.state_size": MetadataDetails(T.ARRAY, [16], sub_type=T.UINT32)}, r"llama.ssm.state_size is an array of 1 value"),
    "vocab_str": ({"llama.vocab_size": MetadataDetails(T.STRING, "lots")}, r"llama.vocab_size is 'lots' \(a string\), not a count"),
    "headkv_nan": (
        {"llama.attention.head_count_kv": MetadataDetails(T.ARRAY, [float("nan")] * 5, sub_type=T.FLOAT32)},
        r"llama.attention.head_count_kv holds nan among its per-layer counts",
    ),
}


@pytest.mark.parametrize("name", sorted(WRONG_TYPES))
def test_a_header_value_of_the_wrong_type_is_one_line(tmp_path: Path, name: str) -> None:
    changes, message = WRONG_TYPES[name]
    refused_with(tmp_path, name, changes, message)


@pytest.mark.parametrize("file_type", [MetadataDetails(T.STRING, "Q4_K_M"), MetadataDetails(T.ARRAY, [1, 2], sub_type=T.UINT32), one(float("nan"), T.FLOAT32)])
def test_a_file_type_that_is_not_a_number_plans_as_an_unknown_quant(tmp_path: Path, file_type: MetadataDetails) -> None:
    path = tiny_with(tmp_path, "stories", {"general.file_type": file_type})
    assert [quant.quant for quant in local_source(str(path)).quants] == ["unknown"]


@pytest.mark.parametrize(("count", "kind"), [(1 << 62, T.UINT64), ((1 << 64) - 1, T.UINT64), (1 << 24, T.UINT32)])
def test_an_absurd_block_count_is_refused_before_anything_is_sized_by_it(tmp_path: Path, count: int, kind: T) -> None:
    path = tiny_with(tmp_path, "blocks", {"llama.block_count": one(count, kind)})
    started = time.monotonic()
    with pytest.raises(SourceError, match=rf"llama.block_count is {count}, more than the 512 layers"):
        local_source(str(path))
    assert time.monotonic() - started < 5


def test_arrays_nested_thousands_deep_are_refused_without_recursing(tmp_path: Path) -> None:
    """gguf.cpp reads no array of arrays; a reader that recursed into 5000 of them would hit
    Python's recursion limit (RecursionError)."""
    key = b"x.nested"
    nested = struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9) + nested)
    with pytest.raises(GgufError, match=r"x.nested is an array of arrays, which llama.cpp cannot read"):
        read_local_header(path)
    planned = run_cli("plan", "--model", str(path))
    assert planned.returncode == 1 and planned.stderr.strip() == f"error: {path}: x.nested is an array of arrays, which llama.cpp cannot read"


def test_a_file_llama_cpp_refuses_says_why_in_llama_cpps_words(tmp_path: Path) -> None:
    path = tiny_with(tmp_path, "tokenizer_wat", {gguf.Keys.Tokenizer.MODEL: MetadataDetails(T.STRING, "wat")})
    with pytest.raises(EngineError, match=rf"^llama.cpp could not load {path}: error loading model vocabulary: unknown tokenizer: 'wat'$"):
        Model.load(path, 0)


def test_reading_a_150k_token_vocabulary_for_its_checks_stays_cheap(tmp_path: Path) -> None:
    """The duplicate and byte-token checks read every token string of the header."""
    from gguf_shapes import Shape, write_header_only

    shape = Shape("vocab-150k", 512, 2, 1024, 8, 8, 151936, 4096, gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)
    path = write_header_only(tmp_path / "vocab.gguf", shape)
    started = time.monotonic()
    source = local_source(str(path))
    assert source.shape.n_vocab == 151936
    assert time.monotonic() - started < 2  # about 0.1 s here
