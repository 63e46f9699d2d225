"""Export and reload of compressed models on tiny llama, qwen2 and gemma3: both reload paths, parameter and
tensor counts, the dense option, the errors a damaged export gives, and the `rankscope export` command."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from engine.cli import app
from engine.compression.lowrank import compress_, restore_
from engine.compression.plan import PlanError, RankPlan
from engine.compression.session import CompressionSession
from engine.texts.settings import TextSettings
from engine.export import export_compressed, load_compressed
from engine.export.format import (
    COMPRESSION_SCHEMA,
    SECTION,
    CompressedModule,
    CompressionConfig,
    ExportError,
    count_module_parameters,
    safetensors_shapes,
)
from engine.export.modeling import MODELING_FILE
from engine.methods import METHODS
from engine.models.loading import load_model
from engine.store import open_store
from engine.texts.windows import Windowing
from tests.tiny_models import FAMILIES, TRAINING_TEXT

TOLERANCE = 1e-4
FAST = dict(timing_runs=1, max_new_tokens=8)  # generation timing is exercised, not benchmarked, here
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
MLP = ("gate", "up", "down")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-text") / "text.txt"
    path.write_text(TRAINING_TEXT * 20)
    return path


def _session(store, model_dir: Path, text: Path, method: str) -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 8), 4, str(text), Windowing(32, 2))
    return CompressionSession.open(store, load_model(str(model_dir), store), method, texts)


def _mixed_plan(session: CompressionSession) -> RankPlan:
    """Layer 0: attention dense, MLP at rank 16; layer 1: every linear at rank 8 (joint pairs stay equal)."""
    ranks = {s.path: 8 if s.layer == 1 else (16 if s.linear_type in MLP else None) for s in session.shapes.linears}
    return session.plan(ranks)


@torch.no_grad()
def _logits(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.stack([model(input_ids=w[None], use_cache=False).logits[0].float() for w in windows])  # [N, L, V]


def _in_memory_logits(session: CompressionSession, plan: RankPlan) -> torch.Tensor:
    compress_(session.loaded.model, plan.ranks, session.factorization)
    try:
        return _logits(session.loaded.model, session.windows)
    finally:
        restore_(session.loaded.model)


def _gets_bias(session: CompressionSession, path: str) -> bool:
    """Whether a compressed linear has a bias: its own, or one its method adds (feature-pca's mean compensation)."""
    return session.loaded.model.get_submodule(path).bias is not None or \
        session.factorization.factors[path].bias_shift is not None


def _added_bias(session: CompressionSession, plan: RankPlan) -> int:
    """Bias parameters the method adds to compressed linears that had none."""
    model = session.loaded.model
    return sum(model.get_submodule(p).out_features for p, r in plan.ranks.items()
               if r is not None and model.get_submodule(p).bias is None and _gets_bias(session, p))


def _elements(weights: Path) -> int:
    return sum(math.prod(shape) for shape in safetensors_shapes(weights).values())


def _data_bytes(weights: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size minus the 8-byte length and the JSON header."""
    with weights.open("rb") as handle:
        header = struct.unpack("<Q", handle.read(8))[0]
    return weights.stat().st_size - 8 - header


# -- round trip: every family, every method ------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_through_both_paths_with_the_same_logits_and_parameters(
        family, method, store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs[family], text_file, method)
    plan = _mixed_plan(session)
    out = tmp_path / "export"
    report = export_compressed(session, plan, out, **FAST)

    assert report.passed and report.storage == "low-rank"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the staging folder is gone
    assert not any(f.suffix in PICKLE_SUFFIXES for f in out.iterdir())
    assert {"config.json", "model.safetensors", "rank_plan.json", "README.md", MODELING_FILE, "tokenizer.json"} <= set(report.files)

    expected = _in_memory_logits(session, plan)
    model, tokenizer, saved_plan = load_compressed(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(remote).__name__ == f"RankScope{type(session.loaded.model).__name__}"
    for reloaded in (model, remote):
        assert (_logits(reloaded, session.windows) - expected).abs().max().item() < TOLERANCE

    # nothing densified: the reloaded models have exactly the plan's parameters (+ the method's new biases)
    predicted = plan.parameters["total"]["compressed"] + _added_bias(session, plan)
    assert predicted < plan.parameters["total"]["dense"]
    assert count_module_parameters(model) == count_module_parameters(remote) == predicted == report.parameters["reloaded"]
    assert _elements(out / "model.safetensors") == predicted

    keys = safetensors_shapes(out / "model.safetensors")
    compressed = [p for p, r in plan.ranks.items() if r is not None]
    shared = {group[1] for group in session.factorization.joint_groups if plan.ranks[group[0]] is not None}
    assert len(shared) == (3 if method == "joint-svd" else 0)  # q‖k in layer 1, gate‖up in both layers
    for path in compressed:
        stored = {k.removeprefix(path + ".") for k in keys if k.startswith(path + ".")}
        assert stored == ({"B"} if path in shared else {"A", "B"}) | ({"bias"} if _gets_bias(session, path) else set())
        assert keys[f"{path}.B"][1] == plan.ranks[path]
        if path not in shared:
            assert keys[f"{path}.A"] == (plan.ranks[path], session.shapes.by_path[path].d_in)
    assert ("lm_head.weight" in keys) == (not session.loaded.model.config.tie_word_embeddings)

    assert saved_plan.ranks == plan.ranks
    assert saved_plan.metrics["perplexity"] == pytest.approx(report.quality["compressed"]["perplexity"], rel=1e-9)
    assert report.quality["reloaded"]["perplexity"] == pytest.approx(report.quality["compressed"]["perplexity"], rel=1e-6)
    assert report.quality["compressed"]["kl_forward"] > 0 and report.quality["compressed"]["kl_reverse"] > 0
    assert tokenizer("a")["input_ids"] == session.loaded.tokenizer("a")["input_ids"]


def test_the_model_card_and_config_describe_the_export(store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], text_file, "joint-svd")
    plan = _mixed_plan(session)
    report = export_compressed(session, plan, tmp_path / "export", prompt="Sherlock Holmes", **FAST)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    section = CompressionConfig.from_dict(config[SECTION])
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_rankscope.RankScopeLlamaForCausalLM"}
    assert section.method == "joint-svd" and section.base_class == "LlamaForCausalLM"
    assert section.ranks == {p: r for p, r in plan.ranks.items() if r is not None}
    assert section.shared_A == {"model.layers.1.self_attn.k_proj": "model.layers.1.self_attn.q_proj",
                                "model.layers.0.mlp.up_proj": "model.layers.0.mlp.gate_proj",
                                "model.layers.1.mlp.up_proj": "model.layers.1.mlp.gate_proj"}
    assert section.source_model["fingerprint"] == session.loaded.fingerprint

    card = (tmp_path / "export" / "README.md").read_text()
    for needle in ("KL(P_orig‖P_comp)", "KL(P_comp‖P_orig)", "tokens/s", "trust_remote_code=True", "Sherlock Holmes",
                   f"{plan.parameters['decoder_linear']['compressed']:,}", f"{plan.parameters['total']['compressed']:,}",
                   f"{report.weights_bytes:,} bytes", f"{report.original_weights_bytes:,} bytes"):
        assert needle in card, needle
    assert "NOT smaller" not in card
    assert report.speed["original"].tokens_per_second > 0 and report.speed["compressed"].tokens_per_second > 0
    assert report.generation.new_tokens == 8 and 0 <= report.generation.matching_tokens <= 8
    assert report.original_weights_bytes == (tiny_model_dirs["llama"] / "model.safetensors").stat().st_size
    recorded = store.exports(session.loaded.fingerprint)
    assert [e["path"] for e in recorded] == [str((tmp_path / "export").resolve())]
    assert recorded[0]["report"]["weights_bytes"] == report.weights_bytes


def test_a_model_loaded_with_remote_code_saves_again_with_the_shared_A_once(exported, tmp_path):
    directory, _ = exported
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "resaved")
    assert safetensors_shapes(tmp_path / "resaved" / "model.safetensors") == safetensors_shapes(directory / "model.safetensors")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.arange(1, 33)[None]  # [1, 32]
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    assert count_module_parameters(again) == count_module_parameters(model)


def test_compression_section_round_trips_and_validates():
    section = CompressionConfig("joint-svd", "low-rank", "LlamaForCausalLM",
                                {"a.q": CompressedModule(8, 32, 32, False), "a.k": CompressedModule(8, 32, 16, True)},
                                {"a.k": "a.q"}, {"id": "m", "fingerprint": "f" * 64})
    assert CompressionConfig.from_dict(json.loads(json.dumps(section.to_dict()))) == section
    assert section.to_dict()["schema"] == COMPRESSION_SCHEMA
    with pytest.raises(ExportError, match="shares A with 'a.q' but their A shapes differ"):
        CompressionConfig("joint-svd", "low-rank", "X", {"a.q": CompressedModule(8, 32, 32, False),
                                                         "a.k": CompressedModule(16, 32, 16, False)}, {"a.k": "a.q"})
    with pytest.raises(ExportError, match="must be a positive integer"):
        CompressedModule(0, 32, 32, False)
    with pytest.raises(ExportError, match="Unknown storage"):
        CompressionConfig("svd", "fp8", "X", {})


# -- dense export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,method", [("llama", "feature-pca"), ("qwen2", "svd"), ("gemma3", "joint-svd")])
def test_dense_export_is_plain_transformers_and_larger_by_exactly_the_plan_saving(
        family, method, store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs[family], text_file, method)
    plan = _mixed_plan(session)
    low = export_compressed(session, plan, tmp_path / "low-rank", **FAST)
    dense = export_compressed(session, plan, tmp_path / "dense", dense=True, **FAST)
    assert dense.passed and dense.storage == "dense"
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "auto_map" not in config and not (tmp_path / "dense" / MODELING_FILE).exists()
    assert config[SECTION]["storage"] == "dense"

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()  # no remote code
    assert type(plain) is type(session.loaded.model)
    assert (_logits(plain, session.windows) - _in_memory_logits(session, plan)).abs().max().item() < TOLERANCE
    keys = safetensors_shapes(tmp_path / "dense" / "model.safetensors")
    assert not any(k.endswith((".A", ".B")) for k in keys)

    # dense: the original's parameters plus biases (feature-pca's, and zero ones a config switch adds on llama)
    original_names = set(session.loaded.model.state_dict())
    dense_bias = sum(math.prod(s) for k, s in keys.items() if k.endswith(".bias") and k not in original_names)
    assert (dense_bias > _added_bias(session, plan)) == (method == "feature-pca")
    dense_elements, low_elements = _elements(tmp_path / "dense" / "model.safetensors"), _elements(tmp_path / "low-rank" / "model.safetensors")
    assert count_module_parameters(plain) == dense_elements == plan.parameters["total"]["dense"] + dense_bias
    saving = plan.parameters["decoder_linear"]["dense"] - plan.parameters["decoder_linear"]["compressed"]
    assert dense_elements - low_elements == saving + dense_bias - _added_bias(session, plan)
    assert _data_bytes(tmp_path / "dense" / "model.safetensors") - _data_bytes(tmp_path / "low-rank" / "model.safetensors") \
        == 4 * (dense_elements - low_elements)  # float32
    assert low.weights_bytes < dense.weights_bytes
    assert "NOT smaller" in (tmp_path / "dense" / "README.md").read_text()


def test_dense_export_refuses_a_bias_the_architecture_cannot_hold(store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["qwen2"], text_file, "feature-pca")
    with pytest.raises(ExportError, match=r"cannot hold the bias that feature-pca adds to 'model\.layers\.0\.mlp\.gate_proj'.*without --dense"):
        export_compressed(session, _mixed_plan(session), tmp_path / "dense", dense=True, **FAST)
    assert list(tmp_path.iterdir()) == []


# -- errors ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tiny_model_dirs, text_file, tmp_path_factory) -> tuple[Path, RankPlan]:
    """One joint-svd export of tiny llama, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("exported")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSCOPE_CACHE", str(root / "cache"))
        session = _session(open_store(root / "cache" / "rankscope.duckdb"), tiny_model_dirs["llama"], text_file, "joint-svd")
        plan = _mixed_plan(session)
        export_compressed(session, plan, root / "export", **FAST)
    return root / "export", plan


@pytest.fixture
def damaged(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported[0], tmp_path / "copy"))


def _other_models_plan(plan: RankPlan) -> RankPlan:
    return RankPlan.from_dict({**plan.to_dict(), "model": {**plan.model, "id": "other-model", "fingerprint": "0" * 64}})


def test_a_plan_for_another_model_is_refused_at_export_and_at_load(exported, damaged, store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], text_file, "joint-svd")
    with pytest.raises(PlanError, match="made for model 'other-model'"):
        export_compressed(session, _other_models_plan(exported[1]), tmp_path / "never", **FAST)
    assert not (tmp_path / "never").exists()
    _other_models_plan(exported[1]).save(damaged / "rank_plan.json")
    _write_manifest(damaged)  # the checks behind the manifest's still name the problem
    with pytest.raises(ExportError, match=r"rank_plan\.json is a plan for model 'other-model'.*made from"):
        load_compressed(damaged)


