"""Architecture adapters: the seven canonical linears and four input sites on each tiny family."""

from __future__ import annotations

import pytest
from torch import nn

from engine.errors import UnsupportedArchitectureError
from engine.models.adapters import (
    LINEAR_TYPES,
    SITE_OF_TYPE,
    SITES,
    SUPPORTED_MODEL_TYPES,
    adapter_for_model_type,
)
from engine.models.loading import load_model
from tests.tiny_models import FAMILIES

HIDDEN, INTERMEDIATE, N_LAYERS = 32, 48, 2
KV_DIM = 16  # 2 key-value heads x head_dim 8
EXPECTED_SHAPES = {
    "q": (HIDDEN, HIDDEN), "k": (KV_DIM, HIDDEN), "v": (KV_DIM, HIDDEN), "o": (HIDDEN, HIDDEN),
    "gate": (INTERMEDIATE, HIDDEN), "up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE),
}
EXPECTED_MODULE_SUFFIX = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_yields_every_canonical_linear_with_its_shape(family, tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs[family]), store)
    refs = list(loaded.linears())

    assert loaded.num_layers == N_LAYERS
    assert len(refs) == N_LAYERS * len(LINEAR_TYPES)
    assert [(r.layer, r.linear_type) for r in refs] == [(l, t) for l in range(N_LAYERS) for t in LINEAR_TYPES]
    for ref in refs:
        assert isinstance(ref.module, nn.Linear)
        assert ref.shape == EXPECTED_SHAPES[ref.linear_type], (family, ref.path)
        assert ref.path == f"model.layers.{ref.layer}.{EXPECTED_MODULE_SUFFIX[ref.linear_type]}"
        assert loaded.model.get_submodule(ref.path) is ref.module
        assert ref.site == SITE_OF_TYPE[ref.linear_type]
    # every linear is a distinct module (no two canonical types resolve to the same one)
    assert len({id(r.module) for r in refs}) == len(refs)


@pytest.mark.parametrize("family", FAMILIES)
def test_site_module_finds_four_sites_per_layer(family, tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs[family]), store)
    adapter, model = loaded.adapter, loaded.model
    expected_in = {"attn_in": HIDDEN, "o_in": HIDDEN, "mlp_in": HIDDEN, "down_in": INTERMEDIATE}
    expected_module = {"attn_in": "q", "o_in": "o", "mlp_in": "gate", "down_in": "down"}

    for layer in range(N_LAYERS):
        modules = {site: adapter.site_module(model, layer, site) for site in SITES}
        assert len({id(m) for m in modules.values()}) == 4
        for site, module in modules.items():
            assert module.in_features == expected_in[site]
            assert module is model.get_submodule(adapter.linear_path(layer, expected_module[site]))
    # linears sharing a site share an input width
    for site in SITES:
        widths = {EXPECTED_SHAPES[t][1] for t in LINEAR_TYPES if SITE_OF_TYPE[t] == site}
        assert widths == {expected_in[site]}


def test_model_types_map_to_their_family():
    assert adapter_for_model_type("llama").family == "llama"
    assert adapter_for_model_type("qwen2").family == "qwen2"
    assert adapter_for_model_type("gemma3_text").family == "gemma3"
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"} <= set(SUPPORTED_MODEL_TYPES)


def test_unsupported_model_type_names_it_and_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for_model_type("gpt2")
    message = str(info.value)
    assert "'gpt2'" in message
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in message


def test_loading_unsupported_gpt2_directory_fails_clearly(tiny_model_dirs, store):
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(str(tiny_model_dirs["gpt2"]), store)
    message = str(info.value)
    assert "gpt2" in message
    assert "llama" in message and "qwen2" in message and "gemma3" in message
    assert store.models() == []  # nothing recorded for a model that could not be loaded
