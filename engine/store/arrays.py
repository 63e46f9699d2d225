"""Large arrays (covariances, factors) as safetensors files next to the database, indexed in DuckDB.

`save_arrays` writes a file under `arrays/<kind>/` beside the store's database (`Store.cache_dir`)
and records it, with its size, sha256 and a fast xxh3 checksum, only after the file is complete.
`load_arrays` checks every read against the recorded checksum and returns None (a cache miss, and
the index entry is dropped) when the entry or the file is missing, or the file was truncated or
changed in place, so a damaged cache costs only time and never a wrong number. A file recorded
before checksums were kept is verified once against its sha256 and then given its checksum.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.hashing import sha256_file, xxh3_file
from engine.store.duckdb_store import Store

logger = logging.getLogger(__name__)


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
    store.record_array(array_id, kind, str(relpath), path.stat().st_size, sha256_file(path), xxh3_file(path))
    return path


def load_arrays(store: Store, array_id: str) -> Optional[dict[str, torch.Tensor]]:
    """The tensors saved under `array_id`, or None when they are not (or no longer, or not intact) cached."""
    loaded = load_arrays_with_metadata(store, array_id)
    return None if loaded is None else loaded[0]


def load_arrays_with_metadata(store: Store, array_id: str) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """(tensors, metadata) saved under `array_id`, or None when they are not (or no longer, or not intact) cached."""
    entry = store.array_entry(array_id)
    if entry is None:
        return None
    path = store.cache_dir / entry["relpath"]
    if not path.is_file():
        store.forget_array(array_id)
        return None
    if path.stat().st_size != entry["n_bytes"] or not _intact(store, array_id, path, entry):
        logger.warning("Cached array %s (%s) does not match the checksum recorded when it was written; it will be "
                       "recomputed.", path, entry["kind"])
        store.forget_array(array_id)
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError):  # unreadable although intact on disk: recompute rather than fail
        store.forget_array(array_id)
        return None


def _intact(store: Store, array_id: str, path: Path, entry: dict) -> bool:
    if entry["xxh3"] is not None:
        return xxh3_file(path) == entry["xxh3"]
    if sha256_file(path) != entry["sha256"]:  # written before checksums were kept: check once, then remember
        return False
    store.set_array_checksum(array_id, xxh3_file(path))
    return True