def test_a_missing_weights_file_or_directory_is_named(damaged, tmp_path):
    (damaged / "model.safetensors").unlink()
    with pytest.raises(ExportError, match=r"model\.safetensors, listed in rankscope_manifest\.json, is missing"):
        load_compressed(damaged)
    (damaged / MANIFEST).unlink()
    with pytest.raises(ExportError, match=r"has no model\.safetensors"):
        load_compressed(damaged)
    with pytest.raises(ExportError, match="No export directory at"):
        load_compressed(tmp_path / "nowhere")


def test_a_tampered_tensor_shape_is_named_with_both_shapes(damaged):
    weights = damaged / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.down_proj.A"  # rank 8, d_in 48
    tensors[name] = tensors[name][:4].clone()
    save_file(tensors, str(weights), metadata={"format": "pt"})
    _write_manifest(damaged)
    with pytest.raises(ExportError, match=rf"'{name}'.*shape \[4, 48\].*says \[8, 48\].*rank 8"):
        load_compressed(damaged)
    del tensors[name]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    _write_manifest(damaged)
    with pytest.raises(ExportError, match=rf"1 missing tensor\(s\) \('{name}'\)"):
        load_compressed(damaged)


def test_an_unknown_compression_schema_is_refused_by_both_loaders(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config[SECTION]["schema"] = "rankscope.compression/v9"
    (damaged / "config.json").write_text(json.dumps(config))
    _write_manifest(damaged)
    with pytest.raises(ExportError, match=r"Unknown compression schema 'rankscope\.compression/v9'.*reads: rankscope\.compression/v1"):
        load_compressed(damaged)
    with pytest.raises(ValueError, match=r"Unknown compression schema 'rankscope\.compression/v9'"):
        AutoModelForCausalLM.from_pretrained(damaged, trust_remote_code=True)


def test_a_plan_from_another_calibration_is_refused(exported, store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], text_file, "whiten")
    plan = _mixed_plan(session)
    other = RankPlan.from_dict({**plan.to_dict(), "calibration": {**plan.calibration, "n_windows": 99}})
    with pytest.raises(ExportError, match="--calibration-windows 99"):
        export_compressed(session, other, tmp_path / "never", **FAST)


