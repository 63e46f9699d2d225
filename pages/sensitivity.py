"""Sensitivity: how perplexity and KL respond when one type, or one layer of a type, is compressed."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import plotly.express as px
import streamlit as st

from app.progress import watch_job
from app.resources import current_store, get_job_board, model_shapes
from app.tasks import session_scope, start_layer_sweep, start_mlp_layer_sweep, start_mlp_type_sweep, start_type_sweep
from app.workspace import choose_method, load_workspace_model, persistent, workspace_sidebar
from engine.analysis import METRIC_LABELS
from engine.analysis.sensitivity_summary import (
    MLP_FORM_LABELS, layer_grid, layer_sweep_ratios, mlp_curve_rows, mlp_layer_ratios, mlp_layer_rows, sweep_unit_labels,
    type_curve_rows,
)
from engine.cache.keys import calibration_key, reference_key
from engine.compression.sweep import DEFAULT_RATIOS, MLP_FORMS, mlp_sweep_id_for
from engine.errors import RankScopeError
from engine.methods import get_method
from engine.records import ReferenceRecord
from engine.store.cache_inventory import find_sweep
from engine.texts.corpus import text_fingerprint

st.title("Sensitivity")
st.caption("Compress one type in every layer, or one layer of one type, and watch perplexity and KL. "
           "A type whose curve stays flat can give up rank; a steep one needs it.")

workspace = workspace_sidebar()
loaded = load_workspace_model(workspace)
store = current_store()
board = get_job_board()

method = choose_method()
shapes = model_shapes(loaded)
labels = sweep_unit_labels(shapes, method)
try:
    calibration_id = (calibration_key(loaded.fingerprint, text_fingerprint(workspace.calibration_text),
                                      workspace.calibration_windowing, workspace.n_groups, loaded.dtype)
                      if get_method(method).needs else "")
    reference_id = reference_key(loaded.fingerprint, text_fingerprint(workspace.evaluation_text),
                                 workspace.text_settings().evaluation_windowing, loaded.dtype)
    lookup = find_sweep(store, loaded.fingerprint, method, calibration_id, text_fingerprint(workspace.evaluation_text),
                        workspace.window_len, workspace.evaluation_windows, reference_id)
    mlp_sweep = mlp_sweep_id_for(loaded.fingerprint, method, workspace.text_settings(),  # LoRAP's pruning (l2, 1%)
                                 dtype=loaded.dtype)
    reference = store.get_record(ReferenceRecord, reference_id)
except RankScopeError as exc:
    st.error(f"{exc} Fix the texts in the sidebar.")
    st.stop()

by_type, by_layer = st.columns(2)
with by_type:
    st.markdown("**Per-type sweep**: each type compressed in every layer, at each ratio")
    ratios = persistent(st.multiselect, "Ratios (share of the type's parameters removed)", "sweep_ratios",
                        list(DEFAULT_RATIOS), options=list(DEFAULT_RATIOS))
    types = persistent(st.multiselect, "Types", "sweep_types", labels, options=labels)
    if st.button("Run per-type sweep", type="primary", key="run_type_sweep", disabled=not (ratios and types)):
        start_type_sweep(workspace, loaded, method, sorted(ratios), types)
        st.rerun()
with by_layer:
    st.markdown("**Per-layer sweep**: one layer of one type compressed at a time")
    layer_types = persistent(st.multiselect, "Types", "layer_sweep_types", labels, options=labels)
    layer_ratio = persistent(st.slider, "Ratio", "layer_sweep_ratio", 0.5, min_value=0.05, max_value=0.95, step=0.05)
    if st.button("Run per-layer sweep", type="primary", key="run_layer_sweep", disabled=not layer_types):
        start_layer_sweep(workspace, loaded, method, layer_types, float(layer_ratio))
        st.rerun()
st.caption(f"Evaluated on {workspace.describe_evaluation()}. Every point is stored as soon as it is measured: a "
           "sweep started again (or after Stop, or after a crash) skips the stored points and resumes.")

if shapes.mlps:
    st.markdown("**MLP sweeps (LoRAP)**: the MLPs pruned by channels against the same MLPs factorised with "
                f"{method}, at equal parameters")
    mlp_by_type, mlp_by_layer = st.columns(2)
    with mlp_by_type:
        mlp_ratios = persistent(st.multiselect, "MLP ratios (share of the MLPs' parameters removed)",
                                "mlp_sweep_ratios", list(DEFAULT_RATIOS), options=list(DEFAULT_RATIOS))
        if st.button("Run MLP sweep", type="primary", key="run_mlp_type_sweep", disabled=not mlp_ratios):
            start_mlp_type_sweep(workspace, loaded, method, sorted(mlp_ratios), list(MLP_FORMS))
            st.rerun()
    with mlp_by_layer:
        mlp_layer_ratio = persistent(st.slider, "Ratio for one layer's MLP, pruned", "mlp_layer_sweep_ratio", 0.5,
                                     min_value=0.05, max_value=0.95, step=0.05)
        if st.button("Run per-layer MLP pruning sweep", type="primary", key="run_mlp_layer_sweep"):
            start_mlp_layer_sweep(workspace, loaded, method, float(mlp_layer_ratio))
            st.rerun()
    st.caption("Each MLP keeps (1 − ratio) of its intermediate channels, chosen by LoRAP's gradient-free scores "
               "(|W|·‖X‖₂ over gate, up and down; l2 rows, the least important 1% kept), or its gate, up and down get "
               f"the {method} rank with the same parameter count. Everything else stays dense.")

jobs = board.with_prefix(session_scope("sweep", workspace, loaded, method))
for job in jobs:
    watch_job(job.job_id, stoppable=True, what_to_do="Check the texts and windows in the sidebar, then run again.")
sweeping = any(job.running for job in jobs)


def draw_results() -> None:
    """Charts from the stored points (redrawn every few seconds while a sweep runs)."""
    found = lookup or find_sweep(store, loaded.fingerprint, method, calibration_id,
                                 text_fingerprint(workspace.evaluation_text), workspace.window_len,
                                 workspace.evaluation_windows)
    points = store.sensitivity_points(found.sweep_id) if found else []
    if not points:
        st.info("No sensitivity points stored for this model, method and texts yet: run a sweep above.")
        return
    options = st.columns([2, 1])
    metric = persistent(options[0].radio, "Metric", "sweep_metric", "perplexity", options=list(METRIC_LABELS),
                        format_func=METRIC_LABELS.get, horizontal=True)
    log_axis = persistent(options[1].checkbox, "Log axis", "sweep_log", True)
    label = METRIC_LABELS[metric]

    curves = pd.DataFrame(type_curve_rows(points))
    if curves.empty:
        st.caption("No per-type points yet.")
    else:
        figure = px.line(curves, x="ratio", y=metric, color="type", markers=True, log_y=log_axis,
                         hover_data=["decoder_params"], labels={metric: label, "ratio": "ratio (share removed)"})
        if metric == "perplexity":
            figure.add_hline(y=found.original_perplexity, line_dash="dot",
                             annotation_text=f"original {found.original_perplexity:.2f}")
        figure.update_layout(height=380, margin=dict(t=10, b=10))
        st.plotly_chart(figure, width="stretch", key="type_curves")
        st.caption(f"{label} when one type is compressed in every layer (the rest dense), against the share of that "
                   "type's parameters removed. Lines that stay near the dotted original tolerate compression; lines "
                   "that climb early mark the types that need their rank. The log axis keeps both in view.")

    ratios_stored = layer_sweep_ratios(points)
    if not ratios_stored:
        st.caption("No per-layer points yet.")
        return
    ratio = persistent(st.select_slider, "Per-layer ratio shown", "sweep_layer_ratio_shown", ratios_stored[-1],
                       options=ratios_stored)
    grid = layer_grid(points, ratio, metric, labels, shapes.num_layers)
    cells = pd.DataFrame(grid.values, index=[str(layer) for layer in grid.layers], columns=grid.types).astype(float)
    heatmap = px.imshow(cells, aspect="auto", color_continuous_scale="Magma_r",
                        labels={"x": "type", "y": "layer", "color": label})
    heatmap.update_layout(height=max(300, 22 * len(grid.layers) + 100), margin=dict(t=10, b=10))
    st.plotly_chart(heatmap, width="stretch", key="layer_heatmap")
    st.caption(f"{label} when only that layer of that type is compressed at ratio {ratio:g}. Dark cells are the "
               "sensitive matrices: give them more rank (or keep them dense) when allocating; blank cells are not "
               "measured yet.")
    with st.expander("All stored points"):
        st.dataframe(pd.DataFrame([asdict(p) for p in points]).drop(columns=["sweep_id"])
                     .rename(columns={**METRIC_LABELS, "linear_type": "type"}), hide_index=True, width="stretch")


def draw_mlp_results() -> None:
    """Charts of the MLP sweep's stored points: pruning against low rank, and pruning one layer at a time."""
    points = store.sensitivity_points(mlp_sweep)
    if not points:
        st.info("No MLP sweep points stored for this model, method and texts yet: run an MLP sweep above.")
        return
    options = st.columns([2, 1])
    metric = persistent(options[0].radio, "Metric", "mlp_metric", "perplexity", options=list(METRIC_LABELS),
                        format_func=METRIC_LABELS.get, horizontal=True)
    log_axis = persistent(options[1].checkbox, "Log axis", "mlp_log", True)
    label = METRIC_LABELS[metric]
    original = reference.perplexity if reference is not None else None

    curves = pd.DataFrame(mlp_curve_rows(points, method))
    if curves.empty:
        st.caption("No every-layer MLP points yet.")
    else:
        figure = px.line(curves, x="ratio", y=metric, color="form", markers=True, log_y=log_axis,
                         hover_data=["decoder_params"], labels={metric: label, "ratio": "ratio (share of MLP removed)",
                                                               "form": ""})
        if metric == "perplexity" and original is not None:
            figure.add_hline(y=original, line_dash="dot", annotation_text=f"original {original:.2f}")
        figure.update_layout(height=380, margin=dict(t=10, b=10))
        st.plotly_chart(figure, width="stretch", key="mlp_type_curves")
        st.caption(f"{label} when every layer's MLP gives up the same share of its parameters, either by pruning "
                   f"channels or by factorising gate, up and down with {method} at the same parameter count (hover "
                   "for the decoder-linear parameters of each point). LoRAP finds pruning the better way to shrink "
                   "the MLP; the two curves here say how it goes for this model.")

    ratios_stored = mlp_layer_ratios(points)
    if not ratios_stored:
        st.caption("No per-layer MLP points yet.")
        return
    ratio = persistent(st.select_slider, "Per-layer MLP ratio shown", "mlp_layer_ratio_shown", ratios_stored[-1],
                       options=ratios_stored)
    bars = px.bar(pd.DataFrame(mlp_layer_rows(points, ratio)), x="layer", y=metric, log_y=log_axis,
                  hover_data=["decoder_params"], labels={metric: label})
    bars.update_layout(height=320, margin=dict(t=10, b=10))
    st.plotly_chart(bars, width="stretch", key="mlp_layer_bars")
    st.caption(f"{label} when only that layer's MLP is pruned at ratio {ratio:g} (the other layers untouched). Tall "
               "bars mark the layers whose MLP needs its channels.")
    with st.expander("All stored MLP points"):
        st.dataframe(pd.DataFrame([asdict(p) for p in points]).drop(columns=["sweep_id"])
                     .replace({"linear_type": MLP_FORM_LABELS})
                     .rename(columns={**METRIC_LABELS, "linear_type": "form"}), hide_index=True, width="stretch")


st.subheader("Results")
st.fragment(run_every=2.0 if sweeping else None)(draw_results)()
if shapes.mlps:
    st.subheader("MLP: pruning against low rank")
    st.fragment(run_every=2.0 if sweeping else None)(draw_mlp_results)()
