"""The README's module tables and docs/architecture.md's module map match the code's layout:
every module of the node is named, and every module named exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE = REPO / "node"


def _table_after(text: str, heading_or_line: str) -> str:
    """The first markdown table after ``heading_or_line``."""
    start = text.index(heading_or_line)
    rows: list[str] = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return "\n".join(rows)


def _top_level_modules() -> set[str]:
    """``node/<name>.py`` and ``node/<package>/`` (without __init__/__main__)."""
    out = {p.stem for p in NODE.glob("*.py") if not p.stem.startswith("__")}
    out |= {p.name for p in NODE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return out


def test_readme_node_table_names_every_module_and_only_existing_ones():
    readme = (REPO / "README.md").read_text()
    table = _table_after(readme, "Every stage of the data path has a module of its name")
    for name in _top_level_modules():
        assert re.search(rf"\b{re.escape(name)}(\.py|/)", table), f"README's module table does not name node/{name}"
    for path in re.findall(r"`node/([\w/]+(?:\.py)?)`", table):
        assert (NODE / path).exists(), f"README's module table names node/{path}, which does not exist"


def test_readme_pipeline_table_matches_node_pipeline():
    readme = (REPO / "README.md").read_text()
    table = _table_after(readme, "## Imaging pipeline (`node/pipeline/`)")
    pipeline = NODE / "pipeline"
    for p in pipeline.rglob("*.py"):
        if p.stem == "__init__":
            continue
        assert f"`{p.name}`" in table or f"`{p.relative_to(pipeline)}`" in table, \
            f"README's pipeline table does not name {p.relative_to(REPO)}"
    for sub in (d for d in pipeline.iterdir() if d.is_dir() and (d / "__init__.py").exists()):
        assert f"`{sub.name}/`" in table, f"README's pipeline table does not name {sub.relative_to(REPO)}/"


def test_architecture_module_map_names_existing_modules():
    doc = (REPO / "docs" / "architecture.md").read_text()
    table = _table_after(doc, "## Module map")
    named = re.findall(r"`(node/[\w/]+(?:\.py)?)`", table)
    assert named
    for path in named:
        assert (REPO / path).exists(), f"docs/architecture.md's module map names {path}, which does not exist"
    for name in _top_level_modules() - {"cli", "training", "tools"}:
        assert f"node/{name}" in table, f"docs/architecture.md's module map does not name node/{name}"
