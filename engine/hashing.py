"""Content hashes used as cache keys (of files, texts and JSON-able settings), and a fast file checksum."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _file_digest(path: Path, digest, block_size: int) -> str:
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    return _file_digest(path, hashlib.sha256(), 1 << 20)


def xxh3_file(path: Path) -> str:
    """Hex xxh3-64 of a file's bytes: a checksum fast enough to verify a large cached array on every read."""
    import xxhash

    return _file_digest(path, xxhash.xxh3_64(), 1 << 22)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(value: Any) -> str:
    """Hash of a JSON-able value with sorted keys, so equal settings give equal keys."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
