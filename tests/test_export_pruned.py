"""Export of plans that prune MLP channels (LoRAP, `rankscope.plan/v2`) on tiny llama, qwen2 and gemma3: the pruned
MLPs as smaller dense linears (`rankscope.compression/v2`), both reload paths, the plan's parameter count, the model
card, the refused dense export, damaged configs, and what a RankScope that reads only v1 says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.compression.lorap import lorap_plan
from engine.compression.lowrank import restore_
from engine.compression.plan import SCHEMA_V2, RankPlan
from engine.compression.session import CompressionSession
from engine.export import check_export_storage, export_compressed, load_compressed
from engine.export.format import (
    COMPRESSION_SCHEMA,
    COMPRESSION_SCHEMA_V2,
    SECTION,
    CompressedModule,
    CompressionConfig,
    ExportError,
    PrunedLinear,
    count_module_parameters,
    safetensors_shapes,
)
from engine.export.modeling import MODELING_FILE, modeling_source
from engine.models.loading import load_model
from engine.store import open_store
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.tiny_models import TRAINING_TEXT, VOCAB_SIZE, _tokenizer

TOLERANCE = 1e-4
FAST = dict(timing_runs=1, max_new_tokens=8)
MANIFEST = "rankscope_manifest.json"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-pruned-text") / "text.txt"
    path.write_text(TRAINING_TEXT * 20)
    return path


def _session(store, model_dir: Path, text: Path, method: str = "awsvd") -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 8), 4, str(text), Windowing(32, 2))
    return CompressionSession.open(store, load_model(str(model_dir), store), method, texts)


def _mixed_plan(session: CompressionSession) -> RankPlan:
    """LoRAP at 30%, but the last layer's MLP factorised at rank 8 instead of pruned (its channels None)."""
    base = lorap_plan(session, 0.3)
    last = session.shapes.mlps[-1]
    plan = session.plan({**base.ranks, **{p: 8 for p in last.paths}}, channels={**base.channels, last.path: None},
                        pruning=base.pruning)
    assert plan.channels[last.path] is None and any(k is not None for k in plan.channels.values())
    return plan


def _plan(session: CompressionSession, kind: str) -> RankPlan:
    return lorap_plan(session, 0.3) if kind == "lorap" else _mixed_plan(session)


