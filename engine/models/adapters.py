"""Architecture adapters: where the seven canonical linears and four input sites live in a model.

Canonical linear types are `q, k, v, o` (attention) and `gate, up, down` (MLP). Each decoder layer
has four *input sites*, the activations that feed those linears: `attn_in` (shared by q, k, v),
`o_in`, `mlp_in` (shared by gate, up) and `down_in`. Statistics are gathered per site, not per
linear, because linears that share a site see the same input.

Supported model types share the Llama module names (Llama, Mistral, Qwen2/Qwen3, Gemma3); anything
else raises `UnsupportedArchitectureError` naming the type and the supported list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from engine.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from torch import nn

LINEAR_TYPES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
SITES: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")
SITE_OF_TYPE: dict[str, str] = {
    "q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in",
    "gate": "mlp_in", "up": "mlp_in", "down": "down_in",
}


@dataclass(frozen=True)
class LinearRef:
    """One decoder linear: its layer, canonical type, dotted module path and the module itself."""

    layer: int
    linear_type: str
    path: str
    module: nn.Linear

    @property
    def site(self) -> str:
        return SITE_OF_TYPE[self.linear_type]

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the weight."""
        return tuple(self.module.weight.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module naming of one family of decoder-only models."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str
    linear_paths: dict[str, str]  # canonical type -> path relative to a decoder layer

    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_path}.{layer}"

    def linear_path(self, layer: int, linear_type: str) -> str:
        return f"{self.layer_prefix(layer)}.{self.linear_paths[linear_type]}"

    def num_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.layers_path))

    def linears(self, model: nn.Module) -> Iterator[LinearRef]:
        """Every decoder linear, layer by layer, in canonical type order."""
        for layer in range(self.num_layers(model)):
            for linear_type in LINEAR_TYPES:
                path = self.linear_path(layer, linear_type)
                yield LinearRef(layer, linear_type, path, model.get_submodule(path))

    def site_module(self, model: nn.Module, layer: int, site: str) -> nn.Linear:
        """A linear whose input is `site` (the first of the types that share it)."""
        linear_type = next(t for t in LINEAR_TYPES if SITE_OF_TYPE[t] == site)
        return model.get_submodule(self.linear_path(layer, linear_type))


_LLAMA_NAMES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter("llama", ("llama",), "model.layers", _LLAMA_NAMES),
    ArchitectureAdapter("mistral", ("mistral",), "model.layers", _LLAMA_NAMES),
    ArchitectureAdapter("qwen2", ("qwen2",), "model.layers", _LLAMA_NAMES),
    ArchitectureAdapter("qwen3", ("qwen3",), "model.layers", _LLAMA_NAMES),
    ArchitectureAdapter("gemma3", ("gemma3_text", "gemma3"), "model.layers", _LLAMA_NAMES),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)

# model types whose decoder forward chains `hidden_states = decoder_layer(hidden_states, ...)` over the layers, so a
# forward can replay stored inputs of a layer in place of running the layers below it, bit for bit (proven per family
# by tests/test_sweep.py and tests/test_calibration_by_layer.py)
CHAINED_LAYER_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def adapter_for_model_type(model_type: str) -> ArchitectureAdapter:
    """The adapter for a config's `model_type`, or a clear error listing what is supported."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"Model type '{model_type}' is not supported. RankScope supports: {', '.join(SUPPORTED_MODEL_TYPES)} "
        "(decoder-only models with Llama-style q/k/v/o and gate/up/down projections)."
    )
