"""The artifact cache: `get_or_compute` for records and arrays, cached token windows, and cache keys."""

from __future__ import annotations

import pytest
import torch

from engine.cache import keys
from engine.cache import windows as windows_cache
from engine.cache.artifacts import Cached, Computed, get_or_compute
from engine.cache.windows import ensure_windows
from engine.hashing import sha256_json
from engine.models.loading import load_model
from engine.records import EvaluationRecord, FactorizationRecord
from engine.store.duckdb_store import Store
from engine.texts.corpus import load_corpus, text_fingerprint
from engine.texts.windows import Windowing, make_windows

KEY = "a" * 32
FACTORS = {"U": torch.arange(12, dtype=torch.float32).view(4, 3), "S": torch.tensor([3.0, 2.0, 1.0])}


class Counter:
    """A compute step that counts its calls and stores a factorisation record and arrays."""

    def __init__(self, key: str = KEY, record: bool = True, tensors: bool = True):
        self.key, self.with_record, self.with_tensors, self.calls = key, record, tensors, 0

    def __call__(self) -> Computed:
        self.calls += 1
        record = FactorizationRecord(self.key, "fp", "svd", "", self.key, float(self.calls)) if self.with_record else None
        tensors = {name: t.clone() for name, t in FACTORS.items()} if self.with_tensors else None
        return Computed("value", record=record, tensors=tensors, metadata={"call": str(self.calls)})


def _load(record, tensors, metadata):
    return {"record": record, "tensors": tensors, "metadata": metadata}


def _factorization(store, compute: Counter) -> Cached:
    return get_or_compute(store, "factorizations", compute.key, compute, _load, FactorizationRecord)


def _array_path(store, key: str = KEY):
    return store.cache_dir / store.array_entry(key)["relpath"]


def test_record_and_arrays_are_computed_once_then_loaded(store):
    """The first call computes and stores record and arrays; the second loads both without computing."""
    compute = Counter()
    first = _factorization(store, compute)
    assert first.from_cache is False and first.value == "value" and compute.calls == 1
    assert first.record == FactorizationRecord(KEY, "fp", "svd", "", KEY, 1.0)
    assert store.get_record(FactorizationRecord, KEY) == first.record
    assert _array_path(store).is_file()

    second = _factorization(store, compute)
    assert second.from_cache is True and compute.calls == 1
    assert second.record == first.record
    assert set(second.value["tensors"]) == {"U", "S"}
    for name, tensor in FACTORS.items():
        assert torch.equal(second.value["tensors"][name], tensor)
    assert second.value["metadata"] == {"call": "1"}
    assert second.value["record"] == first.record


def test_deleted_array_file_is_recomputed_and_record_stored_again(store):
    """A record whose array file was deleted is forgotten; the artifact is computed and stored anew."""
    compute = Counter()
    _factorization(store, compute)
    _array_path(store).unlink()

    again = _factorization(store, compute)
    assert again.from_cache is False and compute.calls == 2
    assert again.record.seconds == 2.0
    assert store.get_record(FactorizationRecord, KEY) == again.record  # the new record, not the old one
    assert _array_path(store).is_file()

    third = _factorization(store, compute)
    assert third.from_cache is True and compute.calls == 2
    assert third.value["metadata"] == {"call": "2"}


@pytest.mark.parametrize("damage", ["truncate", "same-size garbage", "empty"])
def test_damaged_array_file_is_recomputed_not_a_crash(store, damage):
    """A truncated, emptied or overwritten array file is a cache miss: the artifact is computed again."""
    compute = Counter()
    _factorization(store, compute)
    path = _array_path(store)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\xff" * len(data))  # same size: only safetensors' own parsing can tell

    again = _factorization(store, compute)
    assert again.from_cache is False and compute.calls == 2
    assert store.get_record(FactorizationRecord, KEY).seconds == 2.0
    assert store.array_entry(KEY)["n_bytes"] == path.stat().st_size > 0
    loaded = _factorization(store, compute)
    assert loaded.from_cache is True and compute.calls == 2
    assert torch.equal(loaded.value["tensors"]["U"], FACTORS["U"])