@torch.no_grad()
def _logits(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.stack([model(input_ids=w[None], use_cache=False).logits[0].float() for w in windows])  # [N, L, V]


def _in_memory_logits(session: CompressionSession, plan: RankPlan) -> torch.Tensor:
    session.apply_(plan)
    try:
        return _logits(session.loaded.model, session.windows)
    finally:
        restore_(session.loaded.model)


def _pruned_shapes(session: CompressionSession, plan: RankPlan) -> dict[str, tuple[int, int]]:
    """Linear path -> (in_features, out_features) of every linear the plan prunes."""
    shapes = {}
    for mlp in session.shapes.mlps:
        kept = plan.channels.get(mlp.path)
        if kept is not None:
            shapes.update({mlp.gate: (mlp.d_model, kept), mlp.up: (mlp.d_model, kept), mlp.down: (kept, mlp.d_model)})
    return shapes


# -- round trip --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,method,kind", [
    ("llama", "awsvd", "lorap"), ("qwen2", "awsvd", "lorap"), ("gemma3", "awsvd", "lorap"),
    ("llama", "joint-svd", "mixed"), ("qwen2", "feature-pca", "mixed"), ("gemma3", "svd", "mixed"),
])
def test_a_pruned_plan_exports_and_reloads_through_both_paths(family, method, kind, store, tiny_model_dirs, text_file,
                                                               tmp_path):
    session = _session(store, tiny_model_dirs[family], text_file, method)
    plan = _plan(session, kind)
    out = tmp_path / "export"
    report = export_compressed(session, plan, out, **FAST)
    assert report.passed and report.storage == "low-rank", report.checks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    # the section: v2, every pruned linear with the plan's kept channels, the rest as before
    pruned = _pruned_shapes(session, plan)
    config = json.loads((out / "config.json").read_text())
    section = CompressionConfig.from_dict(config[SECTION])
    assert config[SECTION]["schema"] == section.schema == COMPRESSION_SCHEMA_V2
    assert {p: (s.in_features, s.out_features) for p, s in section.pruned.items()} == pruned
    assert not any(s.bias for s in section.pruned.values())
    assert section.ranks == {p: r for p, r in plan.ranks.items() if r is not None}
    if kind == "mixed":  # the last layer's MLP is factorised, not pruned
        assert set(session.shapes.mlps[-1].paths) <= set(section.modules)
        assert not set(session.shapes.mlps[-1].paths) & set(section.pruned)
    keys = safetensors_shapes(out / "model.safetensors")
    for path, (d_in, d_out) in pruned.items():
        assert keys[f"{path}.weight"] == (d_out, d_in)
    saved = RankPlan.load(out / "rank_plan.json")
    assert saved.schema == SCHEMA_V2 and saved.channels == plan.channels and saved.pruning == plan.pruning

    # both paths: the smaller linears are built before the weights load, the logits are the in-memory model's
    expected = _in_memory_logits(session, plan)
    model, _, loaded_plan = load_compressed(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(remote).__name__ == f"RankScope{type(session.loaded.model).__name__}"
    for reloaded in (model, remote):
        for path, (d_in, d_out) in pruned.items():
            linear = reloaded.get_submodule(path)
            assert type(linear) is nn.Linear and (linear.in_features, linear.out_features) == (d_in, d_out)
        assert (_logits(reloaded, session.windows) - expected).abs().max().item() < TOLERANCE
    assert loaded_plan.channels == plan.channels

    # exactly the plan's parameters (+ feature-pca's new biases on the factorised linears)
    predicted = plan.parameters["total"]["compressed"] + report.parameters["added_bias"]
    assert (report.parameters["added_bias"] > 0) == (method == "feature-pca")
    assert report.parameters["removed_bias"] == 0
    assert count_module_parameters(model) == count_module_parameters(remote) == predicted == report.parameters["reloaded"]
    assert report.parameters["expected_from_plan"] == plan.parameters["total"]["compressed"]

    # the report and the card: tokens/s of both, and the pruned MLPs with their kept channels
    assert report.speed["original"].tokens_per_second > 0 and report.speed["compressed"].tokens_per_second > 0
    kept = {p: k for p, k in plan.channels.items() if k is not None}
    assert {p: m["kept"] for p, m in report.pruning["mlps"].items()} == kept
    assert report.pruning["settings"] == plan.pruning and report.pruning["of_mlps"] == len(session.shapes.mlps)
    card = (out / "README.md").read_text()
    assert "## Pruned MLPs" in card and "tokens/s" in card and "smaller linears of the pruned MLPs" in card
    assert "tags: [rankscope, low-rank, compressed, pruned]" in card
    assert f"{len(kept)} of {len(session.shapes.mlps)} MLPs are pruned" in card
    for path, k in kept.items():
        assert f"`{path}` | {k:,} | {session.shapes.mlps[0].d_ff:,} |" in card


def test_a_plan_that_prunes_nothing_still_writes_a_v1_section(store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["llama"], text_file, "svd")
    report = export_compressed(session, session.uniform_plan(0.3), tmp_path / "export", **FAST)
    section = json.loads((tmp_path / "export" / "config.json").read_text())[SECTION]
    assert section["schema"] == COMPRESSION_SCHEMA and "pruned" not in section  # an older RankScope reads it
    assert report.pruning is None and "Pruned MLPs" not in (tmp_path / "export" / "README.md").read_text()


def test_pruned_mlps_with_a_bias_lose_the_bias_of_their_pruned_channels(store, text_file, tmp_path):
    """Llama's `mlp_bias`: gate and up keep the kept channels' bias entries; the plan counts weights only."""
    directory = tmp_path / "llama-mlp-bias"
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=True, mlp_bias=True))
    with torch.no_grad():
        for name, parameter in original.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.1)
    original.save_pretrained(directory)
    _tokenizer(add_bos=False).save_pretrained(directory)

    session = _session(store, directory, text_file)
    plan = lorap_plan(session, 0.3)
    report = export_compressed(session, plan, tmp_path / "export", **FAST)
    assert report.passed, report.checks
    removed = sum(2 * (m.d_ff - plan.channels[m.path]) for m in session.shapes.mlps)  # gate's and up's
    assert report.parameters["removed_bias"] == removed > 0
    assert report.parameters["reloaded"] == plan.parameters["total"]["compressed"] - removed
    section = CompressionConfig.from_dict(json.loads((tmp_path / "export" / "config.json").read_text())[SECTION])
    assert all(s.bias for s in section.pruned.values())
    assert f"- {removed:,} bias parameters of pruned channels" in (tmp_path / "export" / "README.md").read_text()
    expected = _in_memory_logits(session, plan)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True, dtype=torch.float32)
    for reloaded in (load_compressed(tmp_path / "export")[0], remote.eval()):
        assert (_logits(reloaded, session.windows) - expected).abs().max().item() < TOLERANCE


