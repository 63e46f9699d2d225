"""Draw engine progress events as a Streamlit progress bar with counts and time left."""

from __future__ import annotations

import streamlit as st

from engine.progress import ProgressCallback, ProgressEvent


def progress_bar(label: str) -> ProgressCallback:
    """A progress callback that renders into a new `st.progress` element."""
    bar = st.progress(0.0, text=label)

    def update(event: ProgressEvent) -> None:
        bar.progress(event.fraction, text=event.describe())

    return update
