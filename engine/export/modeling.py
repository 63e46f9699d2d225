"""The `modeling_rankscope.py` file written into every low-rank export, for `trust_remote_code` loading.

`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` follows config.json's `auto_map`
to the class generated here: a subclass of the model's own transformers class (LlamaForCausalLM,
Qwen2ForCausalLM, Gemma3ForCausalLM, ...) that swaps in low-rank linears from config.json's
`rankscope_compression` section in `__init__`, i.e. before transformers loads the weights, so the
factors in model.safetensors land in the right modules. The smaller dense linears of channel-pruned
MLPs (the section's `pruned`, schema v2) are swapped in there too, as `nn.Linear`s of the recorded
sizes, so their weights load without a size mismatch. The file is self-contained (torch and
transformers only, no RankScope import) so the export loads on a machine without RankScope.

A shared `A` (joint-svd: q‖k, gate‖up) is stored once, under its owner's name. The subclass registers
each alias with transformers' tied-weights mapping, the mechanism that handles tied embeddings:
without it transformers v5 treats the alias as a missing key, materialises it and re-initialises it
at random after loading. The export's self-check compares logits to catch any regression of this.

The class's `from_pretrained` checks the export before transformers reads it, as `load_compressed`
does: loaded from a local directory, every file listed in `rankscope_manifest.json` must be present
with its recorded size and sha256 (an export without a manifest is read as before), and every tensor
of a compressed or pruned linear in model.safetensors (its header, read without loading data) must
have the shape the compression section gives that linear, so a config that disagrees with the weights
is refused naming the linear (transformers' own size-mismatch error names nothing); after loading, a
parameter holding NaN or an infinity is refused by name. All raise `ValueError`.
"""

from __future__ import annotations

from string import Template

from engine import __version__
from engine.export.format import MANIFEST_FILE, MANIFEST_SCHEMA

MODELING_FILE = "modeling_rankscope.py"


def remote_class_name(base_class: str) -> str:
    """Name of the generated subclass, e.g. `RankScopeLlamaForCausalLM`."""
    return f"RankScope{base_class}"


def auto_map(base_class: str) -> dict[str, str]:
    """The config.json `auto_map` entry that points AutoModelForCausalLM at the generated class."""
    return {"AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.{remote_class_name(base_class)}"}


def modeling_source(base_class: str, supported_schemas: tuple[str, ...]) -> str:
    """Source of `modeling_rankscope.py` for a model whose transformers class is `base_class`."""
    if not base_class.isidentifier():
        raise ValueError(f"not a class name: {base_class!r}")
    return _TEMPLATE.substitute(
        base_class=base_class,
        remote_class=remote_class_name(base_class),
        engine_version=__version__,
        supported_schemas=repr(tuple(supported_schemas)),
        manifest_file=repr(MANIFEST_FILE),
        manifest_schema=repr(MANIFEST_SCHEMA),
    )


