"""The engine never imports Streamlit: checked at run time in a fresh interpreter and in the source."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from engine.paths import PROJECT_ROOT

ENGINE_DIR = PROJECT_ROOT / "engine"

_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import engine
names = ["engine"]
for info in pkgutil.walk_packages(engine.__path__, "engine."):
    importlib.import_module(info.name)
    names.append(info.name)
print(json.dumps({"modules": names, "streamlit": sorted(m for m in sys.modules if m.split(".")[0] == "streamlit")}))
"""


def test_importing_every_engine_module_does_not_load_streamlit():
    completed = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = {
        "engine.cli", "engine.cache.calibration", "engine.store", "engine.store.duckdb_store", "engine.store.arrays",
        "engine.models.loading", "engine.texts.corpus", "engine.calibration", "engine.spectra", "engine.metrics",
    }
    assert expected <= set(report["modules"])
    source_modules = {
        ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in ENGINE_DIR.rglob("*.py")
    }
    assert source_modules <= set(report["modules"])  # the walk really reached every file
    assert report["streamlit"] == []


def test_no_engine_source_mentions_a_streamlit_import():
    sources = sorted(ENGINE_DIR.rglob("*.py"))
    assert len(sources) >= 20
    offenders = [
        str(p.relative_to(PROJECT_ROOT))
        for p in sources
        if re.search(r"(import|from)\s+streamlit", p.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    # nor a dynamic import of it
    dynamic = [
        str(p.relative_to(PROJECT_ROOT))
        for p in sources
        if re.search(r"import_module\(\s*['\"]streamlit", p.read_text(encoding="utf-8"))
    ]
    assert dynamic == []