def test_record_only_artifact_writes_no_array_file(store):
    """With arrays=False the record is the whole artifact: computed once, read back, no array file."""
    record = EvaluationRecord(KEY, "fp", "tf", 16, 4, False, 12.5, 2.5, 60, [2.5, 2.625, 2.375, 2.5], 0.25)
    calls = []

    def compute() -> Computed:
        calls.append(1)
        return Computed(record.perplexity, record=record, tensors={"ignored": torch.ones(2)})

    def load(stored, tensors, metadata):
        assert tensors is None and metadata == {}
        return stored.perplexity

    first = get_or_compute(store, "evaluations", KEY, compute, load, EvaluationRecord, arrays=False)
    second = get_or_compute(store, "evaluations", KEY, compute, load, EvaluationRecord, arrays=False)
    assert (first.from_cache, second.from_cache) == (False, True)
    assert len(calls) == 1
    assert second.value == 12.5 and second.record == record
    assert store.array_entry(KEY) is None
    assert not (store.cache_dir / "arrays").exists()


def test_array_only_artifact_is_stored_under_its_kind(store):
    """With no record type the artifact is the file arrays/<kind>/<key>.safetensors below the store."""
    compute = Counter(record=False)
    first = get_or_compute(store, "spectra-test", KEY, compute, _load)
    assert first.from_cache is False and first.record is None
    entry = store.array_entry(KEY)
    assert entry["kind"] == "spectra-test"
    assert store.cache_dir / entry["relpath"] == store.cache_dir / "arrays" / "spectra-test" / f"{KEY}.safetensors"
    assert (store.cache_dir / "arrays" / "spectra-test" / f"{KEY}.safetensors").is_file()

    second = get_or_compute(store, "spectra-test", KEY, compute, _load)
    assert second.from_cache is True and compute.calls == 1 and second.record is None
    assert torch.equal(second.value["tensors"]["S"], FACTORS["S"])


def test_arrays_live_beside_the_stores_own_database(tmp_path, isolated_cache):
    """A store opened on another database writes its arrays beside that database, not under $RANKSCOPE_CACHE."""
    other = Store(tmp_path / "other" / "rankscope.duckdb")
    try:
        compute = Counter()
        _factorization(other, compute)
        path = _array_path(other)
        assert path == tmp_path / "other" / "arrays" / "factorizations" / f"{KEY}.safetensors"
        assert path.is_file()
        assert not (isolated_cache / "arrays").exists()
        assert _factorization(other, compute).from_cache is True and compute.calls == 1
    finally:
        other.close()


@pytest.fixture
def tiny_llama(tiny_model_dirs, store):
    return load_model(str(tiny_model_dirs["llama"]), store)


def test_ensure_windows_matches_make_windows_and_is_cached(store, tiny_llama, sample_text_file, monkeypatch):
    """Cached windows equal freshly made ones; the second call does not read the text again."""
    text = str(sample_text_file)
    windowing = Windowing(16, 5)
    expected = make_windows(load_corpus(text), tiny_llama.tokenizer, windowing)

    first = ensure_windows(store, tiny_llama, text, windowing)
    assert first.dtype == torch.int64 and first.shape == (5, 16)
    assert torch.equal(first, expected)
    key = keys.windows_key(tiny_llama.fingerprint, text_fingerprint(text), windowing)
    assert store.array_entry(key)["kind"] == "windows"

    def no_reading(*_args, **_kwargs):
        raise AssertionError("read the text again instead of the cached windows")

    monkeypatch.setattr(windows_cache, "load_corpus", no_reading)
    second = ensure_windows(store, tiny_llama, text, windowing)
    assert second.dtype == torch.int64
    assert torch.equal(second, expected)


def test_windows_of_different_windowings_are_cached_apart(store, tiny_llama, sample_text_file):
    """Each windowing gets its own key and its own cached windows."""
    text = str(sample_text_file)
    windowings = [Windowing(16, 4), Windowing(16, 5), Windowing(32, 4), Windowing(16, 4, 1)]
    fingerprint = text_fingerprint(text)
    window_keys = [keys.windows_key(tiny_llama.fingerprint, fingerprint, w) for w in windowings]
    assert len(set(window_keys)) == len(windowings)

    results = [ensure_windows(store, tiny_llama, text, w) for w in windowings]
    assert [tuple(r.shape) for r in results] == [(4, 16), (5, 16), (4, 32), (4, 16)]
    assert torch.equal(results[1][:4], results[0])
    assert torch.equal(results[3][:3], results[0][1:])  # start_window 1 skips the first window
    assert all(store.array_entry(k) is not None for k in window_keys)
    again = [ensure_windows(store, tiny_llama, text, w) for w in windowings]
    assert all(torch.equal(a, b) for a, b in zip(again, results))