def test_a_failed_self_check_leaves_the_target_untouched(store, tiny_model_dirs, text_file, tmp_path, monkeypatch):
    import engine.export.writer

    session = _session(store, tiny_model_dirs["llama"], text_file, "svd")
    plan = _mixed_plan(session)
    first = export_compressed(session, plan, tmp_path / "export", **FAST)
    real_load = engine.export.writer.load_compressed

    def slightly_off(directory):  # a reload whose one factor differs from the written one by a tiny amount
        model, tokenizer, saved = real_load(directory)
        with torch.no_grad():
            model.get_submodule("model.layers.1.mlp.down_proj").B[0, 0] += 1e-6
        return model, tokenizer, saved

    monkeypatch.setattr(engine.export.writer, "load_compressed", slightly_off)
    # the low-rank reload must give identical logits: a difference far below the dense tolerance (1e-4) fails
    with pytest.raises(ExportError, match=r"did not reproduce the compressed model.*logits via load_compressed: max abs "
                                          r"diff [1-9][^;]*identical logits required") as raised:
        export_compressed(session, plan, tmp_path / "export", overwrite=True, **FAST)
    assert "logits via transformers" not in str(raised.value)  # the other reload is the written one: identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert {p.name: p.stat().st_size for p in (tmp_path / "export").iterdir()} == first.files
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not an earlier RankScope export"):
        export_compressed(session, plan, tmp_path / "other", **FAST)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# -- command line ---------------------------------------------------------------------------------------------------

