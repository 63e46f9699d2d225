"""Process-wide resources for the app, cached by plain ids: store, models, guards, jobs, sessions.

Caching decorators live only here (STYLE.md: cache resources, not tensors). The store is keyed by
its database path, so pointing `RANKSCOPE_CACHE` elsewhere (as tests do) gives a fresh store; a
model by its reference, that path, and the device and dtype it runs in. The default model is
`$RANKSCOPE_MODEL` when set (tests point it at a tiny model), else the embedded SmolLM2-135M.
"""

from __future__ import annotations

import os

import streamlit as st

from app.jobs import JobBoard, ModelGuard
from app.sessions import SessionPool
from engine.compression.units import ModelShapes
from engine.models.device import Placement
from engine.models.loading import LoadedModel, load_model
from engine.models.registry import DEFAULT_MODEL
from engine.paths import database_path
from engine.store import Store, open_store


def default_model_reference() -> str:
    return os.environ.get("RANKSCOPE_MODEL", DEFAULT_MODEL)


def current_database() -> str:
    """The database path of this process's cache (`$RANKSCOPE_CACHE/rankscope.duckdb`)."""
    return str(database_path())


def current_store() -> Store:
    return get_store(current_database())


@st.cache_resource(show_spinner=False)
def get_store(database: str) -> Store:
    return open_store(database)


@st.cache_resource(show_spinner="Loading model...", max_entries=2)
def get_model(reference: str, database: str, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """The model on a resolved device (`cpu`, `cuda:N`; `engine.models.device.resolve_placement`) in `dtype`."""
    loaded = load_model(reference, get_store(database), placement=Placement(device, dtype))
    model_shapes(loaded)  # read now, while no job can have compressed the model in place
    return loaded


def model_shapes(loaded: LoadedModel) -> ModelShapes:
    """The model's decoder-linear shapes and parameter totals, read once per model.

    Jobs compress the shared model in place while they evaluate, so counting its parameters on a
    page rerun could count factors instead of the dense matrices; `get_model` fills this cache right
    after loading, before any job can run.
    """
    return _shapes(loaded.fingerprint, loaded)


@st.cache_resource(show_spinner=False, max_entries=4)
def _shapes(model_fingerprint: str, _loaded: LoadedModel) -> ModelShapes:
    return ModelShapes.of(_loaded)


@st.cache_resource(show_spinner=False)
def get_model_guard(model_fingerprint: str) -> ModelGuard:
    return ModelGuard()


@st.cache_resource(show_spinner=False)
def get_job_board() -> JobBoard:
    return JobBoard()


@st.cache_resource(show_spinner=False)
def get_session_pool() -> SessionPool:
    return SessionPool()
