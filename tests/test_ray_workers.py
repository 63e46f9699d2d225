"""Sweeps and studies on a real local Ray cluster (2 workers, one CPU each) store exactly what serial runs store.

The tiny llama and windows of tests/test_search.py. Each worker loads its own replica of the model from the
directory and gets the factors, windows and reference once; the driver stores every result. Floating-point
results may differ in the last bits between a worker's one torch thread and this process, hence the tolerances.
"""

from __future__ import annotations

import pytest

from engine.compression.evaluators import EvaluationTask, SerialEvaluator
from engine.compression.sweep import sweep_by_type, sweep_id
from engine.errors import RankScopeError
from engine.search.records import InMemoryStudyStorage, TrialKind
from engine.search.runner import StudyRunner, create_study
from engine.workers import RayEvaluator, open_evaluator
from tests.test_search import _open_session, _settings, long_text, session  # noqa: F401  (fixtures)

ray = pytest.importorskip("ray")
REL = 1e-6


@pytest.fixture(scope="module")
def local_ray():
    import os

    os.environ.setdefault("RAY_worker_niceness", "0")  # as RayEvaluator starts one: workers at normal priority
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _close(a, b, what) -> None:
    # a KL near 0 is a difference of nearly equal log-probabilities: absolute agreement is what float32 allows
    assert a == pytest.approx(b, rel=REL, abs=1e-7), what


def test_bad_pool_settings_are_refused_clearly(session):
    with pytest.raises(RankScopeError, match="--workers must be at least 1"):
        open_evaluator(session, workers=0)
    assert isinstance(open_evaluator(session, workers=1), SerialEvaluator)
    with pytest.raises(RankScopeError, match="Could not join the Ray cluster at '127.0.0.1:1': nothing answers"):
        RayEvaluator(session, 2, address="127.0.0.1:1")
    with pytest.raises(RankScopeError, match="must be host:port"):
        RayEvaluator(session, 2, address="somewhere")


def test_a_sweep_on_two_workers_stores_what_the_serial_sweep_stores(local_ray, session, store, tiny_model_dirs,
                                                                    long_text, tmp_path, monkeypatch):
    serial = sweep_by_type(session, (0.25, 0.5))
    # the same sweep in another cache, on the pool
    monkeypatch.setenv("RANKSCOPE_CACHE", str(tmp_path / "parallel-cache"))
    from engine.store import open_store

    other = _open_session(open_store(), tiny_model_dirs["llama"], long_text)
    pool = RayEvaluator(other, 2)
    try:
        parallel = sweep_by_type(other, (0.25, 0.5), evaluator=pool)
        assert sweep_by_type(other, (0.25, 0.5), evaluator=pool) == parallel  # a rerun measures nothing again
    finally:
        pool.close()
    assert sweep_id(other) == sweep_id(session)
    assert [(p.linear_type, p.ratio, p.decoder_params) for p in parallel] == \
        [(p.linear_type, p.ratio, p.decoder_params) for p in serial]
    for a, b in zip(parallel, serial):
        for name in ("perplexity", "kl_forward", "kl_reverse"):
            _close(getattr(a, name), getattr(b, name), (a.linear_type, a.ratio, name))


def test_a_study_on_two_workers_stores_the_trials_the_serial_run_stores(local_ray, session):
    sweep_by_type(session, (0.2, 0.4, 0.6))  # greedy and the global allocation join, as priors
    settings = _settings(session, n_trials=6, n_initial_points=2, batch=2)
    serial = InMemoryStudyStorage()
    create_study(serial, session, settings, name="s")
    StudyRunner(serial, session, "s").run()
    parallel = InMemoryStudyStorage()
    create_study(parallel, session, settings, name="p")
    pool = RayEvaluator(session, 2)
    seen = []
    try:
        StudyRunner(parallel, session, "p", evaluator=pool, on_trial=lambda t: seen.append(t.number)).run()
    finally:
        pool.close()
    a, b = serial.trials("s"), parallel.trials("p")
    assert [(t.number, t.kind, t.label, t.ranks) for t in a] == [(t.number, t.kind, t.label, t.ranks) for t in b]
    assert seen == sorted(seen)  # stored (and shown) in trial order, whatever order the workers finish in
    assert any(t.extra.get("proposal") == "local" for t in b)  # the model phase ran, in batches of 2
    for x, y in zip(a, b):
        _close(x.objective, y.objective, x.label)
    assert set(parallel.results("p")) == set(serial.results("s"))


def test_a_worker_that_dies_has_its_task_retried(local_ray, session, tmp_path):
    marker = tmp_path / "died"
    pool = RayEvaluator(session, 2, die_once=str(marker))
    try:
        tasks = [EvaluationTask(i, {p: 8 for p in list(session.factorization.factors)[:i + 1]}) for i in range(3)]
        results = {e.task.key: e.result for e in pool.map_unordered(tasks)}
    finally:
        pool.close()
    assert marker.exists()  # a worker did die, in its first task
    expected = {t.key: session.evaluate_ranks(t.ranks) for t in tasks}
    assert set(results) == {0, 1, 2}
    for key, result in results.items():
        _close(result.perplexity, expected[key].perplexity, key)
