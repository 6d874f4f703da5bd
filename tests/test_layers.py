"""The layering rule of ARCHITECTURE.md: arrows point down only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_core_imports_neither_ray_nor_prefect_nor_upper_layers():
    roots = imported_roots("avat3r_core")
    for forbidden in ("ray", "prefect", "stages", "pipelines"):
        assert forbidden not in roots, f"avat3r_core imports {forbidden}: {sorted(roots.get(forbidden, []))}"


def test_stages_do_not_import_prefect_or_pipelines():
    roots = imported_roots("stages")
    for forbidden in ("prefect", "pipelines"):
        assert forbidden not in roots, f"stages import {forbidden}: {sorted(roots.get(forbidden, []))}"


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports (``from a.b import c`` counts as ``a.b`` and ``a.b.c``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_inference_evaluation_and_reconstruction_never_import_training():
    """The model's consumers share avat3r_core.inference; only training itself imports train/."""
    consumers = [REPO / "avat3r_core" / "evaluation.py", *(REPO / "avat3r_core" / "inference").rglob("*.py"),
                 *(REPO / "avat3r_core" / "reconstruct").rglob("*.py")]
    for path in consumers:
        bad = sorted(m for m in imported_modules(path) if m == "avat3r_core.train" or m.startswith("avat3r_core.train."))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
