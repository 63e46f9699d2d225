"""Shared fixtures: an isolated cache per test session, tiny models, and the real default model.

Fast tests never touch the project's cache/: RANKSCOPE_CACHE points at a temporary folder. The
smoke test reads the real converted default model from the project cache (prepared by `make test`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from engine.paths import PROJECT_ROOT
from tests.tiny_models import FAMILIES, make_tiny_model

REAL_CACHE = Path(os.environ.get("RANKSCOPE_CACHE", PROJECT_ROOT / "cache")).resolve()
# trust_remote_code loads copy modeling files into transformers' module cache: keep test runs out of ~
os.environ.setdefault("HF_MODULES_CACHE", str(Path(tempfile.mkdtemp(prefix="rankscope-hf-modules-"))))


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """Tiny models gain nothing from threads, and one thread avoids oversubscribing small machines."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own empty cache folder (and so its own DuckDB file)."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("RANKSCOPE_CACHE", str(root))
    yield root
    import gc
    import sys

    from engine.paths import choose_cache_root
    from engine.store.duckdb_store import _OPEN_STORES

    if "streamlit" in sys.modules:  # AppTest keeps stores in st.cache_resource; drop them with the test
        sys.modules["streamlit"].cache_resource.clear()
    for store in list(_OPEN_STORES.values()):
        store.close()
    choose_cache_root(None)  # a CLI test's --cache must not outlive the test
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama, qwen2, gemma3 and (unsupported) gpt2 model directories."""
    base = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_model(family, base / family) for family in (*FAMILIES, "gpt2")}


@pytest.fixture
def store(isolated_cache):
    from engine.store import open_store

    return open_store()


@pytest.fixture
def sample_text_file(tmp_path) -> Path:
    from tests.tiny_models import TRAINING_TEXT

    path = tmp_path / "sample.txt"
    path.write_text(TRAINING_TEXT * 4)
    return path


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The converted default model; skipped with a reason when `rankscope prepare` has not run."""
    path = REAL_CACHE / "models" / "smollm2-135m"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"default model not prepared at {path}: run `make prepare`")
    return path
