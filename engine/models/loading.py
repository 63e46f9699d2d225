"""Resolve a model reference, convert GGUF once to safetensors, and load it for analysis.

A reference is a registry name (`smollm2-135m`), a local Hugging Face directory, a `.gguf` file, or
a hub id (where the hub is reachable). GGUF files are dequantised to float32 by transformers
(20-60 s) and saved once as a safetensors directory under `cache/models/`, with a sidecar
`rankscope_model.json` recording the source and the content fingerprint; later loads take seconds.
The fingerprint (a hash of weights, config and tokenizer files) keys every cached result.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from engine import __version__
from engine.errors import ModelNotFoundError
from engine.hashing import sha256_file, sha256_json
from engine.models.adapters import ArchitectureAdapter, LinearRef, adapter_for_model_type
from engine.models.registry import REGISTRY
from engine.paths import cache_subdir
from engine.progress import ProgressCallback, ProgressTracker
from engine.store.duckdb_store import Store

if TYPE_CHECKING:
    import torch

SIDECAR = "rankscope_model.json"
_FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    """A causal LM ready for analysis (float32, eval mode) with its identity and adapter."""

    model_id: str
    fingerprint: str
    path: Path
    model: "torch.nn.Module"
    tokenizer: object
    adapter: ArchitectureAdapter

    @property
    def config(self):
        return self.model.config

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def linears(self) -> Iterator[LinearRef]:
        return self.adapter.linears(self.model)


@dataclass(frozen=True)
class ModelLocation:
    """Where a resolved model's safetensors directory is and what identifies its content."""

    model_id: str
    path: Path
    fingerprint: str


def _looks_like_path(reference: str) -> bool:
    # Hub ids look like "org/name"; paths either exist or start like one.
    return reference.endswith(".gguf") or reference.startswith((".", "/", "~"))


def locate_model(reference: str, store: Store, progress: Optional[ProgressCallback] = None) -> ModelLocation:
    """Resolve `reference` to a local safetensors directory, converting a GGUF source once.

    Raises `ModelNotFoundError` with the accepted forms when nothing matches.
    """
    if reference in REGISTRY:
        gguf = REGISTRY[reference].locate_gguf()
        return ModelLocation(reference, *_converted_gguf(gguf, cache_subdir("models") / reference, progress))
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        target = cache_subdir("models") / f"gguf-{path.stem}-{sha256_json([str(path.resolve())])[:10]}"
        return ModelLocation(reference, *_converted_gguf(path, target, progress))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but has no config.json, so it is not a Hugging Face model directory."
            )
        return ModelLocation(reference, path.resolve(), _directory_fingerprint(path.resolve(), store))
    if path.exists() or _looks_like_path(reference):
        raise ModelNotFoundError(_not_found_message(reference))
    return _hub_model(reference, store)


def load_model(
    reference: str, store: Store, progress: Optional[ProgressCallback] = None
) -> LoadedModel:
    """Load a model by registry name, directory, GGUF file or hub id, in float32 eval mode.

    Example: `load_model("smollm2-135m", open_store()).num_layers == 30`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location = locate_model(reference, store, progress)
    config = AutoConfig.from_pretrained(location.path)
    adapter = adapter_for_model_type(getattr(config, "model_type", "unknown"))  # fail before loading weights
    model = AutoModelForCausalLM.from_pretrained(location.path, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(location.path)
    loaded = LoadedModel(location.model_id, location.fingerprint, location.path, model, tokenizer, adapter)
    store.record_model(
        location.fingerprint, location.model_id, loaded.model_type, str(location.path), loaded.num_layers,
        config.to_dict(),
    )
    return loaded


def is_prepared(reference: str) -> bool:
    """Whether a registry model has already been converted (no work needed to load it)."""
    return reference in REGISTRY and _read_sidecar(cache_subdir("models") / reference) is not None


def _converted_gguf(gguf: Path, target: Path, progress: Optional[ProgressCallback]) -> tuple[Path, str]:
    stat = gguf.stat()
    sidecar = _read_sidecar(target)
    if sidecar and sidecar.get("source_size") == stat.st_size and sidecar.get("source") == str(gguf.resolve()):
        return target, sidecar["fingerprint"]
    tracker = ProgressTracker(progress, f"converting {gguf.name}", total=3, unit="steps")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tracker.advance()
    adapter_for_model_type(model.config.model_type)  # refuse unsupported architectures before writing
    if getattr(model, "hf_quantizer", None) is not None:
        # The GGUF quantizer stays attached after dequantising; saving with it raises.
        model.hf_quantizer.remove_quantization_config(model)
    partial = target.with_name(target.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    tracker.advance()
    fingerprint = _hash_model_files(partial)
    (partial / SIDECAR).write_text(
        json.dumps(
            {
                "source": str(gguf.resolve()),
                "source_size": stat.st_size,
                "fingerprint": fingerprint,
                "engine_version": __version__,
                "converted_at": datetime.now(timezone.utc).isoformat(),
                "conversion_seconds": round(time.perf_counter() - start, 1),
            },
            indent=2,
        )
    )
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    tracker.advance()
    return target, fingerprint


def _read_sidecar(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / SIDECAR).read_text())
    except (OSError, ValueError):
        return None


def _hash_model_files(directory: Path, store: Optional[Store] = None) -> str:
    """Fingerprint of a model directory: hashes of its weight, config and tokenizer files."""
    entries = []
    for path in sorted(directory.iterdir()):
        if path.suffix in (".safetensors", ".bin") or path.name in _FINGERPRINT_FILES:
            entries.append([path.name, _file_hash(path, store)])
    if not any(name.endswith((".safetensors", ".bin")) for name, _ in entries):
        raise ModelNotFoundError(f"{directory} has no weight files (*.safetensors or *.bin).")
    return sha256_json(entries)


def _file_hash(path: Path, store: Optional[Store]) -> str:
    if store is None:
        return sha256_file(path)
    stat = path.stat()
    known = store.cached_file_hash(path, stat.st_size, stat.st_mtime_ns)
    if known is None:
        known = sha256_file(path)
        store.remember_file_hash(path, stat.st_size, stat.st_mtime_ns, known)
    return known


def _directory_fingerprint(directory: Path, store: Store) -> str:
    sidecar = _read_sidecar(directory)
    if sidecar and "fingerprint" in sidecar:
        return sidecar["fingerprint"]
    return _hash_model_files(directory, store)


def _hub_model(reference: str, store: Store) -> ModelLocation:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(reference, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]))
    except Exception as exc:  # the hub client raises many types for offline, 404, auth
        raise ModelNotFoundError(
            f"{_not_found_message(reference)} Looking it up on the Hugging Face hub failed: {exc}"
        ) from exc
    return ModelLocation(reference, path, _directory_fingerprint(path, store))


def _not_found_message(reference: str) -> str:
    return (
        f"No model found for '{reference}'. Give a registry name ({', '.join(REGISTRY)}), a Hugging Face "
        "model directory (containing config.json), a .gguf file, or a hub id such as "
        "'HuggingFaceTB/SmolLM2-135M' (hub ids need network access)."
    )
