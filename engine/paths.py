"""Where RankScope keeps its cache: the DuckDB database, converted models, texts and arrays.

The root is `$RANKSCOPE_CACHE` when set, otherwise `cache/` at the project root. Everything under
it can be deleted and rebuilt; user-saved plans and exports are written elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """The cache directory (created on first use)."""
    root = Path(os.environ.get("RANKSCOPE_CACHE", PROJECT_ROOT / "cache")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(name: str) -> Path:
    """A named subdirectory of the cache (`models`, `texts`, `arrays`, `gguf`), created on use."""
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_path() -> Path:
    """Default location of the DuckDB database."""
    return cache_root() / "rankscope.duckdb"
