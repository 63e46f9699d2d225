"""Smaller caches (#11 item 4): calibrations store nothing derivable, factorisations stop at the break-even rank,
and the store lists every artifact with its size and deletes one safely.

On the tiny random models: statistics loaded from the compact form equal the collected ones and those of the
earlier full form bit for bit; factors cut at the break-even rank give bit-identical compressed models at every
rank a plan can use, and a full-rank factorisation written by an earlier version loads cut to the same numbers;
plans refuse ranks above break-even; the inventory's sizes are the files' sizes, and deleting an artifact removes
its rows and files while everything else still works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from engine.cache import calibration as calibration_cache
from engine.cache import factorization as factorization_cache
from engine.cache.calibration import ensure_calibration
from engine.cache.evaluation import ensure_baseline_evaluation
from engine.cache.factorization import (
    CutFactors, StoredFactorization, break_even_rank, component_energies, ensure_factorization,
)
from engine.cache.keys import factorization_key
from engine.cache.spectra import ensure_spectra
from engine.calibration import (
    GROUP_SUMS, MEAN, N_TOKENS, POOLED_UPPER, SUM_XXT, CalibrationStatistics, collect_statistics,
)
from engine.compression.lowrank import compress_, restore_
from engine.compression.plan import PlanError, RankPlan
from engine.compression.session import CompressionSession
from engine.compression.sweep import sweep_by_type
from engine.compression.units import ModelShapes
from engine.errors import StoreError
from engine.methods import METHODS
from engine.models.loading import load_model
from engine.records import FactorizationRecord, RecoveryRecord
from engine.store.arrays import save_arrays
from engine.store.cache_inventory import ARTIFACT_KINDS, cached_artifacts, find_artifact, forget_artifact
from engine.texts.corpus import load_corpus
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing, make_windows
from tests.app_testing import workbench  # noqa: F401  (the app test's fixture)

NAMES = ("mean", "second_moment", "pooled_covariance", "l2_norm", "covariance")


def _windows(loaded, text: Path, n: int, length: int = 16) -> torch.Tensor:
    return make_windows(load_corpus(str(text)), loaded.tokenizer, Windowing(length, n))


def _assert_identical(a: CalibrationStatistics, b: CalibrationStatistics) -> None:
    assert set(a.sites) == set(b.sites)
    for key in a.sites:
        assert a.sites[key].n_tokens == b.sites[key].n_tokens
        for name in NAMES:
            assert torch.equal(getattr(a.sites[key], name), getattr(b.sites[key], name)), (key, name)


def _data_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- calibration: nothing derivable is stored ------------------------------------------------------------------

@pytest.mark.parametrize("n_windows, n_groups, stored", [
    (8, 4, {SUM_XXT, N_TOKENS, GROUP_SUMS}),  # equal groups: the group sums derive the mean and pooled covariance
    (7, 3, {SUM_XXT, N_TOKENS, POOLED_UPPER, MEAN}),  # groups of two sizes: the pooled covariance is stored
    (26, 26, {SUM_XXT, N_TOKENS, POOLED_UPPER, MEAN}),  # 26 group sums of width 32 or 48 outweigh the triangle
], ids=["equal-groups", "two-sizes", "many-groups"])
def test_statistics_read_back_from_the_compact_form_equal_the_collected_and_the_old_form(
        store, tiny_model_dirs, sample_text_file, tmp_path, n_windows, n_groups, stored):
    loaded = load_model(str(tiny_model_dirs["qwen2"]), store)
    statistics = collect_statistics(loaded.model, loaded.adapter, _windows(loaded, sample_text_file, n_windows),
                                    n_groups=n_groups)
    tensors = statistics.to_tensors()
    assert {name.split(".", 2)[2] for name in tensors} == stored  # per site, and nothing else
    for (layer, site), stats in statistics.sites.items():
        d = stats.mean.shape[0]
        assert tensors[f"{layer}.{site}.{SUM_XXT}"].shape == (d * (d + 1) // 2,)
    # through a file, as the cache stores it; the old form is what `to_tensors` wrote before
    save_file(tensors, str(tmp_path / "new.safetensors"))
    save_file(statistics.legacy_tensors(), str(tmp_path / "old.safetensors"))
    new = CalibrationStatistics.from_tensors(load_file(str(tmp_path / "new.safetensors")), n_groups)
    old = CalibrationStatistics.from_tensors(load_file(str(tmp_path / "old.safetensors")), n_groups)
    _assert_identical(new, statistics)
    _assert_identical(new, old)
    # bytes: per site the triangle and the count, then the group sums or the pooled triangle and the mean
    expected = 0
    for stats in statistics.sites.values():
        d = stats.mean.shape[0]
        expected += 8 * (d * (d + 1) // 2 + 1) + 8 * (n_groups * d if GROUP_SUMS in stored else d * (d + 1) // 2 + d)
    assert _data_bytes(tensors) == expected
    legacy = _data_bytes(statistics.legacy_tensors())
    assert _data_bytes(tensors) < (0.5 if GROUP_SUMS in stored else 0.52) * legacy


def test_statistics_are_those_of_the_plain_formulas(store, tiny_model_dirs, sample_text_file):
    """The compact form changes no statistic: each is what a direct float64 computation gives (to rounding), and
    the second moment, stored as a triangle, is exactly symmetric."""
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    windows = _windows(loaded, sample_text_file, 6)
    statistics = collect_statistics(loaded.model, loaded.adapter, windows, n_groups=3, product_dtype=torch.float64)
    inputs, handles = {}, []
    for layer in range(loaded.num_layers):
        for site in ("attn_in", "mlp_in"):
            def hook(_m, args, key=(layer, site)):
                inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
            handles.append(loaded.adapter.site_module(loaded.model, layer, site).register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(windows.shape[0]):
            loaded.model.get_decoder()(input_ids=windows[i:i + 1], use_cache=False)
    for handle in handles:
        handle.remove()
    for key, parts in inputs.items():
        x = torch.cat(parts)
        site = statistics.sites[key]
        torch.testing.assert_close(site.second_moment, x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(site.l2_norm, x.pow(2).sum(0).sqrt(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(site.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        groups = x.reshape(3, -1, x.shape[1])
        pooled = sum(torch.cov(g.T) for g in groups) / 3
        torch.testing.assert_close(site.pooled_covariance, pooled, rtol=1e-10, atol=1e-12)
        assert torch.equal(site.second_moment, site.second_moment.T)  # stored as a triangle: exactly symmetric


@pytest.mark.parametrize("n_windows, n_groups", [(8, 4), (7, 3)], ids=["equal-groups", "two-sizes"])
def test_collection_gives_the_numbers_the_earlier_code_gave(n_windows, n_groups):
    """The earlier `_SiteAccumulator.finish`, verbatim, on the same sums of x xᵀ (now recovered from shifted sums,
    and made exactly symmetric): the statistics are the same to the bit."""
    from engine.calibration import _mirrored, _SiteAccumulator, group_assignment

    torch.manual_seed(0)
    length, dim = 16, 24
    x = torch.randn(n_windows, length, dim) * torch.rand(dim) * 3 + torch.rand(dim)
    groups = group_assignment(n_windows, n_groups)
    accumulator = _SiteAccumulator(dim, [groups.count(g) * length for g in range(n_groups)], torch.float32)
    for start in range(0, n_windows, 2):
        accumulator.add(x[start:start + 2], groups[start:start + 2])
    n, m = accumulator.n_tokens, n_groups
    sizes = torch.tensor(accumulator.group_tokens, dtype=torch.float64)
    by_size = accumulator._sums_of_squares(n_groups)  # Σ x xᵀ per group size, recovered from the shifted sums
    sum_xxT = _mirrored(sum(by_size.values()))
    one_size = len(by_size) == 1
    per_size = {next(iter(by_size)): sum_xxT} if one_size else by_size  # one size: the symmetric sum itself
    pooled_sum = sum(total / (size - 1) for size, total in per_size.items())
    scaled = accumulator.group_sum_x / torch.sqrt(sizes * (sizes - 1)).unsqueeze(1)
    earlier = {"mean": accumulator.group_sum_x.sum(dim=0) / n, "second_moment": sum_xxT / n,
               "pooled_covariance": (pooled_sum - scaled.T @ scaled) / m if one_size else  # stored as a triangle:
               _mirrored((pooled_sum - scaled.T @ scaled) / m),  # exactly symmetric
               "l2_norm": torch.sqrt(torch.diagonal(sum_xxT).clone())}
    site, _ = accumulator.finish()
    for name, value in earlier.items():
        assert torch.equal(getattr(site, name), value), name


def test_a_calibration_in_the_old_full_form_is_read_as_it_was_written(store, tiny_model_dirs, sample_text_file,
                                                                       monkeypatch):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    fresh = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), 2)
    assert not fresh.from_cache and fresh.statistics.stored_form is None  # the value kept drops the stored form
    entry = store.array_entry(fresh.record.array_id)
    compact = (store.cache_dir / entry["relpath"]).stat().st_size
    target = f"calibration:{fresh.record.calibration_id}"
    assert "earlier full form" not in find_artifact(store, target).description
    save_arrays(store, fresh.record.array_id, "calibration", fresh.statistics.legacy_tensors())  # as 0.3 wrote it
    old = (store.cache_dir / entry["relpath"]).stat().st_size
    assert compact < old
    assert find_artifact(store, target).description.endswith("; earlier full form, stored smaller when computed again")
    monkeypatch.setattr(calibration_cache, "collect_statistics", lambda *a, **k: pytest.fail("recomputed"))
    again = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 4), 2)
    assert again.from_cache
    _assert_identical(again.statistics, fresh.statistics)


# -- factorisations: up to the break-even rank -----------------------------------------------------------------

@pytest.fixture
def tiny(store, tiny_model_dirs, sample_text_file):
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    calibration = ensure_calibration(store, loaded, str(sample_text_file), Windowing(16, 8), 4)
    windows = _windows(loaded, sample_text_file, 2)
    yield loaded, calibration, windows
    restore_(loaded.model)


def _full_energies(full) -> dict:
    """What the search's global allocation computed from full-rank factors (engine.search.runner.factor_energies)."""
    return {p: ((f.B.double() ** 2).sum(0) * (f.A.double() ** 2).sum(1)).numpy() for p, f in full.factors.items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cut_factors_give_the_same_compressed_model_at_every_usable_rank(tiny, store, method):
    loaded, calibration, windows = tiny
    full = METHODS[method].factorize(loaded, calibration.statistics)
    _, cut = ensure_factorization(store, loaded, method, calibration)
    assert isinstance(cut, StoredFactorization)
    units = ModelShapes.of(loaded).units(method)
    for unit in units:
        shared = {id(cut.factors[p].A) for p in unit.paths}
        assert len(shared) == 1  # a joint pair still shares one A
        for path in unit.paths:
            f = cut.factors[path]
            assert isinstance(f, CutFactors) and f.max_rank == unit.break_even_rank < full.factors[path].max_rank
            assert f.B.shape == (full.factors[path].B.shape[0], unit.break_even_rank)
            assert f.full_rank == full.factors[path].max_rank
            if f.bias_coeff is not None:
                assert f.bias_coeff.shape == (unit.break_even_rank,)
    energies = component_energies(cut)
    for path, e in _full_energies(full).items():
        assert energies[path].tolist() == e.tolist()  # bit for bit, dropped components included
    top = max(u.break_even_rank for u in units)
    with torch.no_grad():
        for rank in range(1, top + 1):
            ranks = {p: min(rank, u.break_even_rank) for u in units for p in u.paths}
            compress_(loaded.model, ranks, full)
            expected = loaded.model(input_ids=windows, use_cache=False).logits
            compress_(loaded.model, ranks, cut)
            got = loaded.model(input_ids=windows, use_cache=False).logits
            restore_(loaded.model)
            assert torch.equal(got, expected), (method, rank)


@pytest.mark.parametrize("method", ["feature-pca", "joint-svd"])
def test_a_full_rank_factorisation_from_an_earlier_version_loads_cut_to_the_same_numbers_and_is_stored_cut(
        tiny, store, method, monkeypatch):
    loaded, calibration, _ = tiny
    full = METHODS[method].factorize(loaded, calibration.statistics)
    calibration_id = calibration.record.calibration_id if METHODS[method].needs else ""
    key = factorization_key(loaded.fingerprint, method, calibration_id)
    tensors, metadata = full.to_tensors()  # the form RankScope wrote before: every column
    save_arrays(store, key, "factorization", tensors, metadata)
    store.put_record(FactorizationRecord(key, loaded.fingerprint, method, calibration_id, key, 1.0))
    assert "earlier full form" in find_artifact(store, f"factorization:{key}").description
    monkeypatch.setattr(factorization_cache, "get_method",
                        lambda name: type("Spec", (), {"needs": METHODS[name].needs,
                                                       "factorize": lambda *a: pytest.fail("recomputed")})())
    full_bytes = store.array_entry(key)["n_bytes"]
    _, old = ensure_factorization(store, loaded, method, calibration)
    assert store.array_entry(key)["n_bytes"] < full_bytes  # stored again, cut
    assert "earlier full form" not in find_artifact(store, f"factorization:{key}").description
    _, again = ensure_factorization(store, loaded, method, calibration)  # read from the cut form, not recomputed
    monkeypatch.undo()
    cut = factorization_cache.cut_factorization(full)
    assert set(old.factors) == set(cut.factors) and old.joint_groups == cut.joint_groups
    for path, f in cut.factors.items():
        g = old.factors[path]
        assert torch.equal(g.B, f.B) and torch.equal(g.A, f.A) and g.full_rank == f.full_rank
        assert torch.equal(old.energies[path], cut.energies[path])
        h = again.factors[path]
        assert torch.equal(h.B, f.B) and torch.equal(h.A, f.A) and torch.equal(again.energies[path], cut.energies[path])
        if f.bias_shift is not None:
            assert torch.equal(g.bias_delta(3), full.factors[path].bias_delta(3))


def test_the_break_even_rank_is_one_rule(tiny_shapes):
    for method in ("svd", "joint-svd"):
        for unit in tiny_shapes.units(method):
            assert unit.break_even_rank == break_even_rank(unit.d_in, unit.d_out)
            assert unit.params(unit.break_even_rank) <= unit.dense_params < unit.params(unit.break_even_rank + 1)


def test_plans_refuse_ranks_that_save_no_parameters(tiny_shapes):
    unit = next(u for u in tiny_shapes.units("svd") if u.d_in == u.d_out)
    path = unit.paths[0]
    plan = RankPlan.build(tiny_shapes, "svd", {path: unit.break_even_rank})  # as many parameters as dense: allowed
    assert plan.parameters["decoder_linear"]["compressed"] == tiny_shapes.decoder_linear_params
    above = unit.break_even_rank + 1
    with pytest.raises(PlanError, match=rf"Rank {above} for '{path}' saves no parameters.*up to "
                                        rf"{unit.break_even_rank} \(the break-even rank\), or null"):
        RankPlan.build(tiny_shapes, "svd", {path: above})
    document = plan.to_dict()
    document["ranks"][path] = above
    with pytest.raises(PlanError, match="saves no parameters"):
        RankPlan.from_dict(document).for_model(tiny_shapes, allow_other_model=True)
    joint = next(u for u in tiny_shapes.units("joint-svd") if len(u.paths) == 2)
    with pytest.raises(PlanError, match="saves no parameters.*stacked"):
        RankPlan.build(tiny_shapes, "joint-svd", {p: joint.break_even_rank + 1 for p in joint.paths})


@pytest.fixture
def tiny_shapes(store, tiny_model_dirs) -> ModelShapes:
    return ModelShapes.of(load_model(str(tiny_model_dirs["llama"]), store))


# -- the inventory: every artifact with its size, and deleting one ------------------------------------------------

@pytest.fixture
def filled(store, tiny_model_dirs, sample_text_file, tmp_path):
    """A cache with one of each kind of artifact on the tiny llama."""
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    text = str(sample_text_file)
    texts = TextSettings(text, Windowing(16, 4), 2, text, Windowing(16, 2))
    session = CompressionSession.open(store, loaded, "feature-pca", texts)
    sweep_by_type(session, [0.5], ["q"])
    ensure_spectra(store, loaded, session.calibration)
    ensure_baseline_evaluation(store, loaded, text, Windowing(16, 2))
    export_dir = tmp_path / "an-export"
    export_dir.mkdir()
    (export_dir / "model.safetensors").write_bytes(b"x" * 1000)
    store.record_export("export-1", loaded.fingerprint, str(export_dir), {"note": "test"})
    save_arrays(store, "run-1", "recovery", {"scales": torch.ones(8)})
    store.put_record(RecoveryRecord("run-1", loaded.fingerprint, "basis", "{}", "{}", "{}", 3, 96, 1.0, 0, "run-1"))
    (store.cache_dir / "recovery").mkdir(exist_ok=True)
    (store.cache_dir / "recovery" / "run-2.checkpoint.pt").write_bytes(b"c" * 500)
    store.execute("INSERT INTO studies (study_id, name, model_fingerprint, settings_json, state) VALUES "
                  "('study-1', 'study-1', ?, '{}', 'finished')", [loaded.fingerprint])
    save_arrays(store, "stray", "factorization", {"x": torch.zeros(4)})  # a file no record uses
    return store, loaded, session, export_dir


def test_every_artifact_is_listed_with_its_size_on_disk(filled):
    store, loaded, session, export_dir = filled
    artifacts = cached_artifacts(store)
    kinds = {a.kind for a in artifacts}
    assert kinds == set(ARTIFACT_KINDS) - {"mlp-sweep", "model"}  # no MLP sweep; the model is read in place
    indexed = {row[0]: row[1] for row in store.fetch_all("SELECT array_id, relpath FROM arrays")}
    for a in artifacts:
        assert a.artifact_id == f"{a.kind}:{a.key}" and find_artifact(store, a.artifact_id) == a
        assert a.n_bytes == sum((store.cache_dir / f).stat().st_size for f in a.files)
        assert a.on_delete
    by_kind = {}
    for a in artifacts:
        by_kind.setdefault(a.kind, []).append(a)
    [calibration] = by_kind["calibration"]
    assert calibration.key == session.calibration.record.calibration_id
    assert calibration.files == (indexed[calibration.key],) and calibration.n_bytes > 0
    assert calibration.model == loaded.model_id and calibration.texts == "sample"
    assert "1 factorisation(s)" in calibration.on_delete and "feature spectra" in calibration.on_delete
    [factorization] = by_kind["factorization"]
    assert "earlier full form" not in factorization.description + calibration.description
    assert factorization.key == session.factorization_record.factorization_id and factorization.texts == "sample"
    assert len(by_kind["windows"]) == 2 and {a.texts for a in by_kind["windows"]} == {"sample"}
    assert {a.description for a in by_kind["windows"]} == {"token windows: 4 × 16 tokens", "token windows: 2 × 16 tokens"}
    assert [a.key for a in by_kind["array"]] == ["stray"]
    assert by_kind["recovery-checkpoint"][0].n_bytes == 500
    [export] = by_kind["export"]
    assert export.n_bytes == 0 and str(export_dir) in export.description  # outside the cache: not counted
    assert not by_kind["study"][0].deletable
    assert sum(a.n_bytes for a in artifacts) == sum(
        (store.cache_dir / p).stat().st_size for p in indexed.values()) + 500  # arrays and the checkpoint
    mine = cached_artifacts(store, loaded.fingerprint)
    assert {a.kind for a in mine} == kinds - {"windows", "array", "recovery-checkpoint"}
    assert cached_artifacts(store, "another-model") == []


def test_forgetting_removes_rows_and_files_and_what_remains_still_works(filled, monkeypatch):
    store, loaded, session, export_dir = filled
    texts = session.texts
    calibration = find_artifact(store, "calibration:")
    path = store.cache_dir / calibration.files[0]
    report = forget_artifact(store, calibration.artifact_id[:16])  # a unique start of the id is enough
    assert report.files_deleted == calibration.files and report.bytes_freed == calibration.n_bytes > 0
    assert report.rows_deleted == 2  # the record and its array entry
    assert not path.exists() and store.array_entry(calibration.key) is None
    assert store.fetch_one("SELECT count(*) FROM calibrations")[0] == 0
    assert {a.kind for a in cached_artifacts(store)} >= {"factorization", "feature-spectra"}  # stored separately
    # a new session computes the calibration again and reads the factors, which were not touched
    monkeypatch.setattr(factorization_cache, "get_method",
                        lambda name: type("Spec", (), {"needs": "covariance",
                                                       "factorize": lambda *a: pytest.fail("recomputed")})())
    again = CompressionSession.open(store, loaded, "feature-pca", texts)
    monkeypatch.undo()
    _assert_identical(again.calibration.statistics, session.calibration.statistics)
    plan = session.uniform_plan(0.3)
    assert again.evaluate(plan).metrics == session.evaluate(plan).metrics
    # the factorisation: gone from disk, the session holding it still evaluates, and a new one computes it again
    factorization = find_artifact(store, "factorization:")
    forget_artifact(store, factorization.artifact_id)
    assert not (store.cache_dir / factorization.files[0]).exists()
    assert again.evaluate(plan).metrics == session.evaluate(plan).metrics
    third = CompressionSession.open(store, loaded, "feature-pca", texts)
    assert third.evaluate(plan).metrics == session.evaluate(plan).metrics
    # a sweep's points, an export record (its directory stays), windows, a stray file, a checkpoint
    sweep = find_artifact(store, "sweep:")
    forget_artifact(store, sweep.artifact_id)
    assert store.sensitivity_points(sweep.key) == []
    forget_artifact(store, "export:export-1")
    assert store.exports() == [] and (export_dir / "model.safetensors").is_file()
    for kind in ("windows", "array", "recovery-checkpoint", "recovery", "evaluation", "weight-spectra"):
        for artifact in [a for a in cached_artifacts(store) if a.kind == kind]:
            forget_artifact(store, artifact.artifact_id)
            assert not any((store.cache_dir / f).exists() for f in artifact.files)
    assert {a.kind for a in cached_artifacts(store)} == {"calibration", "factorization", "reference",
                                                         "feature-spectra", "study"}
    with pytest.raises(StoreError, match="not deleted here.*work, not a cache"):
        forget_artifact(store, "study:study-1")
    with pytest.raises(StoreError, match="No cached artifact has the id 'calibration:nope'"):
        forget_artifact(store, "calibration:nope")
    with pytest.raises(StoreError, match="'f' names 2 cached artifacts.*factorization:.*feature-spectra:"):
        find_artifact(store, "f")


def test_an_array_file_another_record_reads_is_kept(store):
    save_arrays(store, "shared", "calibration", {"x": torch.zeros(3)})
    for key in ("a", "b"):
        store.execute("INSERT INTO calibrations VALUES (?, 'm', 't', 16, 4, 2, false, 64, 'shared', 1.0, "
                      "current_timestamp)", [key])
    first = forget_artifact(store, "calibration:a")
    assert first.files_deleted == () and store.array_entry("shared") is not None
    second = forget_artifact(store, "calibration:b")
    assert second.files_deleted == ("arrays/calibration/shared.safetensors",)
    assert cached_artifacts(store) == []


def test_the_cache_commands_list_and_forget(filled):
    from engine.cli import app

    store, _, _, _ = filled
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "list", "--json", "--kind", "windows"])
    assert listed.exit_code == 0, listed.output
    document = json.loads(listed.stdout)
    assert [a["kind"] for a in document["artifacts"]] == ["windows", "windows"]
    assert document["total_bytes"] == sum(a["bytes"] for a in document["artifacts"]) > 0
    text = runner.invoke(app, ["cache", "list"])
    assert text.exit_code == 0 and "on disk" in text.stdout and "calibration:" in text.stdout
    target = document["artifacts"][0]["id"]
    refused = runner.invoke(app, ["cache", "forget", target], input="n\n")
    assert refused.exit_code == 1 and "Tokenised again" in refused.output
    assert find_artifact(store, target)
    done = runner.invoke(app, ["cache", "forget", target, "--yes", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["deleted"][0]["id"] == target
    with pytest.raises(StoreError):
        find_artifact(store, target)
    kept = runner.invoke(app, ["cache", "forget", "study:study-1", "--yes"])
    assert kept.exit_code == 2 and "not deleted here" in kept.output
    bad = runner.invoke(app, ["cache", "list", "--kind", "nonsense"])
    assert bad.exit_code == 2 and "Unknown kind(s) nonsense" in bad.output


def test_the_model_page_lists_the_cache_and_deletes_only_after_confirmation(workbench):
    from engine.records import CalibrationRecord
    from engine.store import open_store
    from tests.app_testing import open_app

    store = open_store()
    loaded = load_model(str(workbench["model"]), store)
    texts = workbench["texts"]
    calibration = ensure_calibration(store, loaded, texts.calibration_text, texts.calibration_windowing,
                                     texts.n_groups)
    at = open_app()
    mine = cached_artifacts(store, loaded.fingerprint)
    metric = {m.label: m.value for m in at.metric}
    assert metric["Artifacts"] == str(len(mine)) and calibration.record.calibration_id in {a.key for a in mine}
    total = sum(a.n_bytes for a in mine)
    assert metric["On disk"] == f"{total / 1e3:,.2f} kB" and total > 0
    target = f"calibration:{calibration.record.calibration_id}"
    path = store.cache_dir / find_artifact(store, target).files[0]
    at.radio(key="cache_scope").set_value("the whole cache").run()
    assert {m.label: m.value for m in at.metric}["Artifacts"] == str(len(cached_artifacts(store)))
    assert any(o.startswith("calibration: calibration statistics") for o in at.multiselect(key="cache_selection_0").options)
    at.multiselect(key="cache_selection_0").set_value([target]).run()
    at.button(key="cache_delete").click().run()
    warning = " ".join(w.value for w in at.warning)
    assert "Delete these 1 artifact(s)" in warning
    assert "the next time a data-aware method" in " ".join(m.value for m in at.markdown)
    assert path.is_file() and store.get_record(CalibrationRecord, calibration.record.calibration_id)  # not yet
    at.button(key="cache_confirm").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not path.exists() and store.get_record(CalibrationRecord, calibration.record.calibration_id) is None
    assert any("Deleted 1 artifact(s)" in s.value for s in at.success)
    options = at.multiselect(key="cache_selection_1").options  # a fresh selection, without the deleted one
    assert options and not any(o.startswith("calibration:") for o in options)