_TEMPLATE = Template('''"""A low-rank $base_class exported by RankScope $engine_version.

Load with `AutoModelForCausalLM.from_pretrained(this_directory, trust_remote_code=True)`.
config.json's `rankscope_compression` section lists each compressed linear (rank, shape, bias) and
the linears that share one `A` factor; they are swapped in before the weights load, so the factors
in model.safetensors (`<module>.A` [r, d_in], `<module>.B` [d_out, r]) load into them. A shared `A`
is stored once and tied to its aliases the way tied embeddings are. Its `pruned` entries (if any) are
the gate/up/down linears of MLPs pruned by channels: plain linears smaller than the config's
intermediate size, built at their recorded in/out features before the weights load.

Before loading from a local directory, every file listed in rankscope_manifest.json is checked
against its recorded size and sha256, and the shapes in model.safetensors against the compression
section; after loading, a weight holding NaN or an infinity is refused.
"""

import hashlib
import json
import os
import struct

import torch
import torch.nn.functional as F
from torch import nn
from transformers import $base_class

SUPPORTED_SCHEMAS = $supported_schemas
MANIFEST_FILE = $manifest_file
MANIFEST_SCHEMA = $manifest_schema


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(directory):
    """Refuse a file listed in rankscope_manifest.json that is missing, truncated or changed (ValueError)."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return  # written before manifests existed
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"Could not read {path}: {exc}. The export is damaged; export it again.") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA or not isinstance(files, dict):
        raise ValueError(f"{path} is not a {MANIFEST_SCHEMA} manifest.")
    for name, entry in files.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..") or \
                not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            raise ValueError(f"{path} is malformed at {name!r}: it must map plain file names to their size and sha256.")
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ValueError(f"{name}, listed in {MANIFEST_FILE}, is missing from {directory}; the export is "
                             "incomplete. Export it again, or copy the whole directory.")
        size = os.path.getsize(file)
        if size != entry.get("size"):
            raise ValueError(f"{name} is {size:,} bytes, but {MANIFEST_FILE} records {entry.get('size'):,}: the file "
                             f"is truncated or was changed after the export ({directory}). Export it again.")
        if _sha256(file) != entry.get("sha256"):
            raise ValueError(f"{name} does not match its sha256 in {MANIFEST_FILE}: the file was changed after the "
                             f"export ({directory}). Export it again.")


def _stored_shapes(path):
    """Tensor name -> shape from a safetensors header (8-byte length, then JSON); None if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None  # transformers reports an unreadable file itself


def check_shapes(directory):
    """Refuse a compressed or pruned linear whose tensors in model.safetensors have other shapes than
    config.json's rankscope_compression section gives it (ValueError naming the linear)."""
    try:
        with open(os.path.join(directory, "config.json")) as handle:
            section = json.load(handle).get("rankscope_compression")
    except (OSError, ValueError, AttributeError):
        return  # transformers reports a missing or unreadable config itself
    stored = _stored_shapes(os.path.join(directory, "model.safetensors"))
    if not isinstance(section, dict) or stored is None:
        return
    try:
        expected = _expected_shapes(section)
    except (AttributeError, KeyError, TypeError):
        return  # a malformed section: the model's __init__ refuses it
    for name, (shape, said) in expected.items():
        if name in stored and stored[name] != shape:
            raise ValueError(f"Tensor '{name}' in model.safetensors has shape {list(stored[name])}, but config.json's "
                             f"rankscope_compression gives {said}, i.e. shape {list(shape)}. The file was changed or "
                             f"belongs to another export ({directory}).")


def _expected_shapes(section):
    """Tensor name -> (shape, what the section says of its linear) for every compressed and pruned linear."""
    expected = {}
    for path, spec in (section.get("modules") or {}).items():
        said = f"the compressed linear '{path}' rank {spec['rank']}, in_features {spec['in_features']}, " \
               f"out_features {spec['out_features']}"
        expected[f"{path}.A"] = ((spec["rank"], spec["in_features"]), said)
        expected[f"{path}.B"] = ((spec["out_features"], spec["rank"]), said)
        if spec["bias"]:
            expected[f"{path}.bias"] = ((spec["out_features"],), said)
    for path, spec in (section.get("pruned") or {}).items():
        said = f"the pruned linear '{path}' in_features {spec['in_features']}, out_features {spec['out_features']}"
        expected[f"{path}.weight"] = ((spec["out_features"], spec["in_features"]), said)
        if spec["bias"]:
            expected[f"{path}.bias"] = ((spec["out_features"],), said)
    return expected


def refuse_non_finite(model, where):
    """Refuse a model whose weights hold NaN or an infinity, naming the tensor (ValueError)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"Tensor '{name}' in {where} holds NaN or infinite values; a model with such weights "
                             "gives no usable output. Export it again.")


class LowRankLinear(nn.Module):
    """`y = B (A x) + bias` with `A: [r, d_in]`, `B: [d_out, r]`; a drop-in for `nn.Linear`."""

    def __init__(self, in_features, out_features, rank, bias):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        # x: [..., d_in] -> [..., r] -> [..., d_out]
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def _set_submodule(model, path, module):
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


class $remote_class($base_class):
    """$base_class with the low-rank linears named in `config.rankscope_compression`."""

    def __init__(self, config):
        super().__init__(config)
        section = getattr(config, "rankscope_compression", None)
        if not isinstance(section, dict):
            raise ValueError("config.json has no rankscope_compression section; this is not a RankScope export.")
        if section.get("schema") not in SUPPORTED_SCHEMAS:
            raise ValueError(f"Unknown compression schema {section.get('schema')!r} in config.json; "
                             f"this modeling file reads {', '.join(SUPPORTED_SCHEMAS)}.")
        for path, spec in section["modules"].items():
            _set_submodule(self, path, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"]))
        for path, spec in (section.get("pruned") or {}).items():  # channel-pruned MLPs: smaller dense linears
            _set_submodule(self, path, nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"]))
        for alias, owner in section["shared_A"].items():
            self.get_submodule(alias).A = self.get_submodule(owner).A
        # Tie each alias to its owner after loading (as for tied embeddings), instead of initialising it as missing,
        # and let save_pretrained write it once.
        self._rankscope_shared_A = {f"{alias}.A": f"{owner}.A" for alias, owner in section["shared_A"].items()}
        self.all_tied_weights_keys.update(self._rankscope_shared_A)
        self._tied_weights_keys = {**(type(self)._tied_weights_keys or {}), **self._rankscope_shared_A}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        directory = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(directory):  # only a local directory: a hub id is resolved by transformers below
            verify_manifest(directory)
            check_shapes(directory)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        refuse_non_finite(loaded[0] if isinstance(loaded, tuple) else loaded, pretrained_model_name_or_path)
        return loaded

    def get_expanded_tied_weights_keys(self, all_submodels=False):
        # transformers returns no tied keys at all when the embeddings are untied; the shared A stays tied.
        keys = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        keys.update(getattr(self, "_rankscope_shared_A", {}))
        return keys
''')