def test_a_recovered_pruned_plan_exports_with_its_recovered_factors(store, tiny_model_dirs, text_file, tmp_path):
    from engine.recovery.settings import RecoverySettings
    from engine.recovery.training import recover

    session = _session(store, tiny_model_dirs["llama"], text_file)
    plan = lorap_plan(session, 0.3)
    outcome = recover(store, session.loaded, plan, RecoverySettings(steps=2, batch_windows=2, training_windows=4,
                                                                    validation_windows=1, learning_rate=0.05))
    recovered = outcome.plan
    assert recovered.recovery is not None and recovered.channels == plan.channels
    report = export_compressed(session, recovered, tmp_path / "export", **FAST)
    assert report.passed, report.checks
    expected = _in_memory_logits(session, recovered)
    assert not torch.allclose(expected, _in_memory_logits(session, plan))  # the recovery changed the model
    model, _, saved = load_compressed(tmp_path / "export")
    assert saved.recovery == recovered.recovery and saved.channels == plan.channels
    assert (_logits(model, session.windows) - expected).abs().max().item() < TOLERANCE


def test_a_pruned_model_loaded_with_remote_code_saves_and_loads_again(exported, tmp_path):
    directory, _ = exported
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "resaved")
    assert safetensors_shapes(tmp_path / "resaved" / "model.safetensors") == safetensors_shapes(directory / "model.safetensors")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.arange(1, 33)[None]  # [1, 32]
    assert torch.equal(_logits(again, ids), _logits(model, ids))


# -- the dense export cannot hold them ---------------------------------------------------------------------------------

def test_a_dense_export_of_a_pruned_plan_is_refused_before_any_work(store, tiny_model_dirs, text_file, tmp_path,
                                                                    monkeypatch):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    plan = _mixed_plan(session)
    monkeypatch.setattr(CompressionSession, "apply_", lambda *a: pytest.fail("the model was compressed"))
    with pytest.raises(ExportError, match=r"prunes the channels of 1 MLP\(s\) \(model\.layers\.0\.mlp keeps \d+\).*"
                                          r"one intermediate_size for every layer.*without --dense"):
        export_compressed(session, plan, tmp_path / "dense", dense=True, **FAST)
    assert list(tmp_path.iterdir()) == []
    check_export_storage(plan, dense=False)  # the low-rank form is fine
    check_export_storage(session.uniform_plan(0.3), dense=True)  # and a plan that prunes nothing exports dense


# -- the format -------------------------------------------------------------------------------------------------------

def test_the_v2_section_round_trips_and_validates():
    modules = {"a.q": CompressedModule(8, 32, 32, False)}
    pruned = {"a.mlp.gate_proj": PrunedLinear(32, 20, False), "a.mlp.down_proj": PrunedLinear(20, 32, True)}
    source = {"id": "m", "fingerprint": "f" * 64}
    section = CompressionConfig("svd", "low-rank", "LlamaForCausalLM", modules, {}, source,
                                schema=COMPRESSION_SCHEMA_V2, pruned=pruned)
    assert CompressionConfig.from_dict(json.loads(json.dumps(section.to_dict()))) == section
    assert section.to_dict()["pruned"]["a.mlp.down_proj"] == {"in_features": 20, "out_features": 32, "bias": True}
    v1 = CompressionConfig("svd", "low-rank", "LlamaForCausalLM", modules, {}, source)
    assert "pruned" not in v1.to_dict() and CompressionConfig.from_dict(v1.to_dict()) == v1

    with pytest.raises(ExportError, match=r"'rankscope\.compression/v1' one does not; this one is '.*v1' with them"):
        CompressionConfig("svd", "low-rank", "X", modules, pruned=pruned)
    with pytest.raises(ExportError, match="unknown field"):
        CompressionConfig.from_dict({**v1.to_dict(), "pruned": section.to_dict()["pruned"]})
    with pytest.raises(ExportError, match="without them"):
        CompressionConfig.from_dict({**section.to_dict(), "pruned": {}})
    with pytest.raises(ExportError, match="A dense export cannot hold pruned MLPs"):
        CompressionConfig("svd", "dense", "X", modules, schema=COMPRESSION_SCHEMA_V2, pruned=pruned)
    with pytest.raises(ExportError, match="'a.q' is listed both"):
        CompressionConfig("svd", "low-rank", "X", modules, schema=COMPRESSION_SCHEMA_V2,
                          pruned={"a.q": PrunedLinear(32, 32, False)})
    with pytest.raises(ExportError, match="Pruned linear field 'out_features' must be a positive integer"):
        PrunedLinear(32, 0, False)
    with pytest.raises(ExportError, match=r"An entry in rankscope_compression\.pruned is malformed"):
        CompressionConfig.from_dict({**section.to_dict(), "pruned": {"a.mlp.gate_proj": {"rank": 3}}})


