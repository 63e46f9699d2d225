"""The RankScope export format: what an exported directory holds, and `load_compressed` to read it back.

An export is a Hugging Face style directory (DESIGN.md §12). `config.json` is the model's own config
plus a `rankscope_compression` section (`CompressionConfig`) that says everything needed to rebuild
the model: the transformers class, and for each compressed linear its rank, shape and whether it has
a bias, plus which linears share one `A` factor (joint methods). Schema `rankscope.compression/v1`
says that much; `rankscope.compression/v2` adds `pruned`, the smaller dense linears of MLPs pruned by
channels (LoRAP): for each, its in/out features and bias, which give each pruned layer its own
intermediate width. A section is v2 exactly when it has pruned linears, so an export that prunes
nothing stays v1 and still loads in a RankScope that reads only v1.
`model.safetensors` holds every tensor once: `<module>.A` and `<module>.B` (and `<module>.bias`) for
compressed linears, the dense weights of everything else (a pruned linear's smaller `weight`); a tied
input/output embedding and a shared `A` appear under their first name in `state_dict` order only
(`unique_state_dict`).

`rankscope_manifest.json` records the size and sha256 of every other file the export wrote
(`write_manifest`); both loaders check it before reading anything else (`verify_manifest` here, a
copy of the check in the bundled modeling file), so a changed, truncated or missing file is refused
by name. An export written before manifests existed has none and is still read.

`load_compressed` rebuilds the model from config.json with the engine's own `LowRankLinear` (and
plain `nn.Linear`s of the recorded sizes for pruned linears) and loads model.safetensors strictly: every expected tensor present, nothing extra, every shape as the
section says, every value finite. It needs no remote code; nothing in an export is a pickle.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from engine import __version__
from engine.compression.lowrank import LowRankLinear
from engine.compression.plan import RankPlan
from engine.errors import RankScopeError

COMPRESSION_SCHEMA = "rankscope.compression/v1"
COMPRESSION_SCHEMA_V2 = "rankscope.compression/v2"  # v1 plus `pruned` linears; written only when an MLP is pruned
SUPPORTED_SCHEMAS = (COMPRESSION_SCHEMA, COMPRESSION_SCHEMA_V2)
SECTION = "rankscope_compression"
STORAGES = ("low-rank", "dense")  # factors A/B, or W_r = B_r A_r as plain nn.Linear weights
CONFIG_FILE, WEIGHTS_FILE, PLAN_FILE, CARD_FILE = "config.json", "model.safetensors", "rank_plan.json", "README.md"
MANIFEST_FILE = "rankscope_manifest.json"  # file name -> size and sha256 of every other file the export wrote
MANIFEST_SCHEMA = "rankscope.manifest/v1"
_HASH_CHUNK = 1 << 20


class ExportError(RankScopeError):
    """An export that cannot be written, does not reload faithfully, or is damaged."""


@dataclass(frozen=True)
class CompressedModule:
    """One linear as stored in an export: `A: [rank, in_features]`, `B: [out_features, rank]`."""

    rank: int
    in_features: int
    out_features: int
    bias: bool

    def __post_init__(self):
        for name in ("rank", "in_features", "out_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ExportError(f"Compressed module field '{name}' must be a positive integer, got {value!r}.")
        if not isinstance(self.bias, bool):
            raise ExportError(f"Compressed module field 'bias' must be true or false, got {self.bias!r}.")

    def tensor_shapes(self, path: str) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of this module's factors in model.safetensors."""
        shapes = {f"{path}.A": (self.rank, self.in_features), f"{path}.B": (self.out_features, self.rank)}
        if self.bias:
            shapes[f"{path}.bias"] = (self.out_features,)
        return shapes