def test_export_help_describes_the_command():
    result = CliRunner().invoke(app, ["export", "--help"])
    assert result.exit_code == 0
    for words in ("--plan", "--out", "--dense", "--prompt", "--calibration-text", "--eval-windows", "--json",
                  "rankscope_compression", "trust_remote_code"):
        assert words in result.stdout, words


def _cli_plan(runner, model_dir, text_file, tmp_path) -> tuple[list[str], Path]:
    """Text options for the tiny models, and a uniform 30% plan made with them by `rankscope compress`."""
    options = ["--calibration-text", str(text_file), "--calibration-windows", "8", "--groups", "4",
               "--eval-text", str(text_file), "--eval-windows", "2", "--window-len", "32"]
    plan_file = tmp_path / "plan.json"
    made = runner.invoke(app, ["compress", "--model", str(model_dir), "--uniform", "0.3",
                               "--save-plan", str(plan_file), *options])
    assert made.exit_code == 0, made.output
    return options, plan_file


def test_export_command_writes_and_reports(tiny_model_dirs, text_file, tmp_path):
    runner = CliRunner()
    options, plan_file = _cli_plan(runner, tiny_model_dirs["qwen2"], text_file, tmp_path)
    result = runner.invoke(app, ["export", "--plan", str(plan_file), "--out", str(tmp_path / "export"),
                                 "--new-tokens", "8", "--timing-runs", "1", "--json", *options])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["storage"] == "low-rank" and report["method"] == "feature-pca"
    # compress --save-plan recorded the metrics on these windows: the reload is checked against them
    assert report["compressed_quality_from"] == "plan"
    assert report["quality"]["compressed"] == {k: RankPlan.load(plan_file).metrics[k]
                                               for k in ("perplexity", "kl_forward", "kl_reverse", "tokens")}
    assert report["parameters"]["reloaded"] == report["parameters"]["expected_from_plan"] + report["parameters"]["added_bias"]
    assert max(report["logits_max_abs_diff"].values()) < TOLERANCE
    assert load_compressed(tmp_path / "export")[2].ranks == RankPlan.load(plan_file).ranks

    text = runner.invoke(app, ["export", "--plan", str(plan_file), "--out", str(tmp_path / "export"), "--overwrite",
                               "--new-tokens", "8", "--timing-runs", "1", *options])
    assert text.exit_code == 0, text.output
    for words in ("reload check: passed", "tokens/s", "KL(P_orig||P_comp)", "model.safetensors", "original:",
                  "the plan's record for these windows", "export took"):
        assert words in text.stdout, words

    refused = runner.invoke(app, ["export", "--plan", str(plan_file), "--out", str(tmp_path / "x"),
                                  "--model", str(tiny_model_dirs["llama"]), *options])
    assert refused.exit_code == 2 and "Error:" in refused.stderr and "made for model" in refused.stderr


