"""Unit tests of the app's job plumbing: the job board and the per-model guard."""

from __future__ import annotations

import threading

import pytest

from app.jobs import JobBoard, JobState, ModelBusy, ModelGuard
from engine.progress import ProgressTracker
from tests.app_testing import guard_held_elsewhere


def test_job_board_reports_progress_errors_and_stops_between_units():
    board = JobBoard()
    release = threading.Event()

    def counting(job):
        tracker = ProgressTracker(job.report, "points", total=50, unit="points")
        for _ in range(50):
            release.wait(5)
            tracker.advance()
        return "finished"

    job = board.start("model/sweep/x/1", "Sweep", counting, resumable=True)
    assert board.start("model/sweep/x/1", "Sweep", counting, resumable=True) is job  # same id joins the running job
    board.stop(job.job_id)
    release.set()
    board.wait(job.job_id, 10)
    assert job.state is JobState.STOPPED and "resume" in job.message
    assert job.event is None or job.event.done < 50  # stopped between units, not after all of them

    def failing(job):
        raise ValueError("boom")

    failed = board.wait(board.start("model/apply/y/2", "Apply", failing).job_id, 10)
    assert failed.state is JobState.FAILED and "ValueError: boom" in failed.message
    assert [j.job_id for j in board.with_prefix("model/")] == ["model/sweep/x/1", "model/apply/y/2"]
    board.forget("model/apply/y/2")
    assert board.get("model/apply/y/2") is None


def test_model_guard_names_its_holder_when_busy():
    guard = ModelGuard()
    with guard_held_elsewhere(guard, "calibrating on 'war-and-peace'"):
        with pytest.raises(ModelBusy, match="calibrating on 'war-and-peace'"):
            with guard.hold("measuring", timeout=0.05):
                pass
    with guard.hold("measuring", timeout=0.05):
        assert guard.holder == "measuring"
    assert guard.holder is None
