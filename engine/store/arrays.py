"""Large arrays (covariances, factors) as safetensors files next to the database, indexed in DuckDB.

`save_arrays` writes a file under `arrays/<kind>/` beside the store's database (`Store.cache_dir`)
and records it, with its size, sha256 and a fast xxh3 checksum, only after the file is complete.
`load_arrays` checks every read against the recorded checksum and returns None (a cache miss, and
the index entry is dropped) when the entry or the file is missing, or the file was truncated or
changed in place, so a damaged cache costs only time and never a wrong number. A file recorded
before checksums were kept is verified once against its sha256 and then given its checksum.

`PartWriter` writes one such file a part at a time, for arrays too large to hold at once (a large model's
calibration, written layer by layer): safetensors' own writer takes every tensor in one call, so the file's
header (names, dtypes, shapes, byte offsets, in the safetensors format) is written by hand once all parts have
been appended to a body file, which is then copied behind it in chunks. The result is an ordinary safetensors
file, read like any other.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
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


# torch dtype -> safetensors dtype name (the format's own names)
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class PartWriter:
    """Writes `arrays/<kind>/<array_id>.safetensors` a part (a dict of tensors) at a time and indexes it on `finish`.

    Memory holds one part; the disk holds the parts (a body file) until `finish` writes the header and copies the
    body behind it. Nothing is indexed, and no file is left behind, unless `finish` completes (`discard` or leaving
    the `with` block by an exception removes the body). Tensor names must be unique across parts."""

    def __init__(self, store: Store, array_id: str, kind: str, metadata: Optional[dict[str, str]] = None):
        if sys.byteorder != "little":
            raise OSError("safetensors files are little-endian; writing them part by part needs a little-endian machine")
        self.store, self.array_id, self.kind, self.metadata = store, array_id, kind, metadata
        self.relpath = Path("arrays") / kind / f"{array_id}.safetensors"
        self.path = store.cache_dir / self.relpath
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._body_path = self.path.with_suffix(".body")
        self._body = open(self._body_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name in self._header:
                raise ValueError(f"Tensor {name!r} was already written to {self.path.name}")
            data = tensor.detach().to("cpu").contiguous()
            raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""  # its bytes, no copy
            self._body.write(raw)
            size = data.numel() * data.element_size()
            self._header[name] = {"dtype": _SAFETENSORS_DTYPES[data.dtype], "shape": list(data.shape),
                                  "data_offsets": [self._offset, self._offset + size]}
            self._offset += size

    def finish(self) -> Path:
        """Write the file (atomically, as `save_arrays` does) and index it. Returns its path."""
        self._body.close()
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = dict(self.metadata)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header with spaces to 8-byte alignment
        partial = self.path.with_suffix(".partial")
        with open(partial, "wb") as out, open(self._body_path, "rb") as body:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(body, out, 16 * 2**20)
        self._body_path.unlink()
        os.replace(partial, self.path)
        self.store.record_array(self.array_id, self.kind, str(self.relpath), self.path.stat().st_size,
                                sha256_file(self.path), xxh3_file(self.path))
        return self.path

    def discard(self) -> None:
        self._body.close()
        self._body_path.unlink(missing_ok=True)

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is not None:
            self.discard()


def load_arrays(store: Store, array_id: str) -> Optional[dict[str, torch.Tensor]]:
    """The tensors saved under `array_id`, or None when they are not (or no longer, or not intact) cached."""
    loaded = load_arrays_with_metadata(store, array_id)
    return None if loaded is None else loaded[0]


def intact_array_path(store: Store, array_id: str) -> Optional[Path]:
    """The file saved under `array_id` when it is there and matches its recorded size and checksum, else None (and
    the entry is forgotten, so it is computed again)."""
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
    return path


def load_arrays_with_metadata(store: Store, array_id: str) -> Optional[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """(tensors, metadata) saved under `array_id`, or None when they are not (or no longer, or not intact) cached."""
    path = intact_array_path(store, array_id)
    if path is None:
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