@dataclass(frozen=True)
class PrunedLinear:
    """One dense linear of a channel-pruned MLP as stored in an export: `weight: [out_features, in_features]`,
    smaller than the model config's (gate and up keep the kept rows, down the kept columns)."""

    in_features: int
    out_features: int
    bias: bool

    def __post_init__(self):
        for name in ("in_features", "out_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ExportError(f"Pruned linear field '{name}' must be a positive integer, got {value!r}.")
        if not isinstance(self.bias, bool):
            raise ExportError(f"Pruned linear field 'bias' must be true or false, got {self.bias!r}.")

    def tensor_shapes(self, path: str) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of this linear in model.safetensors."""
        shapes = {f"{path}.weight": (self.out_features, self.in_features)}
        if self.bias:
            shapes[f"{path}.bias"] = (self.out_features,)
        return shapes


@dataclass(frozen=True)
class CompressionConfig:
    """The `rankscope_compression` section of an exported config.json."""

    method: str
    storage: str
    base_class: str  # the transformers class the model is built from, e.g. "LlamaForCausalLM"
    modules: dict[str, CompressedModule]  # module path -> factors; modules not named stay dense
    shared_A: dict[str, str] = field(default_factory=dict)  # alias module path -> owner path (stored once)
    source_model: dict = field(default_factory=dict)  # {"id", "fingerprint"} of the original model
    engine_version: str = __version__
    schema: str = COMPRESSION_SCHEMA
    # v2: module path -> the smaller dense linear of a channel-pruned MLP (gate/up/down); the model config's size elsewhere
    pruned: dict[str, PrunedLinear] = field(default_factory=dict)

    def __post_init__(self):
        if self.schema not in SUPPORTED_SCHEMAS:
            raise ExportError(_unknown_schema(self.schema))
        if self.storage not in STORAGES:
            raise ExportError(f"Unknown storage '{self.storage}' in the compression section; known: {', '.join(STORAGES)}.")
        if (self.schema == COMPRESSION_SCHEMA_V2) != bool(self.pruned):
            raise ExportError(f"A '{COMPRESSION_SCHEMA_V2}' compression section lists pruned linears (a non-empty "
                              f"'pruned' object) and a '{COMPRESSION_SCHEMA}' one does not; this one is '{self.schema}' "
                              f"{'with' if self.pruned else 'without'} them.")
        if self.pruned and self.storage != "low-rank":
            raise ExportError("A dense export cannot hold pruned MLPs (a plain transformers config has one "
                              "intermediate size for every layer); pruned linears need the low-rank storage.")
        both = sorted(set(self.pruned) & set(self.modules))
        if both:
            raise ExportError(f"'{both[0]}' is listed both as a compressed (low-rank) module and as a pruned linear; "
                              "a linear is one or the other.")
        for alias, owner in self.shared_A.items():
            if alias not in self.modules or owner not in self.modules:
                raise ExportError(f"shared_A names '{alias}' -> '{owner}', but both must be listed under modules.")
            a, o = self.modules[alias], self.modules[owner]
            if (a.rank, a.in_features) != (o.rank, o.in_features):
                raise ExportError(f"'{alias}' shares A with '{owner}' but their A shapes differ: "
                                  f"[{a.rank}, {a.in_features}] vs [{o.rank}, {o.in_features}].")
            if owner in self.shared_A:
                raise ExportError(f"'{owner}' is listed as an owner of a shared A and as an alias; aliases point at owners.")

    @classmethod
    def of_model(cls, model: nn.Module, method: str, storage: str, source_model: Mapping[str, str],
                 pruned: Iterable[str] = ()) -> "CompressionConfig":
        """The section describing the `LowRankLinear` modules of a compressed in-memory model, and the linears at
        `pruned` (the gate, up and down of the MLPs the plan prunes), which are recorded with their actual sizes."""
        modules, shared, owner_of_A = {}, {}, {}
        for path, module in model.named_modules():
            if isinstance(module, LowRankLinear):
                modules[path] = CompressedModule(module.rank, module.in_features, module.out_features, module.bias is not None)
                owner = owner_of_A.setdefault(id(module.A), path)
                if owner != path:
                    shared[path] = owner
        smaller = {}
        for path in pruned:
            module = model.get_submodule(path)
            if type(module) is not nn.Linear:
                raise ExportError(f"'{path}' should be a pruned MLP's dense linear, but the model holds a "
                                  f"{type(module).__name__} there; apply the plan (which prunes it) before describing it.")
            smaller[path] = PrunedLinear(module.in_features, module.out_features, module.bias is not None)
        return cls(method, storage, type(model).__name__, modules, shared, dict(source_model),
                   schema=COMPRESSION_SCHEMA_V2 if smaller else COMPRESSION_SCHEMA, pruned=smaller)

    @property
    def ranks(self) -> dict[str, int]:
        return {path: spec.rank for path, spec in self.modules.items()}

    def pruned_mlps(self) -> dict[str, dict[str, PrunedLinear]]:
        """MLP path (the pruned linears' parent) -> its pruned linears by path."""
        mlps: dict[str, dict[str, PrunedLinear]] = {}
        for path, spec in self.pruned.items():
            mlps.setdefault(path.rpartition(".")[0], {})[path] = spec
        return mlps

    def to_dict(self) -> dict:
        data = asdict(self)
        if not self.pruned:  # a v1 section, readable by a RankScope that knows only v1
            del data["pruned"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "CompressionConfig":
        if not isinstance(data, dict):
            raise ExportError(f"The {SECTION} section of config.json must be an object, got {type(data).__name__}.")
        if data.get("schema") not in SUPPORTED_SCHEMAS:
            raise ExportError(_unknown_schema(data.get("schema")))
        known = set(cls.__dataclass_fields__) - ({"pruned"} if data["schema"] == COMPRESSION_SCHEMA else set())
        extra, missing = set(data) - known, {"method", "storage", "base_class", "modules"} - set(data)
        if extra or missing:
            raise ExportError(f"The {SECTION} section has unknown field(s) {sorted(extra)} or lacks {sorted(missing)}.")
        if not isinstance(data["modules"], dict):
            raise ExportError(f"{SECTION}.modules must map module paths to their ranks and shapes.")
        try:
            modules = {path: CompressedModule(**spec) for path, spec in data["modules"].items()}
        except TypeError as exc:
            raise ExportError(f"A module entry in {SECTION}.modules is malformed: {exc}.") from exc
        pruned = data.get("pruned") or {}
        if not isinstance(pruned, dict):
            raise ExportError(f"{SECTION}.pruned must map module paths to their in/out features and bias.")
        try:
            pruned = {path: PrunedLinear(**spec) for path, spec in pruned.items()}
        except TypeError as exc:
            raise ExportError(f"An entry in {SECTION}.pruned is malformed: {exc}.") from exc
        return cls(**{**data, "modules": modules, "shared_A": dict(data.get("shared_A") or {}), "pruned": pruned})


def _unknown_schema(schema: Any) -> str:
    return (f"Unknown compression schema {schema!r} in config.json's {SECTION} section; this RankScope "
            f"({__version__}) reads: {', '.join(SUPPORTED_SCHEMAS)}. Export it again, or use the RankScope that wrote it.")


# -- tensors -------------------------------------------------------------------------------------------------------

def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tensor of `model.state_dict()` once, under its first name, and the alias -> first-name map.

    Tied embeddings and a shared `A` are one Parameter under several names; writing them once is what
    keeps an export of a model with tied embeddings (or joint-svd factors) from growing.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = first_name.setdefault(id(tensor), name)
        if owner == name:
            tensors[name] = tensor.detach()
        else:
            aliases[name] = owner
    return tensors, aliases


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write tensors as safetensors (contiguous copies, so slices of larger factor tensors are cut out)."""
    from safetensors.torch import save_file

    save_file({name: t.detach().contiguous().clone() for name, t in tensors.items()}, str(path), metadata={"format": "pt"})


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the file header without loading the data."""
    from safetensors import safe_open

    with _reading_safetensors(path):
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; `ExportError` naming the file when it is damaged or truncated."""
    from safetensors.torch import load_file

    with _reading_safetensors(path):
        return load_file(str(path))


@contextmanager
def _reading_safetensors(path: Path):
    """Turn the safetensors library's errors (a bare `SafetensorError`, no file name) into `ExportError`."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{path} could not be read as safetensors ({exc}); the file is damaged or truncated. "
                          "Export the model again.") from exc


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """`ExportError` naming the first floating-point tensor that holds NaN or an infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ExportError(f"Tensor '{name}' in {where} holds NaN or infinite values ({bad:,} of {tensor.numel():,}); "
                              "a model with such weights gives no usable output. Export it again.")


# -- manifest ------------------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> dict[str, dict]:
    """Write `rankscope_manifest.json`: name -> {size, sha256} of every file in `directory` but itself."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    (directory / MANIFEST_FILE).write_text(json.dumps({"schema": MANIFEST_SCHEMA, "files": files}, indent=2) + "\n")
    return files


def read_manifest(directory: Path) -> Optional[dict[str, dict]]:
    """The manifest's files (name -> {size, sha256}), or None for an export written before manifests existed."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"Could not read {path}: {exc}. The export is damaged; export it again.") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise ExportError(f"{path} is not a {MANIFEST_SCHEMA} manifest; this RankScope ({__version__}) reads only that.")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")
            and isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            for name, entry in files.items()):
        raise ExportError(f"{path} is malformed: 'files' must map plain file names to their size and sha256.")
    return files


def verify_manifest(directory: Path) -> Optional[dict[str, dict]]:
    """Check every file the manifest lists: present, the recorded size, the recorded sha256.

    Returns the manifest's files, or None when the export has no manifest (written before they existed).
    Raises `ExportError` naming the first file that is missing, truncated or changed.
    """
    files = read_manifest(directory)
    for name, entry in (files or {}).items():
        path = directory / name
        if not path.is_file():
            raise ExportError(f"{name}, listed in {MANIFEST_FILE}, is missing from {directory}; the export is "
                              "incomplete. Export it again, or copy the whole directory.")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ExportError(f"{name} is {size:,} bytes, but {MANIFEST_FILE} records {entry['size']:,}: the file is "
                              f"truncated or was changed after the export ({directory}). Export it again.")
        if file_sha256(path) != entry["sha256"]:
            raise ExportError(f"{name} does not match its sha256 in {MANIFEST_FILE}: the file was changed after the "
                              f"export ({directory}). Export it again.")
    return files


def count_module_parameters(model: nn.Module) -> int:
    """Parameters of a model, each shared Parameter (tied embedding, shared A) counted once."""
    return sum(p.numel() for p in model.parameters())


# -- loading -------------------------------------------------------------------------------------------------------

def read_compression_config(directory: Path) -> CompressionConfig:
    """The compression section of `directory/config.json`, validated."""
    path = _require_file(directory, CONFIG_FILE)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"Could not read {path}: {exc}.") from exc
    if not isinstance(config, dict) or SECTION not in config:
        raise ExportError(f"{path} has no '{SECTION}' section, so {directory} is not a RankScope export.")
    return CompressionConfig.from_dict(config[SECTION])


def build_model(config, compression: CompressionConfig) -> nn.Module:
    """An uninitialised model of `compression.base_class` with the section's low-rank modules and the smaller
    dense linears of pruned MLPs swapped in."""
    import transformers
    from transformers.initialization import no_init_weights

    model_class = getattr(transformers, compression.base_class, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ExportError(f"This export needs the transformers class '{compression.base_class}', which transformers "
                          f"{transformers.__version__} does not have.")
    with no_init_weights():  # every tensor is loaded from the file right after, so skip the random init
        model = model_class(config)
        for path, spec in compression.pruned.items():  # (only low-rank storage has them)
            _swap_in(model, path, nn.Linear(spec.in_features, spec.out_features, bias=spec.bias), "pruned linear")
    model.tie_weights()  # skipping the init also skips tying: tie input/output embeddings as the config says
    if compression.storage == "low-rank":
        for path, spec in compression.modules.items():
            _swap_in(model, path, LowRankLinear(torch.empty(spec.rank, spec.in_features),
                                                torch.empty(spec.out_features, spec.rank),
                                                torch.empty(spec.out_features) if spec.bias else None), "compressed module")
        for alias, owner in compression.shared_A.items():
            model.get_submodule(alias).A = model.get_submodule(owner).A
    return model.float().eval()


def _swap_in(model: nn.Module, path: str, module: nn.Module, kind: str) -> None:
    """Replace the linear at `path`; `ExportError` naming it when the model has no linear there."""
    try:
        present = model.get_submodule(path)
    except AttributeError:
        present = None
    if not isinstance(present, nn.Linear):
        raise ExportError(f"config.json's {SECTION} names the {kind} '{path}', but a {type(model).__name__} built "
                          "from config.json has no linear there. The config was changed or belongs to another model.")
    model.set_submodule(path, module)


def load_weights_strictly(model: nn.Module, weights: Path, compression: CompressionConfig) -> None:
    """Load `weights` into `model`, refusing missing, unexpected, mis-shaped or non-finite tensors with their names."""
    expected, aliases = unique_state_dict(model)
    found = safetensors_shapes(weights)
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing or unexpected:
        raise ExportError(
            f"{weights} does not match config.json: "
            + "; ".join(part for part in (_names("missing", missing), _names("unexpected", unexpected)) if part) + "."
        )
    for name, tensor in expected.items():
        if tuple(tensor.shape) != found[name]:
            module = name.rpartition(".")[0]
            why = ""
            if compression.storage == "low-rank" and module in compression.modules:
                why = f" (config.json's {SECTION} gives '{module}' rank {compression.modules[module].rank})"
            elif module in compression.pruned:
                spec = compression.pruned[module]
                why = (f" (config.json's {SECTION} gives the pruned linear '{module}' in_features {spec.in_features}, "
                       f"out_features {spec.out_features})")
            raise ExportError(f"Tensor '{name}' in {weights.name} has shape {list(found[name])}, but config.json "
                              f"says {list(tensor.shape)}{why}. The file was changed or belongs to another export.")
    state = read_safetensors(weights)
    refuse_non_finite(state, str(weights))
    state.update({alias: state[owner] for alias, owner in aliases.items()})  # copied into the one shared Parameter
    model.load_state_dict(state, strict=True)


def _names(kind: str, names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(f"'{n}'" for n in names[:4])
    return f"{len(names)} {kind} tensor(s) ({shown}{', ...' if len(names) > 4 else ''})"


def read_plan(directory: Path, compression: CompressionConfig) -> RankPlan:
    """`rank_plan.json`, checked to be the plan of this export (same source model, same ranks)."""
    plan = RankPlan.load(_require_file(directory, PLAN_FILE))
    source = compression.source_model
    if plan.model.get("fingerprint") != source.get("fingerprint"):
        raise ExportError(
            f"{PLAN_FILE} is a plan for model '{plan.model.get('id')}' (fingerprint {str(plan.model.get('fingerprint'))[:12]}), "
            f"but this export was made from '{source.get('id')}' (fingerprint {str(source.get('fingerprint'))[:12]}). "
            "Put back the plan the export was written with."
        )
    planned = {path: rank for path, rank in plan.ranks.items() if rank is not None}
    if planned != compression.ranks:
        differing = sorted(set(planned.items()) ^ set(compression.ranks.items()))[0][0]
        raise ExportError(f"{PLAN_FILE} and config.json disagree on module '{differing}': plan rank "
                          f"{plan.ranks.get(differing)}, config rank {compression.ranks.get(differing)}.")
    _check_pruned_against_plan(plan, compression)
    return plan


def _check_pruned_against_plan(plan: RankPlan, compression: CompressionConfig) -> None:
    """The plan's pruned MLPs are the section's, and each pruned linear has the plan's kept channels on one side
    (gate and up as outputs, down as inputs)."""
    kept = {path: k for path, k in (plan.channels or {}).items() if k is not None}
    mlps = compression.pruned_mlps()
    for path in sorted(set(kept) | set(mlps)):
        linears = mlps.get(path, {})
        if path in kept and linears and all(kept[path] in (s.in_features, s.out_features) for s in linears.values()):
            continue
        held = ", ".join(f"'{p}' {s.in_features}->{s.out_features}" for p, s in linears.items()) or "no pruned linears"
        said = f"keeps {kept[path]} channels" if path in kept else "does not prune it"
        raise ExportError(f"{PLAN_FILE} and config.json disagree on MLP '{path}': the plan {said}, config.json's "
                          f"{SECTION} has {held}. Put back the plan the export was written with.")


def load_compressed(directory: Path | str) -> tuple[nn.Module, Any, RankPlan]:
    """Rebuild an exported model (low-rank or dense) with its tokenizer and rank plan; no remote code.

    Example: `model, tokenizer, plan = load_compressed("exports/smollm2-fpca20")`.
    Raises `ExportError` naming the file or tensor when the directory is incomplete or inconsistent: a file
    that differs from `rankscope_manifest.json` (changed, truncated or missing), a damaged weights file, a
    tensor holding NaN or an infinity, a missing tensor or one of another shape.
    """
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ExportError(f"No export directory at {directory}.")
    verify_manifest(directory)
    compression = read_compression_config(directory)
    weights = _require_file(directory, WEIGHTS_FILE)
    plan = read_plan(directory, compression)
    config = AutoConfig.from_pretrained(directory)  # auto_map names only the model class, so no remote code runs
    model = build_model(config, compression)
    load_weights_strictly(model, weights, compression)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ExportError(f"The tokenizer files in {directory} could not be loaded: {exc}") from exc
    return model, tokenizer, plan


def _require_file(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise ExportError(f"{directory} has no {name}; an export holds {CONFIG_FILE}, {WEIGHTS_FILE}, {PLAN_FILE}, "
                          "tokenizer files and a README.md model card.")
    return path


def describe_source(loaded) -> dict:
    """The `source_model` entry of the compression section for a `LoadedModel`."""
    return {"id": loaded.model_id, "fingerprint": loaded.fingerprint}


def original_weights_bytes(model_dir: Optional[Path]) -> Optional[int]:
    """Total size of the original model's *.safetensors files (None when it has none, e.g. a hub cache)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if model_dir else []
    return sum(f.stat().st_size for f in files) or None
