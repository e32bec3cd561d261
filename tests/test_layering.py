"""The import layers have no circle: config and the networks know nothing of build, convert or training;
convert knows nothing of build or training (checked on every import statement, lazy ones included)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


LOWER = {
    "config.py": ("difflab.build", "difflab.convert", "difflab.train", "difflab.cli", "difflab.data"),
    "convert.py": ("difflab.build", "difflab.train", "difflab.cli"),
    **{f"nn/{p.name}": ("difflab.config", "difflab.build", "difflab.convert", "difflab.train", "difflab.cli")
       for p in (SRC / "nn").glob("*.py")},
}


@pytest.mark.parametrize("module", sorted(LOWER))
def test_lower_layers_never_import_upper_ones(module):
    bad = sorted(m for m in _imports(SRC / module) if m.startswith(LOWER[module]))
    assert not bad, f"{module} imports {bad}"


def test_the_rule_sees_lazy_imports():
    assert "difflab.convert" in _imports(SRC / "build.py")  # a function-level import in build.py
