"""Quant tags in GGUF file names: equality on name boundaries, subfolders, split sets, aliases."""

from __future__ import annotations

import pytest

from vramsupply.hub.quant import available_quants, group_models, normalize_quant, parse_gguf_path, select_quant


@pytest.mark.parametrize(
    ("path", "quant"),
    [
        ("Qwen3-8B-Q4_K_M.gguf", "Q4_K_M"),
        ("qwen2.5-7b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("llama-2-7b.Q4_K_M.gguf", "Q4_K_M"),
        ("bartowski_Model-Q4_K_L.gguf", "Q4_K_L"),
        ("Model-IQ4_XS.gguf", "IQ4_XS"),
        ("Model-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("ggml-model-f16.gguf", "F16"),
        ("Model-BF16.gguf", "BF16"),
        ("Model-Q4_K.gguf", "Q4_K_M"),
        ("UD-Q4_K_XL/Model-00001-of-00002.gguf", "UD-Q4_K_XL"),
        ("Qwen2-7B.gguf", None),
    ],
)
def test_quant_is_read_from_the_end_of_the_name_or_the_folder(path: str, quant: str | None) -> None:
    parsed = parse_gguf_path(path)
    assert parsed is not None
    assert parsed.quant == quant


@pytest.mark.parametrize("path", ["mmproj-Model-F16.gguf", "Model-Q4_K_M.imatrix.gguf", "README.md", "model.safetensors"])
def test_sidecars_and_other_files_are_not_models(path: str) -> None:
    assert parse_gguf_path(path) is None


@pytest.mark.parametrize("lookalike", ["Model-Q4_K_M_L.gguf", "Model-IQ4_K_M.gguf", "Model-UD-Q4_K_M.gguf", "Model-Q4_K_S.gguf"])
def test_q4_k_m_never_matches_a_lookalike(lookalike: str) -> None:
    assert select_quant([lookalike], "Q4_K_M") is None
    assert select_quant([lookalike, "Model-Q4_K_M.gguf"], "q4_k_m").paths == ("Model-Q4_K_M.gguf",)


def test_split_parts_form_one_model_in_order_and_incomplete_sets_are_dropped() -> None:
    paths = [
        "Q4_K_M/Big-Q4_K_M-00002-of-00003.gguf",
        "Q4_K_M/Big-Q4_K_M-00001-of-00003.gguf",
        "Q4_K_M/Big-Q4_K_M-00003-of-00003.gguf",
        "Q8_0/Big-Q8_0-00001-of-00002.gguf",
    ]
    group = select_quant(paths, "Q4_K_M")
    assert group is not None
    assert group.paths == tuple(f"Q4_K_M/Big-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3))
    assert select_quant(paths, "Q8_0") is None
    assert available_quants(group_models(paths)) == ["Q4_K_M"]


def test_the_shallowest_file_wins_when_a_quant_appears_twice() -> None:
    group = select_quant(["old/Model-Q8_0.gguf", "Model-Q8_0.gguf"], "Q8_0")
    assert group is not None
    assert group.paths == ("Model-Q8_0.gguf",)


def test_aliases_and_case_normalise() -> None:
    assert normalize_quant(" q5_k ") == "Q5_K_M"
    assert normalize_quant("iq4_xs") == "IQ4_XS"
