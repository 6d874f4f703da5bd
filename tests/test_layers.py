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
