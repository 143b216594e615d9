"""The docs say what the code does: metric names as Ray exports them, no references a reader
cannot follow."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _exported_metric_names() -> set[str]:
    """What a Prometheus scrape shows for deployments/metrics.py: Ray prefixes `ray_`, counters
    end in `_total`, histograms export `_bucket`, `_sum` and `_count` (checked against a live
    scrape of a local `sinkserve serve`)."""
    source = (REPO / "deployments" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'(Gauge|Counter|Histogram)\(\s*"(\w+)"', source):
        base = f"ray_{name}"
        if kind == "Counter":
            names.add(f"{base}_total")
        elif kind == "Histogram":
            names |= {base, f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        else:
            names.add(base)
    return names


def test_documented_metric_names_are_the_exported_ones() -> None:
    exported = _exported_metric_names()
    assert len(exported) >= 10
    text = (REPO / "docs" / "DEPLOYMENT.md").read_text()
    documented = set(re.findall(r"`(ray_sinkserve_\w+)`", text))
    assert documented, "DEPLOYMENT.md names no metric"
    assert documented <= exported, documented - exported
    assert {n for n in exported if not n.endswith(("_bucket", "_sum", "_count"))} <= documented
    for path in DOCS:  # a bare `sinkserve_...` name must be one Ray exports with its prefix
        bare = re.findall(r"`(sinkserve_[a-z_]+)`", path.read_text())
        assert all(f"ray_{name}" in exported for name in bare), (path.name, bare)


def test_no_references_a_reader_cannot_follow() -> None:
    for path in DOCS:
        text = path.read_text()
        assert not re.search(r"\bissue \d+\b", text, re.IGNORECASE), path.name
        assert "DESIGN.md" not in text, path.name


def test_every_model_family_is_listed_where_users_look() -> None:
    """README, DEPLOYMENT, ARCHITECTURE and `--model`'s help name every row of the family table."""
    import dataclasses

    from sinkcache.config import EngineConfig
    from sinkcache.families import FAMILIES

    model_help = next(f for f in dataclasses.fields(EngineConfig) if f.name == "model")
    places = {
        "--model help": model_help.metadata["help"],
        **{
            name: (REPO / name).read_text()
            for name in ("README.md", "docs/ARCHITECTURE.md", "docs/DEPLOYMENT.md")
        },
    }
    for place, text in places.items():
        missing = [row.label for row in FAMILIES.values() if row.label not in text]
        assert not missing, f"{place} does not name {', '.join(missing)}"
