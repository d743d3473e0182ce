"""A provider wiring up Prometheus reads the README for what `/metrics` offers: every metric the
agent serves is named there in full, as scraped (counters with their `_total`; labels may follow)."""

from __future__ import annotations

from conftest import REPO

from vramsupply.server.metrics import ServerMetrics


def served_names() -> list[str]:
    registry = ServerMetrics(lambda: None).registry
    return [family.name + ("_total" if family.type == "counter" else "") for family in registry.collect()]


def test_every_metric_the_agent_serves_is_named_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    names = served_names()
    assert "vramsupply_draft_accepted_tokens_total" in names and len(names) > 20
    assert [name for name in names if f"`{name}`" not in readme and f"`{name}{{" not in readme] == []