# -- safety: the manifest, damaged files, NaN, permissions, overwriting (DESIGN.md §14) ------------------------------

MANIFEST = "rankscope_manifest.json"


def _write_manifest(directory: Path) -> None:
    """Rewrite the manifest for the directory's files as they are now (an export that was written this way)."""
    import hashlib

    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"schema": "rankscope.manifest/v1", "files": files}))


def _load_remote(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)


def _flip_a_data_byte(weights: Path) -> None:
    """Change the lowest mantissa byte of the first stored float: same size, same header, a slightly other value."""
    with weights.open("rb") as handle:
        offset = 8 + struct.unpack("<Q", handle.read(8))[0]
    data = bytearray(weights.read_bytes())
    data[offset] ^= 0x01
    weights.write_bytes(bytes(data))


def test_an_export_lists_every_file_it_wrote_in_a_checksum_manifest(exported):
    import hashlib

    directory, _ = exported
    manifest = json.loads((directory / MANIFEST).read_text())
    on_disk = {p.name for p in directory.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk and {"model.safetensors", "README.md", "tokenizer.json"} <= on_disk
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_a_changed_byte_in_the_weights_is_refused_by_both_loaders(damaged):
    size = (damaged / "model.safetensors").stat().st_size
    _flip_a_data_byte(damaged / "model.safetensors")
    assert (damaged / "model.safetensors").stat().st_size == size
    with pytest.raises(ExportError, match=r"model\.safetensors.*sha256.*rankscope_manifest\.json"):
        load_compressed(damaged)
    with pytest.raises(ValueError, match=r"model\.safetensors.*sha256.*rankscope_manifest\.json"):
        _load_remote(damaged)


def test_a_truncated_weights_file_is_refused_by_both_loaders_naming_it(damaged):
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"model\.safetensors is [\d,]+ bytes, but rankscope_manifest\.json records"):
        load_compressed(damaged)
    with pytest.raises(ValueError, match=r"model\.safetensors is [\d,]+ bytes, but rankscope_manifest\.json records"):
        _load_remote(damaged)
    (damaged / MANIFEST).unlink()  # as written by RankScope before manifests: the damaged file is still named
    with pytest.raises(ExportError, match=r"model\.safetensors.*could not be read.*damaged or truncated"):
        load_compressed(damaged)


