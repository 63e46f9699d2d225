"""The study storage contract: the in-memory and DuckDB backends pass the same tests.

Like Optuna's storage tests, one suite runs against every `StudyStorage` implementation: studies
are created once, their state and validation subset change, finished trials are written once and
never changed, and re-measured results are kept per label. The DuckDB backend also keeps all of it
across closing and reopening the store.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from engine.errors import RankScopeError
from engine.search.duckdb_storage import DuckDBStudyStorage
from engine.search.mirror import StudyMirror, restore_studies
from engine.search.records import (
    InMemoryStudyStorage, StudyExistsError, StudyRecord, StudyState, TrialExistsError, TrialKind, TrialRecord,
    is_interrupted, this_process,
)
from engine.store import open_store
from engine.store.duckdb_store import Store

BACKENDS = ("memory", "duckdb")


@pytest.fixture(params=BACKENDS)
def storage(request, isolated_cache):
    if request.param == "memory":
        return InMemoryStudyStorage()
    return DuckDBStudyStorage(open_store())


def _study(study_id: str = "s1", **changes) -> StudyRecord:
    record = StudyRecord(
        study_id=study_id,
        name=f"study {study_id}",
        model_fingerprint="ab" * 32,
        settings={"method": "feature-pca", "grouping": "5x1", "budget": 0.2, "beta": 1.0, "n_trials": 3,
                  "warm_start": None, "texts": {"window_len": 32}},
        state=StudyState.RUNNING,
    )
    return replace(record, **changes)


def _trial(number: int, study_id: str = "s1", kind: TrialKind = TrialKind.SEARCH, **changes) -> TrialRecord:
    # values that survive JSON only if they are written exactly: thirds, tiny KLs, big counts
    trial = TrialRecord(
        study_id=study_id,
        number=number,
        kind=kind,
        label=f"trial {number}",
        values={"qk": 1 / 3 + number, "o": 0.0, "gate": 0.123456789012345},
        projected={"qk": 0.2 / 3 + number, "o": 0.0, "gate": 0.3},
        ranks={"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": None,
               "model.layers.1.mlp.down_proj": 16 + 8 * number},
        objective=math.log(321.5) + 1.25e-5 + number,
        perplexity=321.5 + number,
        kl_forward=1.2490108577279194e-05,
        kl_reverse=1.2510193506210683e-05,
        decoder_params=10_752 - 128 * number,
        total_params=3_000_000_000 + number,  # more than 32 bits
        seconds=0.0158 * (number + 1),
        extra={"note": "x", "window_nll": [1.5, 2.25]},
    )
    return replace(trial, **changes)


def test_created_studies_are_read_back_equal_and_listed(storage):
    first, second = _study("s1"), _study("s2", name="another", settings={"budget": 0.4})
    storage.create_study(first)
    storage.create_study(second)
    assert storage.get_study("s1") == first
    assert storage.get_study("s2") == second
    assert storage.get_study("s2").settings == {"budget": 0.4}
    assert sorted(r.study_id for r in storage.list_studies()) == ["s1", "s2"]
    assert {r.study_id: r for r in storage.list_studies()} == {"s1": first, "s2": second}


def test_unknown_study_reads_as_none_and_empty(storage):
    assert storage.get_study("missing") is None
    assert storage.list_studies() == []
    assert storage.trials("missing") == []
    assert storage.results("missing") == {}


def test_a_second_study_with_the_same_id_is_refused_and_the_first_kept(storage):
    storage.create_study(_study("s1"))
    with pytest.raises(StudyExistsError, match="'s1' already exists"):
        storage.create_study(_study("s1", name="impostor", state=StudyState.FINISHED))
    assert storage.get_study("s1") == _study("s1")
    assert len(storage.list_studies()) == 1


def test_state_and_message_change_and_the_message_clears(storage):
    storage.create_study(_study("s1"))
    storage.create_study(_study("s2"))
    storage.set_state("s1", StudyState.FAILED, "Killed: after 3 trials")
    record = storage.get_study("s1")
    assert record.state is StudyState.FAILED and record.message == "Killed: after 3 trials"
    assert record.settings == _study().settings and record.name == "study s1"
    assert storage.get_study("s2").state is StudyState.RUNNING  # the other study is untouched
    storage.set_state("s1", StudyState.FINISHED)
    record = storage.get_study("s1")
    assert record.state is StudyState.FINISHED and record.message is None


def test_validation_subset_is_stored_whole(storage):
    storage.create_study(_study("s1"))
    validation = {"kind": "sensitive", "windows": [0, 3, 5], "reason": "highest variance",
                  "variance": [0.1, 2 / 3, 0.0],
                  "candidate_windows": {"window_len": 32, "n_windows": 8, "start_window": 4}}
    storage.set_validation("s1", validation)
    record = storage.get_study("s1")
    assert record.validation == validation
    assert record.state is StudyState.RUNNING  # setting the subset leaves the state alone


def test_trials_come_back_equal_in_number_order(storage):
    storage.create_study(_study("s1"))
    storage.create_study(_study("s2"))
    trials = [_trial(0, kind=TrialKind.BASELINE, label="uniform"),
              _trial(1, kind=TrialKind.WARM_START, label="warm start"), _trial(2), _trial(3)]
    for trial in (trials[2], trials[0], trials[3], trials[1]):  # written out of order
        storage.add_trial(trial)
    storage.add_trial(_trial(0, study_id="s2"))
    assert storage.trials("s1") == trials
    assert [t.number for t in storage.trials("s1")] == [0, 1, 2, 3]
    assert [t.kind for t in storage.trials("s1")] == [TrialKind.BASELINE, TrialKind.WARM_START, TrialKind.SEARCH,
                                                      TrialKind.SEARCH]
    assert storage.trials("s2") == [_trial(0, study_id="s2")]
    back = storage.trials("s1")[3]
    assert back.values["qk"] == 1 / 3 + 3 and back.objective == math.log(321.5) + 1.25e-5 + 3
    assert back.ranks["model.layers.0.self_attn.v_proj"] is None and back.total_params == 3_000_000_003


def test_a_trial_is_written_once_and_never_replaced(storage):
    storage.create_study(_study("s1"))
    storage.add_trial(_trial(0))
    with pytest.raises(TrialExistsError, match="Trial 0 of study 's1'"):
        storage.add_trial(_trial(0, objective=-1.0, label="rewritten"))
    assert storage.trials("s1") == [_trial(0)]


def test_returned_records_are_copies(storage):
    """Changing what a read returned does not change what is stored (trials are immutable)."""
    storage.create_study(_study("s1"))
    storage.add_trial(_trial(0))
    storage.put_result("s1", "best", {"trial": 0, "perplexity": 300.0})
    storage.trials("s1")[0].ranks["model.layers.0.self_attn.q_proj"] = 999
    storage.get_study("s1").settings["budget"] = 0.9
    storage.results("s1")["best"]["perplexity"] = 1.0
    assert storage.trials("s1") == [_trial(0)]
    assert storage.get_study("s1") == _study("s1")
    assert storage.results("s1")["best"]["perplexity"] == 300.0


def test_writes_to_an_unknown_study_are_refused(storage):
    with pytest.raises(RankScopeError, match="missing"):
        storage.set_state("missing", StudyState.FINISHED)
    with pytest.raises(RankScopeError, match="missing"):
        storage.set_validation("missing", {"kind": "all", "windows": [0]})
    with pytest.raises(RankScopeError, match="missing"):
        storage.add_trial(_trial(0, study_id="missing"))
    with pytest.raises(RankScopeError, match="missing"):
        storage.put_result("missing", "best", {"trial": 0})
    assert storage.trials("missing") == [] and storage.results("missing") == {}


def test_results_are_kept_per_label_and_replaced(storage):
    storage.create_study(_study("s1"))
    storage.create_study(_study("s2"))
    best = {"trial": 5, "perplexity": 321.8610995756393, "kl_forward": 1.2490108577279194e-05, "tokens": 124}
    storage.put_result("s1", "best", best)
    storage.put_result("s1", "uniform", {"trial": 0, "perplexity": 330.25})
    storage.put_result("s2", "best", {"trial": 1, "perplexity": 1.0})
    assert storage.results("s1") == {"best": best, "uniform": {"trial": 0, "perplexity": 330.25}}
    better = {**best, "trial": 7, "perplexity": 320.0}
    storage.put_result("s1", "best", better)
    assert storage.results("s1") == {"best": better, "uniform": {"trial": 0, "perplexity": 330.25}}
    assert storage.results("s2") == {"best": {"trial": 1, "perplexity": 1.0}}


def test_duckdb_studies_survive_closing_and_reopening_the_store(isolated_cache):
    store = open_store()
    storage = DuckDBStudyStorage(store)
    storage.create_study(_study("s1"))
    storage.set_validation("s1", {"kind": "random", "windows": [1, 2]})
    storage.set_state("s1", StudyState.STOPPED, "stopped after 2 trials")
    trials = [_trial(0, kind=TrialKind.BASELINE, label="lord"), _trial(1), _trial(2)]
    for trial in trials:
        storage.add_trial(trial)
    storage.put_result("s1", "best", {"trial": 2, "perplexity": 323.5})
    expected = storage.get_study("s1")
    store.close()

    reopened = DuckDBStudyStorage(open_store())
    assert reopened.store is not store
    assert reopened.get_study("s1") == expected
    assert expected.state is StudyState.STOPPED and expected.validation == {"kind": "random", "windows": [1, 2]}
    assert reopened.trials("s1") == trials
    assert reopened.results("s1") == {"best": {"trial": 2, "perplexity": 323.5}}
    with pytest.raises(TrialExistsError):  # immutability holds across processes too
        reopened.add_trial(_trial(2))
    reopened.add_trial(_trial(3))  # a resumed study goes on numbering
    assert [t.number for t in reopened.trials("s1")] == [0, 1, 2, 3]


def test_the_running_process_is_recorded_and_cleared(storage):
    storage.create_study(_study("s1"))
    owner = this_process()
    storage.set_state("s1", StudyState.RUNNING, owner=owner)
    assert storage.get_study("s1").owner == owner and not is_interrupted(storage.get_study("s1"))
    storage.set_state("s1", StudyState.STOPPED, "stopped after 1 trials")
    assert storage.get_study("s1").owner is None


def test_a_running_study_whose_process_is_gone_is_interrupted():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = _study("s1", owner={**this_process(), "pid": dead.pid})
    assert is_interrupted(record)
    assert is_interrupted(_study("s1", owner=None))  # stored as running by a version that kept no owner
    assert not is_interrupted(_study("s1", owner=this_process()))  # this process is alive
    assert not is_interrupted(_study("s1", owner={"pid": dead.pid, "host": "another-host"}))  # cannot tell
    assert not is_interrupted(_study("s1", state=StudyState.STOPPED, owner=None))


def _filled(storage) -> None:
    storage.create_study(_study("s1"))
    storage.set_validation("s1", {"kind": "random", "windows": [1, 2]})
    for trial in (_trial(0, kind=TrialKind.BASELINE, label="lord"), _trial(1), _trial(2)):
        storage.add_trial(trial)
    storage.put_result("s1", "best", {"trial": 2, "perplexity": 323.5})
    storage.set_state("s1", StudyState.STOPPED, "stopped after 2 trials")


def test_duckdb_studies_are_mirrored_as_json_a_second_process_can_read(isolated_cache):
    storage = DuckDBStudyStorage(open_store())
    _filled(storage)
    mirror = StudyMirror(isolated_cache / "studies")
    assert (isolated_cache / "studies" / "s1.json").is_file()
    assert mirror.get_study("s1") == storage.get_study("s1")
    assert mirror.trials("s1") == storage.trials("s1") and mirror.results("s1") == storage.results("s1")
    assert [r.study_id for r in mirror.list_studies()] == ["s1"] and mirror.get_study("nope") is None


def test_studies_come_back_from_their_files_into_a_fresh_database(isolated_cache, tmp_path):
    storage = DuckDBStudyStorage(open_store())
    _filled(storage)
    expected = (storage.get_study("s1"), storage.trials("s1"), storage.results("s1"))
    fresh_store = Store(tmp_path / "fresh" / "rankscope.duckdb")
    try:
        shutil.copytree(isolated_cache / "studies", tmp_path / "fresh" / "studies")
        fresh = DuckDBStudyStorage(fresh_store)
        assert fresh.get_study("s1") is None
        assert restore_studies(fresh, fresh.mirror) == ["s1"]
        assert (fresh.get_study("s1"), fresh.trials("s1"), fresh.results("s1")) == expected
        assert restore_studies(fresh, fresh.mirror) == []  # nothing twice
    finally:
        fresh_store.close()
