"""Draw engine progress: a progress bar for work on the script thread, a live panel for background jobs.

`progress_bar` maps engine `ProgressEvent`s onto `st.progress` with counts and time left.
`watch_job` shows a background job (see `app.jobs`): while it runs, a fragment polls the board once
a second and redraws its bar, with a Stop button; when it ends, the whole page reruns once so it
can read the new results from the store. A failed job shows its message with `st.error`.
"""

from __future__ import annotations

import streamlit as st

from app.jobs import Job, JobState
from app.resources import get_job_board
from engine.progress import ProgressCallback, ProgressEvent

POLL_SECONDS = 1.0


def progress_bar(label: str) -> ProgressCallback:
    """A progress callback that renders into a new `st.progress` element."""
    bar = st.progress(0.0, text=label)

    def update(event: ProgressEvent) -> None:
        bar.progress(event.fraction, text=event.describe())

    return update


def _draw_running(job: Job) -> None:
    event = job.event
    if event is None:
        st.progress(0.0, text=f"{job.label}: starting...")
    else:
        st.progress(event.fraction, text=f"{job.label} · {event.describe()}")


@st.fragment(run_every=POLL_SECONDS)
def _live_job(job_id: str, stoppable: bool) -> None:
    board = get_job_board()
    job = board.get(job_id)
    if job is None or not job.running:
        st.rerun(scope="app")
    _draw_running(job)
    if stoppable:
        if job.stop_requested:
            st.caption("Stopping after the current step...")
        elif st.button("Stop", key=f"stop-{job_id}"):
            board.stop(job_id)


def watch_job(job_id: str, stoppable: bool = False, what_to_do: str = "") -> Job | None:
    """Show the job with this id: live progress while running, its error or stop message when ended.

    Returns the job (None when there is none) so the page can read `job.result` once it is done.
    """
    board = get_job_board()
    job = board.get(job_id)
    if job is None:
        return None
    if job.running:
        _live_job(job_id, stoppable)
    elif job.state is JobState.FAILED:
        st.error(f"{job.label} failed: {job.message} {what_to_do}".strip())
        if st.button("Dismiss", key=f"dismiss-{job_id}"):
            board.forget(job_id)
            st.rerun()
    elif job.state is JobState.STOPPED:
        st.warning(job.message)
    return job
