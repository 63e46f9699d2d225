"""A cache written by RankScope 0.1.0 (tests/fixtures/release-0.1.0) still reads with this version.

The fixture was made with the release's own code (tests/fixtures/make_release_cache.py at commit
37ce152) on the tiny llama: a calibration, spectra, a baseline evaluation, a feature-pca
factorisation and reference distribution, a per-type sweep, a finished study and an export
record. Each check below finds a stored artifact under the key this version computes and reads
it instead of computing it again (the compute functions are made to fail), except the reference
distribution, which 0.2 replaced on purpose (exact KL) and so computes anew.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from engine.cache import calibration as calibration_cache
from engine.cache import factorization as factorization_cache
from engine.cache import reference as reference_cache
from engine.cache.calibration import ensure_calibration
from engine.cache.evaluation import ensure_baseline_evaluation
from engine.cache.lookups import find_calibration, stored_spectra
from engine.compression.plan import RankPlan
from engine.compression.session import CompressionSession
from engine.compression.sweep import sweep_id
from engine.errors import RankScopeError
from engine.models.loading import load_model
from engine.search.duckdb_storage import DuckDBStudyStorage
from engine.search.records import StudyState
from engine.search.runner import StudyRunner
from engine.search.settings import StudySettings
from engine.store import open_store
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.1.0"


@pytest.fixture
def release(isolated_cache, tmp_path):
    """The fixture's cache unpacked into this test's cache folder, its model and text beside it."""
    shutil.copytree(FIXTURE / "cache" / "arrays", isolated_cache / "arrays")
    with gzip.open(FIXTURE / "cache" / "rankscope.duckdb.gz", "rb") as packed, \
            (isolated_cache / "rankscope.duckdb").open("wb") as database:
        shutil.copyfileobj(packed, database)
    shutil.copytree(FIXTURE / "model", tmp_path / "model")
    shutil.copy(FIXTURE / "text.txt", tmp_path / "text.txt")
    store = open_store()
    loaded = load_model(str(tmp_path / "model"), store)
    text = str(tmp_path / "text.txt")
    texts = TextSettings(text, Windowing(32, 16), 4, text, Windowing(32, 4))
    return store, loaded, texts


def _must_not_run(*_args, **_kwargs):
    raise AssertionError("recomputed an artifact the release cache holds")


def test_the_release_database_migrates_and_keeps_its_rows(release):
    store, loaded, _ = release
    assert store.schema_version >= 3
    assert [m["fingerprint"] for m in store.models()] == [loaded.fingerprint]  # the model content matches
    counts = {table: store.fetch_one(f"SELECT count(*) FROM {table}")[0]
              for table in ("calibrations", "evaluations", "factorizations", "reference_distributions",
                            "sensitivity_points", "studies", "trials", "exports", "weight_spectra", "feature_spectra")}
    assert all(counts.values()), counts
    assert counts["sensitivity_points"] == 2 * 7  # two ratios for each of the seven types


def test_calibration_spectra_and_baseline_are_read_not_recomputed(release, monkeypatch):
    store, loaded, texts = release
    monkeypatch.setattr(calibration_cache, "collect_statistics", _must_not_run)
    from engine.cache import evaluation as evaluation_cache

    monkeypatch.setattr(evaluation_cache, "evaluate_perplexity", _must_not_run)
    record = find_calibration(store, loaded.fingerprint, texts.calibration_text, texts.calibration_windowing, 4)
    assert record is not None and record.n_windows == 16
    calibration = ensure_calibration(store, loaded, texts.calibration_text, texts.calibration_windowing, 4)
    assert calibration.from_cache and calibration.record == record
    assert stored_spectra(store, loaded.fingerprint, record.calibration_id) is not None
    baseline = ensure_baseline_evaluation(store, loaded, texts.evaluation_text, texts.evaluation_windowing)
    assert baseline.n_windows == 4 and baseline.perplexity > 1


def test_a_session_reuses_the_release_factors_but_not_its_approximate_kl(release, monkeypatch):
    """Calibration and factors are read back; the 0.1.0 reference (top-k KL) is not: the reference is
    computed again as final hidden states (exact KL), and the old sweep's approximate points are kept
    in the store but never mixed into a sweep with exact KL."""
    store, loaded, texts = release
    monkeypatch.setattr(calibration_cache, "collect_statistics", _must_not_run)
    computed = []
    real_compute_reference = reference_cache.compute_reference
    monkeypatch.setattr(reference_cache, "compute_reference",
                        lambda *a, **k: computed.append(1) or real_compute_reference(*a, **k))
    old_sweeps = store.fetch_all("SELECT sweep_id FROM sweeps")
    session = CompressionSession.open(store, loaded, "feature-pca", texts)
    assert computed == [1] and session.reference_record.kind == "final-hidden"
    assert store.fetch_one("SELECT count(*) FROM reference_distributions WHERE kind = 'top-k'")[0] == 2
    monkeypatch.setattr(factorization_cache, "get_method", _must_not_run)  # the factors came from the cache
    assert sweep_id(session) not in {row[0] for row in old_sweeps}
    assert store.sensitivity_points(sweep_id(session)) == []
    assert store.sensitivity_points(old_sweeps[0][0])  # the release's points are still there
    saved = RankPlan.load(FIXTURE / "plan.json")
    assert session.evaluate(saved).metrics["perplexity"] == pytest.approx(saved.metrics["perplexity"], rel=1e-5)


def test_the_release_study_loads_with_typed_texts_and_resumes_at_once(release):
    store, loaded, texts = release
    storage = DuckDBStudyStorage(store)
    record = storage.get_study("release-study")
    assert record.state == StudyState.FINISHED and record.settings["version"] == 1
    settings = StudySettings.from_dict(record.settings)  # the flat 0.1.0 form read as TextSettings
    assert Path(settings.texts.calibration_text).name == Path(settings.texts.evaluation_text).name == "text.txt"
    assert replace(settings.texts, calibration_text=texts.calibration_text, evaluation_text=texts.evaluation_text) == texts
    trials = storage.trials("release-study")
    session = CompressionSession.open(store, loaded, "feature-pca", texts)  # the same text, copied
    StudyRunner(storage, session, "release-study").run()  # replays the stored trials, adds none
    assert storage.trials("release-study") == trials
    assert [e["path"] for e in store.exports(loaded.fingerprint)]  # the export record is listed


def test_an_unfinished_release_study_is_not_resumed_with_another_kl(release):
    store, loaded, texts = release
    storage = DuckDBStudyStorage(store)
    store.execute("UPDATE studies SET state = 'stopped' WHERE study_id = 'release-study'")
    store.execute("DELETE FROM study_results WHERE study_id = 'release-study'")
    session = CompressionSession.open(store, loaded, "feature-pca", texts)
    trials = storage.trials("release-study")
    with pytest.raises(RankScopeError, match="top-k estimate of KL.*--warm-start-study release-study"):
        StudyRunner(storage, session, "release-study").run()
    assert storage.trials("release-study") == trials
