"""Model resolution, content fingerprints and parameter accounting on tiny models."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from engine.errors import ModelNotFoundError
from engine.models.adapters import LINEAR_TYPES
from engine.models.loading import load_model, locate_model
from engine.models.summary import parameter_summary
from tests.tiny_models import VOCAB_SIZE

HIDDEN = 32


@pytest.mark.parametrize("reference", ["/nonexistent/x", "./nope", "missing.gguf"])
def test_missing_model_lists_accepted_forms(reference, store):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(reference, store)
    message = str(info.value)
    assert f"'{reference}'" in message
    for form in ("registry name", "smollm2-135m", "config.json", ".gguf", "hub id"):
        assert form in message


def test_directory_without_config_is_rejected(tmp_path, store):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as info:
        locate_model(str(tmp_path), store)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "no config.json" in message


def test_directory_without_weights_is_rejected(tmp_path, tiny_model_dirs, store):
    shutil.copy(tiny_model_dirs["llama"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError, match="no weight files"):
        locate_model(str(tmp_path), store)


def test_fingerprint_is_stable_and_follows_weights(tmp_path, tiny_model_dirs, store):
    directory = tmp_path / "llama"
    shutil.copytree(tiny_model_dirs["llama"], directory)
    first = load_model(str(directory), store).fingerprint
    again = load_model(str(directory), store).fingerprint
    assert len(first) == 64 and first == again
    assert [m["fingerprint"] for m in store.models()] == [first]

    weights = load_file(str(directory / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][0, 0] += 1.0
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    changed = load_model(str(directory), store)
    assert changed.fingerprint != first
    assert changed.model.get_submodule("model.layers.0.self_attn.q_proj").weight[0, 0].item() == pytest.approx(
        weights[name][0, 0].item()
    )


def test_fingerprint_does_not_depend_on_location(tmp_path, tiny_model_dirs, store):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dirs["qwen2"], copy)
    assert load_model(str(copy), store).fingerprint == load_model(str(tiny_model_dirs["qwen2"]), store).fingerprint
    assert load_model(str(copy), store).fingerprint != load_model(str(tiny_model_dirs["llama"]), store).fingerprint


@pytest.mark.parametrize("family, tied", [("llama", True), ("qwen2", False), ("gemma3", True)])
def test_parameter_summary_counts(family, tied, tiny_model_dirs, store):
    loaded = load_model(str(tiny_model_dirs[family]), store)
    summary = parameter_summary(loaded)
    model = loaded.model

    manual = {t: 0 for t in LINEAR_TYPES}
    for ref in loaded.linears():
        manual[ref.linear_type] += ref.module.weight.numel() + (ref.module.bias.numel() if ref.module.bias is not None else 0)
    assert summary.by_type == manual
    assert summary.by_type["q"] >= 2 * HIDDEN * HIDDEN  # 2 layers of a 32x32 weight at least
    assert summary.decoder_linear == sum(manual.values())

    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=True)}
    assert summary.total == sum(unique.values())
    assert summary.tied_embeddings is tied
    assert summary.embedding == (1 if tied else 2) * VOCAB_SIZE * HIDDEN
    assert summary.total == summary.decoder_linear + summary.embedding + summary.other
    assert summary.other > 0  # the norms
    assert 0 < summary.embedding_share < 1
    assert summary.embedding_share == pytest.approx(summary.embedding / summary.total)
    rows = summary.rows()
    assert [r["group"] for r in rows] == [*LINEAR_TYPES, "embedding", "other"]
    assert sum(r["parameters"] for r in rows) == summary.total
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


def test_parameter_summary_of_tiny_llama_by_hand(tiny_model_dirs, store):
    summary = parameter_summary(load_model(str(tiny_model_dirs["llama"]), store))
    layers, inter, kv = 2, 48, 16
    assert summary.by_type == {
        "q": layers * HIDDEN * HIDDEN, "k": layers * kv * HIDDEN, "v": layers * kv * HIDDEN,
        "o": layers * HIDDEN * HIDDEN, "gate": layers * inter * HIDDEN, "up": layers * inter * HIDDEN,
        "down": layers * HIDDEN * inter,
    }
    assert summary.embedding == VOCAB_SIZE * HIDDEN  # tied: the LM head shares it and is not counted again
    assert summary.other == (2 * layers + 1) * HIDDEN  # two RMSNorms per layer and the final norm
    assert summary.total == 10_240 + 2 * (2 * 1024 + 2 * 512 + 3 * 1536) + 160
    assert (summary.num_layers, summary.hidden_size, summary.intermediate_size) == (2, HIDDEN, inter)
    assert (summary.num_attention_heads, summary.num_key_value_heads, summary.vocab_size) == (4, 2, VOCAB_SIZE)
