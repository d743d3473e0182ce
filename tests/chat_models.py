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
FAMILIES = ("qwen3", "llama3", "mistral")


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
    copy_with_new_metadata(reader, writer, metadata, [])
    return target
