"""Tables and JSON for the `vramsupply models` commands, kept out of the thin CLI."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.filesize import decimal
from rich.table import Table
from rich.text import Text

from vramsupply.display import FitTable
from vramsupply.hub.cache import CachedModel
from vramsupply.hub.local import LocalModel
from vramsupply.hub.resolve import ResolvedModel

_STATUS_STYLE = {"verified": "green", "unverified": "yellow", "incomplete": "red"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def resolved_json(resolved: ResolvedModel) -> dict[str, Any]:
    return {**_jsonable(asdict(resolved)), "total_size": resolved.total_size}


def resolved_table(resolved: ResolvedModel) -> Table:
    table = FitTable(title=f"{resolved.model_id} {resolved.quant}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("model id", resolved.model_id)
    table.add_row("GGUF repo", resolved.repo_id)
    table.add_row("revision", resolved.revision)
    table.add_row("quant", resolved.quant)
    for index, file in enumerate(resolved.files, start=1):
        label = "file" if len(resolved.files) == 1 else f"part {index}/{len(resolved.files)}"
        table.add_row(label, f"{file.path} ({decimal(file.size)})")
        table.add_row("sha256", file.sha256)
    table.add_row("total size", decimal(resolved.total_size))
    table.add_row("quants in repo", ", ".join(resolved.available_quants))
    return table


def local_model_json(model: LocalModel) -> dict[str, Any]:
    return _jsonable(asdict(model))


def cached_json(models: list[CachedModel]) -> list[dict[str, Any]]:
    return [{**_jsonable(asdict(model)), "status": model.status.value} for model in models]


def cached_table(models: list[CachedModel], cache_dir: Path) -> Table:
    table = FitTable(title=f"models in {cache_dir}")
    for column in ("model", "quant", "GGUF repo", "revision", "size", "on disk", "status", "path"):
        table.add_column(column, overflow="fold")
    for model in models:
        style = _STATUS_STYLE[model.status.value]
        table.add_row(
            model.model_id,
            model.quant,
            model.repo_id,
            model.revision[:12],
            decimal(model.size),
            decimal(model.on_disk),
            Text(model.status.value, style=style),
            str(model.path),
        )
    return table
