"""Spectra: how much of each matrix's energy a low rank keeps, for the weights and for the features."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.progress import POLL_SECONDS, watch_job
from app.resources import current_store, get_job_board
from app.tasks import spectra_preview, spectra_scope, start_spectra, start_weighted_spectra, weighted_spectra_scope
from app.workspace import load_workspace_model, persistent, workspace_sidebar
from engine.analysis.spectra_summary import (
    LORAP_LEVEL, energy_curve_rows, find_spectrum, lorap_table, rank_share_grid, weight_summary_by_type,
)
from engine.cache.lookups import find_calibration, stored_spectra
from engine.energy import ENERGY_LEVELS, rank_table, summarise_by_type
from engine.errors import RankScopeError
from engine.records import ACTIVATION_WEIGHTED
from engine.spectra import COVARIANCES

st.title("Spectra")
st.caption("Weights are high-rank, features are low-rank: the energy of a weight matrix spreads over many "
           "singular directions, while its outputs on real text live in a few. Feature-aware methods use that.")


@st.fragment(run_every=POLL_SECONDS)
def rerun_on_new_preview(job_id: str, windows_shown: int) -> None:
    """Redraw the page when the calibration hands out a newer snapshot (or ends) than the one shown."""
    preview = spectra_preview(job_id)
    if preview is None or preview.windows_done != windows_shown:
        st.rerun(scope="app")


workspace = workspace_sidebar()
loaded = load_workspace_model(workspace)
store = current_store()

controls = st.columns([1, 2])
covariance = persistent(controls[0].selectbox, "Input covariance for features", "spectra_covariance", "pooled",
                        options=list(COVARIANCES),
                        help="pooled: the mean of per-group covariances (Bolaco); sample: one covariance of all tokens.")
level = persistent(controls[1].radio, "Energy to keep", "spectra_level", 0.9, options=list(ENERGY_LEVELS),
                   format_func=lambda value: f"{value:.0%}", horizontal=True)

try:
    calibration = find_calibration(store, loaded.fingerprint, workspace.calibration_text,
                                   workspace.calibration_windowing, workspace.n_groups, loaded.dtype)
except RankScopeError as exc:
    st.error(f"Calibration text problem: {exc}")
    st.stop()
spectra = None if calibration is None else stored_spectra(store, loaded.fingerprint, calibration.calibration_id,
                                                          covariance)
weighted_preview = None  # the activation-weighted spectra of a calibration snapshot, while it refines
if spectra is None:
    scope = spectra_scope(workspace, loaded, covariance)
    jobs = get_job_board().with_prefix(scope)
    running = next((job for job in jobs if job.running), None)
    preview = spectra_preview(running.job_id) if running is not None else None
    if preview is None:
        st.info(f"Spectra for this model and calibration ({workspace.describe_calibration()}) are not computed yet. "
                + ("The calibration is cached, so this takes seconds." if calibration is not None else
                   "This runs the calibration first; the weight spectra show at once, and the feature spectra from "
                   "the first windows, refined as more arrive."))
        if running is None and st.button("Compute spectra", type="primary", key="compute_spectra"):
            start_spectra(workspace, loaded, covariance)
            st.rerun()
    for job in jobs:
        watch_job(job.job_id, stoppable=True,
                  what_to_do="Check the calibration text and windows in the sidebar, then compute again.")
    if preview is None:
        st.stop()
    rerun_on_new_preview(running.job_id, preview.windows_done)
    if not preview.has_features:
        st.caption(f"{preview.describe()}. The weights need no calibration:")
        shares = pd.DataFrame(weight_summary_by_type(preview.spectra.weight, level))
        weight_bars = px.bar(shares, x="type", y="weight_rank_share", range_y=[0, 1],
                             labels={"weight_rank_share": "rank share"})
        weight_bars.update_layout(height=300, margin=dict(t=10, b=10))
        st.plotly_chart(weight_bars, width="stretch", key="weight_rank_share_by_type")
        st.caption(f"Mean over layers of the rank share the weights need for {level:.0%} energy, per linear type.")
        st.stop()
    st.caption(f"{preview.describe()}: the feature spectra below are from the calibration windows so far, and are "
               "refined as more arrive; the final ones are stored when the calibration ends. The weight spectra are "
               "final.")
    spectra, weighted_preview = preview.spectra, preview.weighted

table = rank_table(spectra.weight, spectra.feature)
weights = rank_share_grid(table, level, "weight")
features = rank_share_grid(table, level, "feature")

st.subheader(f"Rank share needed for {level:.0%} of the energy")
heatmaps = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                         subplot_titles=("Weights: singular values of W", "Features: eigenvalues of W·C·Wᵀ"))
for column, grid in enumerate((weights, features), start=1):
    heatmaps.add_trace(go.Heatmap(
        z=grid.values, x=grid.types, y=grid.layers, zmin=0.0, zmax=1.0, colorscale="Viridis",
        customdata=grid.ranks, colorbar=dict(title="rank share") if column == 2 else None, showscale=column == 2,
        hovertemplate="layer %{y}, %{x}<br>rank share %{z:.2f} (rank %{customdata})<extra></extra>",
    ), row=1, col=column)
heatmaps.update_yaxes(type="category", autorange="reversed")
heatmaps.update_yaxes(title_text="layer", row=1, col=1)
heatmaps.update_layout(height=max(320, 22 * len(weights.layers) + 120), margin=dict(t=40, b=10))
st.plotly_chart(heatmaps, width="stretch", key="rank_share_heatmaps")
st.caption(f"Each cell is the smallest rank, as a share of the matrix's full rank, whose top directions hold "
           f"{level:.0%} of the energy. Bright cells need nearly full rank; dark cells compress well. Compare the "
           "two panels: the weights (left) are bright almost everywhere, the features (right) much darker, "
           "which is why methods that look at the data keep quality at ranks where plain SVD fails.")

by_type = pd.DataFrame(summarise_by_type(table, level))
bars = px.bar(by_type.melt(id_vars=["type", "full_rank"], value_vars=["weight_rank_share", "feature_rank_share"],
                           var_name="spectrum", value_name="rank share")
              .replace({"weight_rank_share": "weights", "feature_rank_share": "features"}),
              x="type", y="rank share", color="spectrum", barmode="group", range_y=[0, 1])
bars.update_layout(height=300, margin=dict(t=10, b=10))
st.plotly_chart(bars, width="stretch", key="rank_share_by_type")
st.caption(f"Mean over layers of the rank share needed for {level:.0%} energy, per linear type. The gap between "
           "the two bars of a type is the room a feature-aware method has over weight SVD for that type.")

def lorap_section() -> None:
    """LoRAP's Table 1: the share of singular values holding 80% of the energy, of W and of W·diag(‖X‖₂)."""
    st.subheader(f"Attention against MLP: singular values for {LORAP_LEVEL:.0%} of the energy (LoRAP)")
    weighted = weighted_preview or store.get_feature_spectra(spectra.calibration_id, ACTIVATION_WEIGHTED)
    if not weighted:
        jobs = get_job_board().with_prefix(weighted_spectra_scope(workspace, loaded))
        st.info("The activation-weighted spectra (singular values of W·diag(‖X‖₂), with the calibration's input "
                "norms) are not computed yet for this calibration. They take seconds.")
        if not any(job.running for job in jobs) and st.button("Compute activation-weighted spectra",
                                                              key="compute_weighted_spectra"):
            start_weighted_spectra(workspace, loaded)
            st.rerun()
        for job in jobs:
            watch_job(job.job_id, stoppable=True,
                      what_to_do="Check the calibration text and windows in the sidebar, then compute again.")
        return
    layers = sorted({row.layer for row in spectra.weight})
    shown = persistent(st.selectbox, "Layers", "lorap_layer", "mean", options=["mean", *layers],
                       format_func=lambda value: "mean over layers" if value == "mean" else f"layer {value}")
    rows = lorap_table(spectra.weight, weighted, LORAP_LEVEL, layer=None if shown == "mean" else shown)
    table = pd.DataFrame([{"type": row["type"], "sub-layer": row["sublayer"], "weight W": 100 * row["weight_share"],
                           "activation-weighted W·diag(‖X‖₂)": 100 * row["weighted_share"]} for row in rows])
    percent = st.column_config.NumberColumn(format="%.1f%%")
    st.dataframe(table, hide_index=True, key="lorap_table",
                 column_config={"weight W": percent, "activation-weighted W·diag(‖X‖₂)": percent})
    st.caption(f"Share of singular values (rank / full rank) needed for {LORAP_LEVEL:.0%} of the energy, "
               f"{'averaged over layers' if shown == 'mean' else f'in layer {shown}'}, as in LoRAP's Table 1. LoRAP "
               "reports that the attention matrices (q, k, v, o) need a smaller share than the MLP matrices (gate, up, "
               "down), so attention suits low rank and the MLP does not (LoRAP prunes its channels instead), and that "
               "weighting each input column by its activations' L2 norm (the matrix its AWSVD factorises) lowers the "
               "shares further, attention's most. These are the same shares for this model and calibration text.")