def test_a_missing_tokenizer_file_is_refused_by_both_loaders(damaged):
    (damaged / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match=r"tokenizer\.json.*listed in rankscope_manifest\.json.*missing"):
        load_compressed(damaged)
    with pytest.raises(ValueError, match=r"tokenizer\.json.*listed in rankscope_manifest\.json.*missing"):
        _load_remote(damaged)


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
def test_a_nan_tensor_is_refused_by_both_loaders_naming_it(damaged, with_manifest):
    weights = damaged / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.down_proj.B"
    tensors[name][3, 1] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    if with_manifest:
        _write_manifest(damaged)  # the NaN was written by the export itself: the checksums agree
    else:
        (damaged / MANIFEST).unlink(missing_ok=True)
    with pytest.raises(ExportError, match=rf"'{re.escape(name)}'.*model\.safetensors.*NaN"):
        load_compressed(damaged)
    with pytest.raises(ValueError, match=rf"'{re.escape(name)}'.*NaN"):
        _load_remote(damaged)


def test_an_export_without_a_manifest_still_loads(exported, damaged):
    (damaged / MANIFEST).unlink(missing_ok=True)
    model, _, plan = load_compressed(damaged)
    assert plan.ranks == exported[1].ranks
    ids = torch.arange(1, 33)[None]  # [1, 32]
    assert torch.equal(_logits(model, ids), _logits(load_compressed(exported[0])[0], ids))


def test_every_export_file_has_the_same_permissions_from_the_umask(exported):
    directory, _ = exported
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_exporting_onto_an_earlier_export_needs_overwrite(store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], text_file, "svd")
    plan = _mixed_plan(session)
    out = tmp_path / "export"
    export_compressed(session, plan, out, **FAST)
    before = _snapshot(out)
    with pytest.raises(ExportError, match=r"holds an earlier RankScope export.*--overwrite.*tick"):
        export_compressed(session, plan, out, **FAST)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    other = session.uniform_plan(0.5)
    report = export_compressed(session, other, out, overwrite=True, **FAST)
    assert report.passed and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert load_compressed(out)[2].ranks == other.ranks
    assert set(report.files) == {p.name for p in out.iterdir()} and MANIFEST in report.files


def test_overwrite_refuses_an_earlier_export_holding_a_users_file(store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], text_file, "svd")
    plan = _mixed_plan(session)
    out = tmp_path / "export"
    export_compressed(session, plan, out, **FAST)
    (out / "NOTES.txt").write_text("notes")
    (out / "runs").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for overwrite in (False, True):
        with pytest.raises(ExportError, match=r"NOTES\.txt.*runs|runs.*NOTES\.txt"):
            export_compressed(session, session.uniform_plan(0.5), out, overwrite=overwrite, **FAST)
        assert (out / "NOTES.txt").read_text() == "notes" and (out / "runs").is_dir()
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        assert load_compressed(out)[2].ranks == plan.ranks  # the earlier export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_directory_that_is_not_an_export_is_never_touched(store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], text_file, "svd")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama"}')  # a model of the user's, not an export
    with pytest.raises(ExportError, match="is not an earlier RankScope export"):
        export_compressed(session, _mixed_plan(session), mine, overwrite=True, **FAST)
    assert _snapshot(mine) == {"config.json": b'{"model_type": "llama"}'}


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_export_command_replaces_an_earlier_export_only_with_overwrite(tiny_model_dirs, text_file, tmp_path):
    runner = CliRunner()
    options, plan_file = _cli_plan(runner, tiny_model_dirs["llama"], text_file, tmp_path)
    out = tmp_path / "export"
    export = ["export", "--plan", str(plan_file), "--out", str(out), "--new-tokens", "4", "--timing-runs", "1", *options]
    assert runner.invoke(app, export).exit_code == 0
    assert "--overwrite" in runner.invoke(app, ["export", "--help"]).stdout

    refused = runner.invoke(app, export)
    assert refused.exit_code == 2
    [line] = _error_lines(refused)
    assert "earlier RankScope export" in line and "--overwrite" in line

    (out / "NOTES.txt").write_text("notes")
    kept = runner.invoke(app, [*export, "--overwrite"])
    assert kept.exit_code == 2
    [line] = _error_lines(kept)
    assert "NOTES.txt" in line and "not written by" in line
    assert (out / "NOTES.txt").read_text() == "notes"

    (out / "NOTES.txt").unlink()
    replaced = runner.invoke(app, [*export, "--overwrite", "--json"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["passed"] and "rankscope_manifest.json" in json.loads(replaced.stdout)["files"]
