"""Rank plans in the browser session: the saved plans the pages share, and checked plan uploads.

Saved plans live in the browser session (`st.session_state`), by name, as plan dicts; the Allocate
page saves them, the Search page adds a study's best plan, and the Export page exports them. Each
saved plan is also written next to the cache database (`engine.compression.plan_shelf`), and a new
browser session starts with the plans found there, so a restarted app loses none.
An upload is refused with a reason (not UTF-8, not JSON, another schema, a plan for another model,
a plan whose parameter counts are not what its ranks give, a plan that compresses nothing). Every
plan a page shows or passes on comes through `RankPlan.for_model`, so its numbers are the model's.
"""

from __future__ import annotations

from typing import Optional

import streamlit as st

from app.resources import current_store
from engine.compression.plan import RankPlan
from engine.compression.plan_shelf import PlanShelf
from engine.compression.units import ModelShapes
from engine.errors import RankScopeError

SAVED_PLANS = "alloc_saved_plans"  # name -> plan dict


def saved_plans() -> dict[str, dict]:
    """The saved plans of this browser session (shared with the Allocate page), name -> plan dict; a new session
    starts with the plans saved next to the cache."""
    if SAVED_PLANS not in st.session_state:
        st.session_state[SAVED_PLANS] = {name: plan.to_dict() for name, plan in _shelf().load().items()}
    return st.session_state[SAVED_PLANS]


def save_plan(name: str, plan: RankPlan) -> None:
    """Keep `plan` under `name` in this session and on the shelf next to the cache (once: a page may call this on
    every rerun)."""
    data = plan.to_dict()
    if saved_plans().get(name) != data:
        saved_plans()[name] = data
        _shelf().save(name, plan)


def _shelf() -> PlanShelf:
    return PlanShelf(current_store().cache_dir)


def plans_for_model(shapes: ModelShapes) -> dict[str, RankPlan]:
    """The saved plans made for this model, by name, each checked against it (`st.warning` for one that fails)."""
    plans = {}
    for name, data in saved_plans().items():
        if data.get("model", {}).get("fingerprint") != shapes.fingerprint:
            continue
        try:
            plans[name] = RankPlan.from_dict(data).for_model(shapes)
        except RankScopeError as exc:  # a PlanError, or a PruningError for a v2 plan's pruning section
            st.warning(f"Saved plan '{name}' is left out: {exc}")
    return plans


def read_uploaded_plan(upload, shapes: ModelShapes) -> Optional[RankPlan]:
    """The uploaded plan checked against the model, or None after an `st.error` saying why it was refused."""
    try:
        return RankPlan.from_json(upload.getvalue().decode("utf-8")).for_model(shapes)
    except UnicodeDecodeError:
        st.error(f"Refused '{upload.name}': it is not a UTF-8 text file, so it cannot be a plan JSON.")
    except RankScopeError as exc:  # a PlanError, or a PruningError for a v2 plan's pruning section
        st.error(f"Refused '{upload.name}': {exc}")
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        st.error(f"Refused '{upload.name}': it does not follow the rankscope.plan/v1 or v2 schema ({exc}).")
    return None


def check_plan_texts(plan: RankPlan) -> None:
    """Let the path policy see the texts a plan records before they are read to locate them (a shared app keeps
    paths inside its roots); raises `AccessRefused` when one is outside them."""
    from app.access import path_policy

    policy = path_policy()
    for section in (plan.calibration, plan.evaluation):
        if section and section.get("text"):
            policy.text_source(section["text"])
