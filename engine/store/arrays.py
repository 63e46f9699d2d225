"""Large arrays (covariances, factors) as safetensors files next to the database, indexed in DuckDB.

`save_arrays` writes a file under `arrays/<kind>/` beside the store's database (`Store.cache_dir`) and records it in the store only after the
file is complete; `load_arrays` returns None (a cache miss) when the index entry or the file is
missing or the file does not match its recorded hash, so a half-deleted cache costs only time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.hashing import sha256_file
from engine.store.duckdb_store import Store


def save_arrays(
    store: Store, array_id: str, kind: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None
) -> Path:
    """Write `tensors` as `arrays/<kind>/<array_id>.safetensors` and index it. Returns the path."""
    relpath = Path("arrays") / kind / f"{array_id}.safetensors"
    path = store.cache_dir / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
    os.replace(partial, path)  # atomic: readers never see a half-written file
    store.record_array(array_id, kind, str(relpath), path.stat().st_size, sha256_file(path))
    return path


def load_arrays(store: Store, array_id: str, verify: bool = False) -> Optional[dict[str, torch.Tensor]]:
    """The tensors saved under `array_id`, or None when they are not (or no longer) cached."""
    loaded = load_arrays_with_metadata(store, array_id, verify)
    return None if loaded is None else loaded[0]


def load_arrays_with_metadata(
    store: Store, array_id: str, verify: bool = False
) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """(tensors, metadata) saved under `array_id`, or None when they are not (or no longer) cached."""
    entry = store.array_entry(array_id)
    if entry is None:
        return None
    path = store.cache_dir / entry["relpath"]
    if not path.is_file() or path.stat().st_size != entry["n_bytes"]:
        store.forget_array(array_id)
        return None
    if verify and sha256_file(path) != entry["sha256"]:
        store.forget_array(array_id)
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError):  # damaged in place: recompute rather than fail
        store.forget_array(array_id)
        return None

