"""Copies of the tiny model whose GGUF metadata carries a real chat template of a model family.

Written with the ``gguf`` package's own new-metadata script (``copy_with_new_metadata``), so the
files are what a converted model of that family would carry. The tiny model still writes nonsense:
tests of tool calls rely on forced-call grammars, or parse strings directly.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from conftest import TINY_MODEL

TEMPLATES = Path(__file__).resolve().parent / "templates"
FAMILIES = ("qwen3", "qwen35", "llama3", "mistral", "gpt-oss", "gemma2")
# Control tokens the family's real vocabulary has, written over byte-fallback tokens of bytes that
# text never contains (0x01, 0x02), so the engine's rendering of special markers can be tested.
# gpt-oss's harmony markers take the bytes 0x01 to 0x07.
CONTROL_TOKENS = {
    "llama3": {4: "<|python_tag|>"},
    "mistral": {4: "[TOOL_CALLS]"},
    "qwen3": {5: "</think>"},
    "gpt-oss": dict(enumerate(("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>", "<|call|>", "<|return|>"), start=4)),
}


def template_text(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text()


def write_chat_model(family: str, directory: Path) -> Path:
    """``stories260K`` with the ``family`` template and the name ``stories260k-<family>``."""
    target = directory / f"stories260k-{family}.gguf"
    reader = gguf.GGUFReader(TINY_MODEL)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    metadata = {
        gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template_text(family)),
        gguf.Keys.General.NAME: MetadataDetails(gguf.GGUFValueType.STRING, f"stories260k-{family}"),
    }
    if family in CONTROL_TOKENS:
        tokens = list(reader.get_field(gguf.Keys.Tokenizer.LIST).contents())
        types = list(reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE).contents())
        for token_id, text in CONTROL_TOKENS[family].items():
            tokens[token_id], types[token_id] = text, gguf.TokenType.CONTROL
        array = gguf.GGUFValueType.ARRAY
        metadata[gguf.Keys.Tokenizer.LIST] = MetadataDetails(array, tokens, sub_type=gguf.GGUFValueType.STRING)
        metadata[gguf.Keys.Tokenizer.TOKEN_TYPE] = MetadataDetails(array, types, sub_type=gguf.GGUFValueType.INT32)
    copy_with_new_metadata(reader, writer, metadata, [])
    return target
