"""The package layers (README, "Where things are"): the engine core and the workers import neither
Ray, gRPC nor a web framework, and nothing from deployments/, the API, training or tools; the API
imports no tools; no two modules of s2d import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "s2d"
FORBIDDEN = {
    "core": ("ray", "grpc", "fastapi", "starlette", "deployments", "s2d.api", "s2d.proto", "s2d.train", "s2d.tools"),
    "worker": ("ray", "grpc", "fastapi", "starlette", "deployments", "s2d.api", "s2d.proto", "s2d.train", "s2d.tools",
               "s2d.core.engine", "s2d.core.scheduler", "s2d.core.loop"),
    "api": ("ray", "deployments", "s2d.tools", "s2d.train"),
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer):
    bad = [f"{module_name(f)} imports {m}" for f in sorted((PKG / layer).glob("*.py")) for m in sorted(imports(f))
           if any(m == x or m.startswith(x + ".") for x in FORBIDDEN[layer])]
    assert not bad, "\n".join(bad)


def test_no_two_modules_import_each_other():
    files = {module_name(f): f for f in PKG.rglob("*.py") if "__pycache__" not in f.parts}
    deps = {m: {d for d in imports(f) if d in files and d != m} for m, f in files.items()}
    cycles = sorted(f"{a} <-> {b}" for a in deps for b in deps[a] if a < b and a in deps.get(b, ()))
    assert not cycles, cycles
