"""Rank plans in the browser session: the saved plans the pages share, and checked plan uploads.

Saved plans live in the browser session (`st.session_state`), by name, as plan dicts; the Allocate
page saves them, the Search page adds a study's best plan, and the Export page exports them.
An upload is refused with a reason (not UTF-8, not JSON, another schema, a plan for another model,
a plan whose parameter counts are not what its ranks give, a plan that compresses nothing). Every
plan a page shows or passes on comes through `RankPlan.for_model`, so its numbers are the model's.
"""

from __future__ import annotations

from typing import Optional

import streamlit as st

from engine.compression.plan import PlanError, RankPlan
from engine.compression.units import ModelShapes

SAVED_PLANS = "alloc_saved_plans"  # name -> plan dict


def saved_plans() -> dict[str, dict]:
    """The saved plans of this browser session (shared with the Allocate page), name -> plan dict."""
    return st.session_state.setdefault(SAVED_PLANS, {})


def plans_for_model(shapes: ModelShapes) -> dict[str, RankPlan]:
    """The saved plans made for this model, by name, each checked against it (`st.warning` for one that fails)."""
    plans = {}
    for name, data in saved_plans().items():
        if data.get("model", {}).get("fingerprint") != shapes.fingerprint:
            continue
        try:
            plans[name] = RankPlan.from_dict(data).for_model(shapes)
        except PlanError as exc:
            st.warning(f"Saved plan '{name}' is left out: {exc}")
    return plans


def read_uploaded_plan(upload, shapes: ModelShapes) -> Optional[RankPlan]:
    """The uploaded plan checked against the model, or None after an `st.error` saying why it was refused."""
    try:
        return RankPlan.from_json(upload.getvalue().decode("utf-8")).for_model(shapes)
    except UnicodeDecodeError:
        st.error(f"Refused '{upload.name}': it is not a UTF-8 text file, so it cannot be a plan JSON.")
    except PlanError as exc:
        st.error(f"Refused '{upload.name}': {exc}")
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        st.error(f"Refused '{upload.name}': it does not follow the rankscope.plan/v1 schema ({exc}).")
    return None
