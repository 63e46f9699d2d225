"""Where RankScope keeps its cache: the DuckDB database, converted models, texts and arrays.

The root is, in order: the folder a front end chose for this process (`choose_cache_root`, which
the CLI's `--cache` calls), `$RANKSCOPE_CACHE` when set, otherwise `cache/` at the project root.
Array files are found from the store's own path (`Store.cache_dir`), so a store opened on another
database keeps its arrays beside it. Everything under the root can be deleted and rebuilt;
user-saved plans and exports are written elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_chosen_root: Optional[Path] = None


def choose_cache_root(path: Optional[Path | str]) -> None:
    """Use `path` as this process's cache root from now on (None: back to $RANKSCOPE_CACHE or ./cache)."""
    global _chosen_root
    _chosen_root = None if path is None else Path(path).expanduser().resolve()


def cache_root() -> Path:
    """The cache directory (created on first use)."""
    root = _chosen_root or Path(os.environ.get("RANKSCOPE_CACHE", PROJECT_ROOT / "cache")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_subdir(name: str) -> Path:
    """A named subdirectory of the cache (`models`, `texts`, `datasets`, `gguf`), created on use."""
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_path() -> Path:
    """Default location of the DuckDB database."""
    return cache_root() / "rankscope.duckdb"