# -- damaged exports ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tiny_model_dirs, text_file, tmp_path_factory) -> tuple[Path, RankPlan]:
    """One LoRAP export of tiny llama, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("exported-pruned")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSCOPE_CACHE", str(root / "cache"))
        session = _session(open_store(root / "cache" / "rankscope.duckdb"), tiny_model_dirs["llama"], text_file)
        plan = lorap_plan(session, 0.3)
        export_compressed(session, plan, root / "export", **FAST)
    return root / "export", plan


@pytest.fixture
def damaged(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported[0], tmp_path / "copy"))


def _write_manifest(directory: Path) -> None:
    """Rewrite the manifest for the directory's files as they are now (as if the export had written them so)."""
    import hashlib

    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"schema": "rankscope.manifest/v1", "files": files}))


def _edit_section(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config[SECTION])
    (directory / "config.json").write_text(json.dumps(config))
    _write_manifest(directory)


def _load_remote(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)


def test_a_pruned_shape_that_does_not_match_the_weights_is_refused_naming_the_linear(damaged):
    gate = "model.layers.1.mlp.gate_proj"
    _edit_section(damaged, lambda s: s["pruned"][gate].update(in_features=31))
    for load, error in ((load_compressed, ExportError), (_load_remote, ValueError)):
        with pytest.raises(error, match=rf"Tensor '{gate}\.weight' in model\.safetensors has shape \[\d+, 32\].*"
                                        rf"pruned linear '{gate}' in_features 31"):
            load(damaged)


def test_a_pruned_width_other_than_the_plans_is_refused_naming_the_mlp(exported, damaged):
    gate, kept = "model.layers.1.mlp.gate_proj", exported[1].channels["model.layers.1.mlp"]
    _edit_section(damaged, lambda s: s["pruned"][gate].update(out_features=kept - 1))
    with pytest.raises(ExportError, match=rf"rank_plan\.json and config\.json disagree on MLP 'model\.layers\.1\.mlp': "
                                          rf"the plan keeps {kept} channels.*'{gate}' 32->{kept - 1}"):
        load_compressed(damaged)
    with pytest.raises(ValueError, match=rf"'{gate}\.weight'.*shape \[{kept}, 32\].*pruned linear '{gate}'"):
        _load_remote(damaged)


def test_a_section_that_lost_its_pruned_linears_is_refused(damaged):
    def to_v1(section):
        section["schema"] = COMPRESSION_SCHEMA
        del section["pruned"]

    _edit_section(damaged, to_v1)
    with pytest.raises(ExportError, match=r"disagree on MLP 'model\.layers\.0\.mlp': the plan keeps \d+ channels, "
                                          r"config\.json's rankscope_compression has no pruned linears"):
        load_compressed(damaged)
    _edit_section(damaged, lambda s: s.update(schema=COMPRESSION_SCHEMA_V2))
    with pytest.raises(ExportError, match="'rankscope.compression/v2' compression section lists pruned linears"):
        load_compressed(damaged)


def test_a_rankscope_that_reads_only_v1_refuses_a_pruned_export_by_its_schema(exported, damaged, monkeypatch):
    import engine.export.format

    monkeypatch.setattr(engine.export.format, "SUPPORTED_SCHEMAS", (COMPRESSION_SCHEMA,))
    with pytest.raises(ExportError, match=r"Unknown compression schema 'rankscope\.compression/v2' in config\.json's "
                                          r"rankscope_compression section; this RankScope \(.*\) reads: "
                                          r"rankscope\.compression/v1\. .*use the RankScope that wrote it"):
        load_compressed(exported[0])
    # a modeling file written for v1 only says the same, and loads nothing
    (damaged / MODELING_FILE).write_text(modeling_source("LlamaForCausalLM", (COMPRESSION_SCHEMA,)))
    _write_manifest(damaged)
    with pytest.raises(ValueError, match=r"Unknown compression schema 'rankscope\.compression/v2'.*reads "
                                         r"rankscope\.compression/v1"):
        _load_remote(damaged)


def test_the_pruned_weights_are_the_kept_slices_of_the_originals(exported, tiny_model_dirs):
    directory, plan = exported
    original = load_file(str(tiny_model_dirs["llama"] / "model.safetensors"))
    stored = load_file(str(directory / "model.safetensors"))
    for mlp_path, kept in plan.channels.items():
        gate = stored[f"{mlp_path}.gate_proj.weight"]  # [kept, d_model]
        rows = [i for i in range(original[f"{mlp_path}.gate_proj.weight"].shape[0])
                if any(torch.equal(original[f"{mlp_path}.gate_proj.weight"][i], row) for row in gate)]
        assert len(rows) == kept == stored[f"{mlp_path}.down_proj.weight"].shape[1]
        assert torch.equal(stored[f"{mlp_path}.up_proj.weight"], original[f"{mlp_path}.up_proj.weight"][rows])
        assert torch.equal(stored[f"{mlp_path}.down_proj.weight"], original[f"{mlp_path}.down_proj.weight"][:, rows])