lorap_section()

st.subheader("Energy curves of one matrix")
picker = st.columns(2)
layer = persistent(picker[0].selectbox, "Layer", "spectra_layer", weights.layers[0], options=weights.layers)
linear_type = persistent(picker[1].selectbox, "Type", "spectra_type", weights.types[0], options=weights.types)
weight_row = find_spectrum(spectra.weight, layer, linear_type)
feature_row = find_spectrum(spectra.feature, layer, linear_type)
curves = pd.DataFrame(energy_curve_rows(weight_row, feature_row))
chosen = next(row for row in table if row["layer"] == layer and row["type"] == linear_type)
key = f"{level:g}"
numbers = st.columns(3)
numbers[0].metric("Full rank", chosen["full_rank"])
numbers[1].metric(f"Weight rank for {level:.0%}", chosen["weight_rank"][key])
numbers[2].metric(f"Feature rank for {level:.0%}", chosen["feature_rank"][key])
lines = px.line(curves, x="rank_share", y="energy", color="kind", hover_data=["rank"],
                labels={"rank_share": "rank / full rank", "energy": "energy kept", "kind": ""})
lines.add_hline(y=level, line_dash="dot", annotation_text=f"{level:.0%}")
lines.update_layout(height=360, margin=dict(t=10, b=10), yaxis_range=[0, 1.02])
st.plotly_chart(lines, width="stretch", key="energy_curves")
st.caption(f"Cumulative energy kept by the top-r directions of layer {layer} '{linear_type}' "
           f"({weight_row.d_out}×{weight_row.d_in}), against r as a share of the full rank. The weight curve (σ²) "
           "rises slowly: the matrix is high-rank. The feature curve (λ of the output covariance on the calibration "
           "text) rises steeply: the outputs the model actually produces are low-rank. Where a curve crosses the "
           "dotted line is the rank that keeps that energy.")