# -- keys ---------------------------------------------------------------------------------------

W = Windowing(512, 128)


def _variants(function, base: tuple, alternatives: dict[int, object]) -> list[str]:
    """The key of `base` followed by the keys with one argument replaced at a time."""
    return [function(*base)] + [function(*(base[:i] + (value,) + base[i + 1:])) for i, value in alternatives.items()]


@pytest.mark.parametrize("function, base, alternatives", [
    (keys.windows_key, ("fp", "tf", W), {0: "fp2", 1: "tf2", 2: Windowing(256, 128)}),
    (keys.calibration_key, ("fp", "tf", W, 32), {0: "fp2", 1: "tf2", 2: Windowing(512, 64), 3: 16}),
    (keys.evaluation_key, ("fp", "tf", Windowing(512, 16)), {0: "fp2", 1: "tf2", 2: Windowing(512, 16, 16)}),
    (keys.factorization_key, ("fp", "feature-pca", "cal"), {0: "fp2", 1: "svd", 2: ""}),
    (keys.reference_key, ("fp", "tf", Windowing(512, 16)), {0: "fp2", 1: "tf2", 2: Windowing(128, 16)}),
    (keys.sweep_key, ("fp", "svd", "fac", "ref"), {0: "fp2", 1: "awsvd", 2: "fac2", 3: "ref2"}),
])
def test_keys_are_deterministic_and_follow_every_input(function, base, alternatives):
    """Equal inputs give equal 32-character keys; changing any one input changes the key."""
    assert function(*base) == function(*base)
    assert len(function(*base)) == keys.KEY_LENGTH == 32
    variants = _variants(function, base, alternatives)
    assert len(set(variants)) == len(variants)


def test_keys_of_different_kinds_differ():
    """Calibration, evaluation, reference and windows keys of the same inputs are distinct."""
    w = Windowing(512, 16)
    found = {keys.windows_key("fp", "tf", w), keys.evaluation_key("fp", "tf", w),
             keys.calibration_key("fp", "tf", w, 32), keys.reference_key("fp", "tf", w)}
    assert len(found) == 4


def test_key_formulas_are_those_of_release_0_1_0():
    """Keys equal RankScope 0.1.0's formulas, so a cache it wrote is still found (the reference's excepted)."""
    assert keys.calibration_key("fp", "tf", Windowing(512, 128), 32) == \
        sha256_json(["calibration", 1, "fp", "tf", 512, 128, 32])[:32]
    assert keys.evaluation_key("fp", "tf", Windowing(512, 16)) == \
        sha256_json(["evaluation", "fp", "tf", 512, 16])[:32]
    assert keys.evaluation_key("fp", "tf", Windowing(512, None)) == \
        sha256_json(["evaluation", "fp", "tf", 512, None])[:32]
    assert keys.factorization_key("fp", "feature-pca", "cal") == \
        sha256_json(["factorization", 1, 1, "fp", "feature-pca", "cal"])[:32]
    assert keys.factorization_key("fp", "svd", "") == sha256_json(["factorization", 1, 1, "fp", "svd", ""])[:32]
    # the reference alone changed on purpose (exact KL from final hidden states): never read a 0.1.0 top-k one
    assert keys.reference_key("fp", "tf", Windowing(512, 16)) == \
        sha256_json(["reference", 2, "fp", "tf", 512, 16])[:32]
    assert keys.reference_key("fp", "tf", Windowing(512, 16)) != sha256_json(["reference", "fp", "tf", 512, 16, 1024])[:32]
    assert keys.sweep_key("fp", "svd", "fac", "ref") == sha256_json(["sweep", "fp", "svd", "fac", "ref"])[:32]
