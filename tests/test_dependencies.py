"""Every module of the package imports, and every third-party package that the product or the
tests import is declared in pyproject.toml, so a fresh virtual environment has it."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

import quantserve

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict[str, set[str]]:
    """{"": core distributions, "test": …, "ray": …}, names canonicalised."""
    groups: dict[str, set[str]] = {}
    for requirement in metadata.requires("quantserve") or []:
        name = canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group())
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        groups.setdefault(extra.group(1) if extra else "", set()).add(name)
    return groups


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(folder: Path) -> dict[str, str]:
    """{top-level module: first file importing it} for absolute imports outside the stdlib and the repo."""
    local = {p.stem for p in folder.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in (name.split(".")[0] for name in names):
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def undeclared(folder: Path, allowed: set[str]) -> list[str]:
    providers = metadata.packages_distributions()
    missing = []
    for module, path in third_party_imports(folder).items():
        dists = {canonical(d) for d in providers.get(module, [])}
        if not dists & allowed:
            missing.append(f"{module} (imported by {path}, provided by {sorted(dists) or 'nothing installed'})")
    return missing


def test_every_module_of_the_package_imports():
    names = [m.name for m in pkgutil.walk_packages(quantserve.__path__, "quantserve.")]
    assert len(names) > 50 and "quantserve.serve.ray_app" in names
    for name in names:
        importlib.import_module(name)


def test_the_product_imports_only_declared_packages():
    groups = declared()
    assert {"torch", "matplotlib", "httpx"} <= groups[""]
    assert undeclared(ROOT / "quantserve", groups[""] | groups["ray"]) == []


def test_the_tests_import_only_declared_packages():
    groups = declared()
    assert undeclared(ROOT / "tests", groups[""] | groups["test"]) == []


@pytest.mark.parametrize("tool", ["pytest", "schemathesis", "hypothesis", "playwright"])
def test_the_test_tools_are_bounded(tool):
    (requirement,) = [r for r in metadata.requires("quantserve") if canonical(r).startswith(tool)]
    assert "<" in requirement, f"{requirement}: an unbounded test tool lets a fresh install resolve a breaking release"
