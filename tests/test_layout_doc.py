"""docs/layout.md is where a newcomer finds their way: every module of the package and every script and tool is
named there, so a new one cannot be added without its line."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["edge_runtime", "train", "quantize", "benchmarks", "malaria_edge/export", "tools", "scripts"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_module_is_named_in_the_layout_page(folder):
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / folder).glob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in layout and f"`{folder}/{p.name}`" not in layout]
    assert not missing, f"docs/layout.md does not name {folder}/: {', '.join(missing)}"
