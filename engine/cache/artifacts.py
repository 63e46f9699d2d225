"""`get_or_compute`: the one way a cached artifact is found, loaded, or computed and stored.

An artifact has a kind (its folder under `arrays/`) and a key, and is stored as a record (a row of
`engine.records`), an array file (`engine.store.arrays`), or both. A lookup that finds the record
but not a readable array file forgets the record and computes again, so a half-deleted or damaged
cache costs only time. A computed artifact's arrays are written before its record, and both before
the value is returned, so whatever a front end shows was persisted first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Optional, TypeVar

import torch

from engine.store.arrays import intact_array_path, load_arrays_with_metadata, save_arrays
from engine.store.duckdb_store import Store

R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True)
class Computed(Generic[R, T]):
    """What a compute step returns: the value, and what to store of it (record and/or arrays)."""

    value: T
    record: Optional[R] = None
    tensors: Optional[dict[str, torch.Tensor]] = None
    metadata: Optional[dict[str, str]] = None


@dataclass(frozen=True)
class Cached(Generic[R, T]):
    value: T
    record: Optional[R]
    from_cache: bool


def get_or_compute(
    store: Store,
    kind: str,
    key: str,
    compute: Callable[[], Computed[R, T]],
    load: Callable[[Optional[R], Optional[dict[str, torch.Tensor]], dict[str, str]], T],
    record_type: Optional[type[R]] = None,
    arrays: bool = True,
    load_from_file: Optional[Callable[[Optional[R], Path], Optional[T]]] = None,
) -> Cached[R, T]:
    """The artifact `kind`/`key` from the store, or computed, stored and returned.

    `record_type` names the record kept for it (None: the artifact is an array file alone);
    `arrays` says whether it has an array file (False: the record is the whole artifact).
    `load(record, tensors, metadata)` rebuilds the value from what is stored. `load_from_file(record, path)`, when
    given, is asked first with the intact array file's path, for a value that reads the file as it needs it (a large
    artifact need not be in memory at once); it returns None to have the tensors read and `load` called.
    """
    record = store.get_record(record_type, key) if record_type is not None else None
    if record is not None and not arrays:
        return Cached(load(record, None, {}), record, True)
    if arrays and (record is not None or record_type is None):
        array_id = getattr(record, "array_id", key)
        path = intact_array_path(store, array_id) if load_from_file is not None else None
        value = load_from_file(record, path) if path is not None else None
        if value is not None:
            return Cached(value, record, True)
        stored = load_arrays_with_metadata(store, array_id)
        if stored is not None:
            return Cached(load(record, *stored), record, True)
        if record is not None:
            store.forget_record(record_type, key)  # its array file is gone or damaged: compute again
    computed = compute()
    if arrays and computed.tensors is not None:
        save_arrays(store, key, kind, computed.tensors, computed.metadata)
    if computed.record is not None:
        store.put_record(computed.record)
    return Cached(computed.value, computed.record, False)
