"""Process-wide resources for the app: the store and loaded models, cached by plain ids.

Caching decorators live only here (STYLE.md: cache resources, not tensors). The default model is
`$RANKSCOPE_MODEL` when set (tests point it at a tiny model), else the embedded SmolLM2-135M.
"""

from __future__ import annotations

import os

import streamlit as st

from engine.models.loading import LoadedModel, load_model
from engine.models.registry import DEFAULT_MODEL
from engine.store import Store, open_store


def default_model_reference() -> str:
    return os.environ.get("RANKSCOPE_MODEL", DEFAULT_MODEL)


@st.cache_resource(show_spinner=False)
def get_store() -> Store:
    return open_store()


@st.cache_resource(show_spinner="Loading model...", max_entries=2)
def get_model(reference: str) -> LoadedModel:
    return load_model(reference, get_store())
