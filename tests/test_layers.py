"""The engine's layering, checked against the package map in docs/engine.md.

Every import of every engine module (function-level imports included) is read with `ast`; a unit
may import only the foundation and what its row of the map allows. So the map is the rule, and a
change that needs a new arrow changes the map on purpose.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from engine.paths import PROJECT_ROOT

ENGINE = PROJECT_ROOT / "engine"
MAP = PROJECT_ROOT / "docs" / "engine.md"
FOUNDATION = {"errors", "hashing", "paths", "progress", "records", "metric_definitions", "engine"}


def _unit(path: Path) -> str:
    """`store` for engine/store/x.py, `metrics` for engine/metrics.py, `__init__` for engine/__init__.py."""
    return path.relative_to(ENGINE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports (absolute imports; the engine uses no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
    return names


def _engine_units(path: Path) -> set[str]:
    units = set()
    for name in _imports(path):
        if name == "engine":
            units.add("engine")
        elif name.startswith("engine."):
            units.add(name.split(".")[1])
    return units - {_unit(path)}


def _package_map() -> dict[str, set[str]]:
    section = MAP.read_text(encoding="utf-8").split("## Package map", 1)[1].split("\n## ", 1)[0]
    allowed = {}
    for row in re.findall(r"^\| `([\w_.]+)/?` \|[^|]+\| ([^|]+) \|$", section, flags=re.M):
        unit, imports = row[0].removesuffix(".py"), row[1].strip()
        allowed[unit] = set() if imports == "nothing" else {name.strip() for name in imports.split(",")}
    return allowed


def test_the_map_names_every_engine_unit():
    units = {_unit(path) for path in ENGINE.rglob("*.py")}
    assert set(_package_map()) == units


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: str(p.relative_to(ENGINE)))
def test_each_module_imports_only_what_its_row_allows(path):
    allowed = _package_map()[_unit(path)] | FOUNDATION
    assert _engine_units(path) <= allowed, f"{path.relative_to(PROJECT_ROOT)} imports beyond its row of docs/engine.md"


def test_the_store_imports_nothing_above_it_and_records_no_driver():
    for path in (ENGINE / "store").rglob("*.py"):
        assert not _engine_units(path) & {"search", "compression", "export", "cache", "analysis", "cli"}, path
    assert not {name.split(".")[0] for name in _imports(ENGINE / "records.py")} - {"__future__", "dataclasses"}


@pytest.mark.parametrize("module", ["energy.py", "spectra.py", "search/baselines.py", "compression/sweep.py",
                                    "analysis/spectra_summary.py", "analysis/sensitivity_summary.py"])
def test_modules_that_only_use_records_import_no_database_code(module):
    names = _imports(ENGINE / module)
    assert "duckdb" not in names and not any(name.startswith("engine.store") for name in names)


def test_the_map_rules_out_an_arrow_that_runs_back_up():
    """The check can fail: a store module importing the search layer is outside its row."""
    assert "search" not in _package_map()["store"] | FOUNDATION
    assert {"search", "compression", "export"}.isdisjoint(_package_map()["store"])
