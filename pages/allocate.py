"""Allocate: set ranks by hand (and kept channels of pruned MLPs), watch the budget, evaluate, and keep the plans
worth keeping."""

from __future__ import annotations

import time

import pandas as pd
import plotly.express as px
import streamlit as st

from app.jobs import JobState
from app.plans import read_uploaded_plan, save_plan, saved_plans
from app.progress import watch_job
from app.resources import get_job_board, model_shapes
from app.tasks import (
    AppliedPlan, QuickMeasurement, live_estimator, quick_job_id, quick_scope, session_ready, session_scope, start_apply,
    start_quick_measurement,
)
from app.workspace import choose_method, load_workspace_model, persistent, set_persistent, workspace_sidebar
from engine.analysis import METRIC_LABELS
from engine.analysis.quality_estimate import NoEstimate
from engine.analysis.allocation import (
    budget_meter_rows, channels_from_kept, channels_from_ratio, kept_channel_rows, lorap_tables, plan_summary,
    pruned_linear_paths, pruning_section, ranks_from_unit_ranks, retention_percent, unit_rank_rows,
)
from engine.compression.grouping import BudgetError, Grouping, budget_target, project_to_budget, ranks_from_ratios
from engine.compression.lorap import parse_split
from engine.compression.plan import PlanError, RankPlan
from engine.compression.pruning import AGGREGATIONS, DEFAULT_RETENTION
from engine.compression.units import count_parameters
from engine.errors import RankScopeError
from engine.hashing import sha256_json

BASE = "alloc_base"  # None: ranks from the sliders (or LORAP); else the name of a saved plan being edited
LORAP = "alloc_lorap"  # None, or LoRAP's allocation in the tables: {"ranks", "channels", "grouping", "fingerprint"}
APPLY_JOB = "alloc_apply_job"
APPLIED = "alloc_applied"
APPLIED_SEEN = "alloc_applied_seen"  # the Apply job whose result the estimate and the history chart already include
QUICK_JOB = "alloc_quick_job"  # the quick measurement this browser session started last
QUICK_SEEN = "alloc_quick_seen"  # (quick job id of the allocation in the tables, when the page first showed it)
HISTORY = "alloc_history"  # measured points of this browser session: quick and Apply
QUICK_SETTLE_S = 0.8  # the allocation must stay unchanged this long before its quick measurement starts
QUICK_POLL_S = 0.5
DEFAULT_RATIO = 0.2
MLP_MODE = "alloc_mlp_mode"
LOW_RANK, PRUNED = "low-rank", "pruned by channels (LoRAP)"
AGGREGATION, RETENTION = "alloc_aggregation", "alloc_retention"
LORAP_BUDGET, LORAP_SPLIT = "alloc_lorap_budget", "alloc_lorap_split"

st.title("Allocate")
st.caption("Set a ratio per group (0 keeps it dense), fine-tune ranks per module in the table (or prune MLPs by "
           "channels, as LoRAP does), watch the budget, then Apply to measure perplexity and both KLs against the "
           "original model.")

workspace = workspace_sidebar()
loaded = load_workspace_model(workspace)
saved = saved_plans()  # plan name -> plan dict, for this browser session
st.session_state.setdefault(BASE, None)
st.session_state.setdefault(LORAP, None)


def use_sliders() -> None:
    st.session_state[BASE] = None
    st.session_state[LORAP] = None


def edit_saved_plan(name: str) -> None:
    """Put a saved plan in the tables: its ranks, and for a v2 plan its kept channels and pruning settings."""
    data = saved[name]
    st.session_state[BASE] = name
    st.session_state[LORAP] = None
    set_persistent("method", data["method"])
    if shapes.mlps:
        set_persistent(MLP_MODE, PRUNED if data.get("channels") else LOW_RANK)
    if data.get("channels"):
        set_persistent(AGGREGATION, (data.get("pruning") or {}).get("aggregation", "l2"))
        set_persistent(RETENTION, retention_percent(data.get("pruning")))


def fill_lorap() -> None:
    """LoRAP's allocation for the budget and split in the expander (a bad split: nothing changes; the page says why)."""
    try:
        ranks, channels, lorap_grouping = lorap_tables(shapes, st.session_state[LORAP_BUDGET],
                                                       st.session_state[LORAP_SPLIT])
    except RankScopeError:
        return
    st.session_state[BASE] = None
    st.session_state[LORAP] = {"ranks": ranks, "channels": channels, "grouping": lorap_grouping,
                               "fingerprint": shapes.fingerprint}
    set_persistent(MLP_MODE, PRUNED)


def remember_measurement(point_scope: str, measured: str, key: str, decoder_params: int, metrics, **extra) -> None:
    """Add a measured point to this session's history (once per allocation and kind of measurement)."""
    history = st.session_state.setdefault(HISTORY, [])
    if not any(point["key"] == key for point in history):
        history.append({"scope": point_scope, "key": key, "measured": measured, "decoder_params": decoder_params,
                        "perplexity": metrics["perplexity"], "kl_reverse": metrics["kl_reverse"], **extra})


def _error_text(relative: float | None) -> str | None:
    """'±x% error' for a measured relative error; None when there is none (or NaN: no positive measured value)."""
    if relative is None or relative != relative:
        return None
    return f"±{relative:.0%} error" if relative >= 0.1 else f"±{relative:.1%} error"


def show_estimate(plan: RankPlan) -> None:
    """The instant estimate of the allocation in the tables, with its measured error
    (`engine.analysis.quality_estimate`)."""
    measured_plans = list(saved.items()) + [(f"applied {i + 1}", point["plan"]) for i, point in
                                            enumerate(st.session_state.get(HISTORY, [])) if "plan" in point]
    estimator = live_estimator(workspace, loaded, method, plan.pruning if plan.channels else None, measured_plans)
    estimate = estimator if isinstance(estimator, NoEstimate) else estimator.estimate(plan.ranks, plan.channels)
    if isinstance(estimate, NoEstimate):
        st.info(f"No instant estimate. {estimate.message}")
        return
    error = estimate.error
    columns = st.columns(4)
    for column, (name, label, shown) in zip(columns, (
            ("perplexity", "Predicted perplexity", f"{estimate.perplexity:.3f}"),
            ("kl_forward", "Predicted " + METRIC_LABELS["kl_forward"], f"{estimate.kl_forward:.4g}"),
            ("kl_reverse", "Predicted " + METRIC_LABELS["kl_reverse"], f"{estimate.kl_reverse:.4g}"))):
        column.metric(label, shown, delta=_error_text(getattr(error, name, None)), delta_color="off",
                      delta_arrow="off")
    columns[3].metric("Estimate checked on",
                      f"{error.n} evaluation{'s' if error.n != 1 else ''}" if error else "nothing yet",
                      help="Stored full-window evaluations of this model, method and texts (study results, applied "
                           "and saved plans), each predicted without itself (leave-one-out).")
    refined = f"; per-layer points refine {', '.join(estimate.refined)}" if estimate.refined else ""
    beyond = (f"; {', '.join(estimate.extrapolated)} compressed beyond the sweep's last ratio (their curves continued "
              "along the last segment)" if estimate.extrapolated else "")
    how = (f"From the per-type sweep{refined}{beyond}: each type's sweep curve read at the share of its parameters "
           "this allocation removes, added up in Δlog perplexity and in KL, ")
    if error is None:
        st.caption(how + "without a correction: no multi-type evaluation of this model, method and texts is stored, "
                   "so its error is not known yet. Apply a few allocations (or finish a study on the Search page): "
                   "the sum is then corrected on them and its leave-one-out error shown here.")
    else:
        st.caption(how + f"then corrected on {estimate.n_fit} stored multi-type evaluations (studies' results and "
                   "their trials, applied and saved plans). ± is the root-mean-square relative error over "
                   f"{error.n} stored full-window evaluations, each predicted by the model fitted without it "
                   "(leave-one-out).")


def remember_applied() -> None:
    """Put a finished Apply into the history (with its plan, which the estimate then uses), in the scope of the
    texts it was measured on."""
    job = get_job_board().get(st.session_state.get(APPLY_JOB) or "")
    if job is None or not isinstance(job.result, AppliedPlan):
        return
    measured = job.result.plan
    if job.job_id.startswith(session_scope("apply", workspace, loaded, measured.method)):
        remember_measurement(quick_scope(workspace, loaded, measured.method),
                             f"Apply ({measured.evaluation['n_windows']} windows)", job.job_id,
                             count_parameters(shapes, measured.method, measured.ranks,
                                              measured.channels).decoder_compressed,
                             measured.metrics, plan=measured.to_dict())


@st.fragment(run_every=QUICK_POLL_S)
def quick_live(job_id: str, start) -> None:
    """Start the quick measurement once the allocation has settled, and poll it; rerun the page when it is done."""
    job = get_job_board().get(job_id)
    if job is not None and job.state in (JobState.DONE, JobState.FAILED):
        st.rerun(scope="app")  # the page shows either without polling
    if job is None or job.state is JobState.STOPPED:  # not started, or superseded before and now wanted again
        seen_id, seen_at = st.session_state.get(QUICK_SEEN, (job_id, 0.0))
        if seen_id == job_id and time.time() - seen_at < QUICK_SETTLE_S:
            st.caption("Measuring on the first evaluation windows once the allocation stops changing...")
            return
        job = start()
        st.session_state[QUICK_JOB] = job_id
    fraction = job.event.fraction if job.event is not None else 0.0
    st.progress(fraction, text=f"{job.label}" + (f" · {job.event.describe()}" if job.event is not None else "..."))


def show_quick_measurement(plan: RankPlan, counts) -> None:
    """The allocation measured on the first evaluation windows without a click, once it stops changing; a newer
    allocation stops an older pending measurement, and a finished one is found again by its allocation."""
    board = get_job_board()
    job_id = quick_job_id(workspace, loaded, method, plan.ranks, plan.channels, plan.pruning)
    previous = st.session_state.get(QUICK_JOB)
    if previous and previous != job_id:
        board.stop(previous)  # superseded: it ends before its next window (a finished one is kept)
    if st.session_state.get(QUICK_SEEN, (None,))[0] != job_id:
        st.session_state[QUICK_SEEN] = (job_id, time.time())
    job = board.get(job_id)
    if job is not None and job.state is JobState.FAILED:
        st.warning(f"{job.label} failed: {job.message} Apply still measures on all evaluation windows.")
        return
    if job is None or job.state is not JobState.DONE:
        if session_ready(workspace, loaded, method):
            quick_live(job_id, lambda: start_quick_measurement(workspace, loaded, method, plan.ranks, plan.channels,
                                                               plan.pruning))
        else:
            st.caption("The quick measurement starts by itself once this method is prepared (its factors and the "
                       "original model's reference on the evaluation windows are stored): press Apply once.")
        return
    quick: QuickMeasurement = job.result
    remember_measurement(scope, f"quick ({quick.windows} windows)", job_id, counts.decoder_compressed,
                         {"perplexity": quick.perplexity, "kl_reverse": quick.kl_reverse})
    columns = st.columns(4)
    columns[0].metric(f"Quick perplexity ({quick.windows} windows)", f"{quick.perplexity:.3f}")
    columns[1].metric(f"Original on the same {quick.windows} windows", f"{quick.original_perplexity:.3f}")
    columns[2].metric(f"Quick {METRIC_LABELS['kl_forward']}", f"{quick.kl_forward:.4g}")
    columns[3].metric(f"Quick {METRIC_LABELS['kl_reverse']}", f"{quick.kl_reverse:.4g}")
    st.caption(f"Measured without a click on the first {quick.windows} of the {quick.of_windows} evaluation windows "
               f"({quick.tokens:,} predicted tokens, {quick.seconds:.1f} s): a quick look at this allocation, not "
               f"Apply's measurement on all {quick.of_windows} windows.")


method = choose_method()
shapes = model_shapes(loaded)

st.subheader("Groups")
layout = st.columns(3)
kind = persistent(layout[0].radio, "Grouping", "alloc_grouping", "5x1", options=["5x1", "5xG", "per-layer"],
                  horizontal=True, on_change=use_sliders,
                  help="5x1: one ratio per type group for all layers; 5xG: per block of layers; per-layer: per matrix type "
                       "and layer.")
blocks = persistent(layout[1].number_input, "G (layer blocks, for 5xG)", "alloc_blocks", min(2, shapes.num_layers),
                    min_value=1, max_value=shapes.num_layers, step=1, disabled=kind != "5xG", on_change=use_sliders)
search_v = persistent(layout[2].checkbox, "Compress v too", "alloc_search_v", False, on_change=use_sliders,
                      help="By default v stays dense (DESIGN.md §7).")
pruned_mode = False
if shapes.mlps:
    pruned_mode = persistent(st.radio, "MLPs", MLP_MODE, LOW_RANK, options=[LOW_RANK, PRUNED], horizontal=True,
                             help="low-rank: gate, up and down get ranks like every other linear. Pruned by "
                                  "channels (LoRAP): each MLP keeps some of its intermediate channels (rows of gate "
                                  "and up, columns of down) as three smaller dense matrices; set them in the kept-"
                                  "channels table below.") == PRUNED
try:
    grouping = Grouping(kind, int(blocks) if kind == "5xG" else 1, search_v)
    groups = grouping.groups(shapes, method)
except RankScopeError as exc:
    st.error(str(exc))
    st.stop()

ratios: dict[str, float] = {}
blocks_of_groups: dict[int, list[str]] = {}
for name, units in groups.items():
    blocks_of_groups.setdefault(min(unit.layer for unit in units), []).append(name)
for first_layer, names in blocks_of_groups.items():
    last_layer = max(unit.layer for name in names for unit in groups[name])
    box = (st.container() if len(blocks_of_groups) == 1 else
           st.expander(f"Layers {first_layer}-{last_layer}" if last_layer > first_layer else f"Layer {first_layer}",
                       expanded=first_layer == min(blocks_of_groups)))
    columns = box.columns(len(names))
    for column, name in zip(columns, names):
        ratios[name] = persistent(column.slider, name, f"ratio.{method}.{grouping.label}.{search_v}.{name}",
                                  DEFAULT_RATIO, min_value=0.0, max_value=0.95, step=0.05, on_change=use_sliders,
                                  help="Share of this group's parameters removed; 0 keeps it dense.")

budget_columns = st.columns([1, 3])
budget_on = persistent(budget_columns[0].toggle, "Project onto a budget", "alloc_budget_on", False,
                       on_change=use_sliders, disabled=pruned_mode,
                       help="Scales the ratios so the ranks meet the budget exactly. With pruned MLPs, use the LoRAP "
                            "allocation below for a budget instead." if pruned_mode else None)
budget = persistent(budget_columns[1].slider, "Remove this share of decoder-linear parameters", "alloc_budget", 0.2,
                    min_value=0.0, max_value=0.9, step=0.01, disabled=not budget_on or pruned_mode,
                    on_change=use_sliders)
values, used_budget = dict(ratios), None
slider_ranks = ranks_from_ratios(groups, ratios)
if budget_on and not pruned_mode:
    try:
        slider_ranks, values = project_to_budget(shapes, method, grouping, ratios, budget_target(shapes, budget))
        used_budget = budget
        st.caption("Ratios scaled onto the budget: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    except BudgetError as exc:
        st.error(f"{exc} The table below uses the sliders as they are.")

if shapes.mlps:
    with st.expander("LoRAP allocation: fill the ranks and kept channels for a budget", expanded=False):
        lorap_columns = st.columns([3, 1, 1])
        persistent(lorap_columns[0].slider, "Remove this share of decoder-linear parameters (LoRAP)", LORAP_BUDGET,
                   0.2, min_value=0.05, max_value=0.9, step=0.01)
        lorap_split = persistent(lorap_columns[1].text_input, "Attention split q+k : v+o", LORAP_SPLIT, "1:3",
                                 help="LoRAP gives q+k and v+o one rank each, sharing the attention budget in this "
                                      "proportion (the paper's 1:3).")
        split_error = None
        try:
            parse_split(lorap_split)
        except RankScopeError as exc:
            split_error = str(exc)
            st.error(split_error)
        lorap_columns[2].button("LoRAP allocation", key="alloc_lorap_fill", on_click=fill_lorap,
                                disabled=split_error is not None,
                                help="Every layer at this reduction: attention factorised with the split (a matrix "
                                     "whose factors would not be smaller stays dense, its share going to the other "
                                     "pair), the MLP pruned to what the layer's budget has left.")
        st.caption("Fills both tables with LoRAP's allocation (and switches the MLPs to pruned); edit them from there.")
else:
    split_error = None

base_name = st.session_state[BASE]
preset = st.session_state[LORAP]
if preset is not None and preset["fingerprint"] != shapes.fingerprint:  # made for the model loaded before
    preset = st.session_state[LORAP] = None
if base_name is not None and (base_name not in saved or saved[base_name]["method"] != method):
    base_name = st.session_state[BASE] = None
if base_name is not None:
    base_ranks = saved[base_name]["ranks"]
    base_channels = saved[base_name].get("channels") or {}
    base_grouping = saved[base_name].get("grouping")
    st.info(f"The tables hold saved plan '{base_name}'. Moving a slider goes back to the sliders.")
elif preset is not None:
    base_ranks, base_channels, base_grouping = preset["ranks"], preset["channels"], preset["grouping"]
    st.info(f"The tables hold LoRAP's allocation at {base_grouping['budget']:.0%} of decoder-linear parameters "
            f"removed, split {':'.join(f'{v:g}' for v in base_grouping['split'])}. Moving a slider goes back to the "
            "sliders.")
else:
    base_ranks, base_channels = slider_ranks, {}
    base_grouping = {**grouping.to_dict(), "values": values, "budget": used_budget}

problems: list[str] = []  # invalid input, each shown with st.error; the tables keep what was typed
channels: dict = {}
pruning = None
typed_kept: dict = {}
edited_mlps = 0
if pruned_mode:
    st.subheader("Kept channels per MLP")
    prune_columns = st.columns(3)
    channel_ratio = persistent(prune_columns[0].slider, "Remove this share of each MLP's channels",
                               "alloc_channel_ratio", DEFAULT_RATIO, min_value=0.0, max_value=0.95, step=0.05,
                               on_change=use_sliders,
                               help="The table's starting point: each MLP keeps round((1 − share)·d_ff) channels.")
    aggregation = persistent(prune_columns[1].selectbox, "Channel score per row", AGGREGATION, "l2",
                             options=list(AGGREGATIONS),
                             help="How a row's importances |W_ij|·‖X_j‖₂ are summed into its score: l2 "
                                  "(LoRAP's), l1 or max.")
    retention = persistent(prune_columns[2].number_input, "Retained least important channels (%)", RETENTION,
                           100 * DEFAULT_RETENTION, step=0.5, format="%.2f",
                           help="Of the kept channels, this share of each MLP's width is its least important "
                                "channels (LoRAP keeps 1%); from 0 to 50%.")
    if base_name is None and preset is None:
        base_channels = channels_from_ratio(shapes, channel_ratio)
        base_grouping = {**base_grouping, "channel_ratio": channel_ratio}
    kept_rows = pd.DataFrame(kept_channel_rows(shapes, base_channels))
    kept_rows["kept"] = kept_rows["kept"].astype("Int64")
    kept_key = "alloc_channels_" + sha256_json(sorted(base_channels.items(), key=str))[:16]
    kept_edited = st.data_editor(
        kept_rows, key=kept_key, hide_index=True, width="stretch", num_rows="fixed",
        disabled=[column for column in kept_rows.columns if column != "kept"],
        column_config={"kept": st.column_config.NumberColumn("kept channels (empty = not pruned)", step=1),
                       "parameters": st.column_config.NumberColumn("parameters (before edits)")},
    )
    st.caption("One row per MLP: it keeps this many of its d_ff intermediate channels (gate and up rows, down "
               "columns), from 1 to d_ff, as three smaller dense matrices costing 3·d·kept; clear a cell to leave "
               "that MLP unpruned (its gate, up and down then take ranks).")
    typed = [None if pd.isna(value) else value for value in kept_edited["kept"]]
    typed_kept = {mlp.path: value for mlp, value in zip(shapes.mlps, typed)}
    edited_mlps = sum(1 for mlp, value in typed_kept.items() if value != base_channels.get(mlp))
    try:
        channels = channels_from_kept(shapes, typed)
    except RankScopeError as exc:
        problems.append(f"{exc} The table keeps what you typed; fix it to see the budget and Apply.")
    try:
        pruning = pruning_section(aggregation, retention)
    except RankScopeError as exc:
        problems.append(str(exc))
pruned_paths = pruned_linear_paths(shapes, typed_kept)

st.subheader("Ranks per module")
shown_ranks = {path: None if path in pruned_paths else rank for path, rank in base_ranks.items()}
rows = pd.DataFrame(unit_rank_rows(shapes, method, shown_ranks, typed_kept if pruned_mode else None))
rows["rank"] = rows["rank"].astype("Int64")
rows["parameters"] = rows["parameters"].astype("Int64")
editor_key = "alloc_editor_" + sha256_json([method, sorted(base_ranks.items(), key=str)])[:16]
edited = st.data_editor(
    rows, key=editor_key, hide_index=True, width="stretch", num_rows="fixed", height=320,
    disabled=[column for column in rows.columns if column != "rank"],
    column_config={"rank": st.column_config.NumberColumn("rank (empty = dense)", min_value=1, step=1),
                   "parameters": st.column_config.NumberColumn("parameters (before edits)")},
)
st.caption("One row per rank unit (a joint method's pair shares a row). Edit a rank, or clear it to keep the "
           "matrix dense; the budget meter and Apply use the edited table."
           + (" The gate, up and down of a pruned MLP have no rank: they stay dense, sliced to the kept channels."
              if pruned_mode else ""))
unit_ranks = [None if pd.isna(value) else value for value in edited["rank"]]
edited_units = sum(1 for before, after in zip(rows["rank"], unit_ranks)
                   if (None if pd.isna(before) else before) != after)
plan: RankPlan | None = None
ranks: dict = {}
try:
    ranks = ranks_from_unit_ranks(shapes, method, unit_ranks)
except PlanError as exc:
    problems.append(f"The table is not a valid plan: {exc} Fix the rank, or clear it to keep the matrix dense.")
if ranks and all(rank is None for rank in ranks.values()) and not pruned_paths:
    st.info("Every matrix is dense: this is the original model. Move a slider above 0, or give a matrix a rank "
            "in the table, to compress.")
    st.stop()
if not problems:
    plan_grouping = dict(base_grouping or {})
    plan_grouping.update({k: v for k, v in (("edited_units", edited_units), ("edited_mlps", edited_mlps)) if v})
    pruned_channels = {path: kept for path, kept in channels.items() if kept is not None}
    try:
        plan = RankPlan.build(shapes, method, ranks, grouping=plan_grouping if plan_grouping else base_grouping,
                              channels=pruned_channels or None, pruning=pruning if pruned_channels else None)
    except PlanError as exc:
        problems.append(f"The table is not a valid plan: {exc} Fix the rank, or clear it to keep the matrix dense.")
for problem in problems:
    st.error(problem)

st.subheader("Budget")
if plan is None:
    st.caption("The budget meter and Apply wait for the input above to be fixed.")
else:
    counts = count_parameters(shapes, method, plan.ranks, plan.channels)
    meter = st.columns(4)
    meter[0].metric("Decoder-linear parameters", f"{counts.decoder_compressed:,}",
                    help=f"of {counts.decoder_dense:,} dense decoder-linear parameters")
    meter[1].metric("Removed from decoder linears", f"{counts.decoder_reduction:.2%}")
    meter[2].metric("Model parameters", f"{counts.total_compressed:,}",
                    help=f"of {counts.total_dense:,} parameters in the whole model, embeddings included")
    meter[3].metric("Removed from the whole model", f"{counts.total_reduction:.2%}")
    bars = px.bar(pd.DataFrame(budget_meter_rows(counts)), x="parameters", y="scope", color="part", orientation="h",
                  color_discrete_map={"kept": "#4c78a8", "removed": "#e45756"})
    bars.update_layout(height=170, margin=dict(t=10, b=10), legend_title_text="")
    st.plotly_chart(bars, width="stretch", key="budget_meter")
    st.caption("Parameters kept and removed, over the decoder linears (what low-rank compression and pruning act "
               "on) and over the whole model (embeddings included, which dominate small models). A low-rank matrix "
               "costs r·(d_in + d_out); a pruned MLP keeping k channels costs 3·d·k.")

st.subheader("Quality")
history = st.session_state.setdefault(HISTORY, [])  # measured points of this browser session, oldest first
scope = quick_scope(workspace, loaded, method)  # this model, method and texts: what the history chart shows
remember_applied()  # before the estimate, which is corrected on applied plans too
if plan is None:
    st.caption("The estimate and the measurements wait for the input above to be fixed.")
else:
    show_estimate(plan)
    show_quick_measurement(plan, counts)

if st.button("Apply", type="primary", key="apply_plan", disabled=plan is None,
             help="Evaluate this plan on the evaluation text." if plan else "Fix the input above first."):
    st.session_state[APPLY_JOB] = start_apply(workspace, loaded, method, plan.ranks, plan.grouping,
                                              channels=plan.channels, pruning=plan.pruning).job_id
    st.rerun()
if st.session_state.get(APPLY_JOB):
    job = watch_job(st.session_state[APPLY_JOB],
                    what_to_do="Check the texts and windows in the sidebar (and the calibration), then Apply again.")
    if job is not None and isinstance(job.result, AppliedPlan):
        st.session_state[APPLIED] = job.result
        if st.session_state.get(APPLIED_SEEN) != job.job_id:  # it finished during this run, after the estimate
            st.session_state[APPLIED_SEEN] = job.job_id  # and the chart were drawn: draw them again, with it (once)
            st.rerun()
applied: AppliedPlan | None = st.session_state.get(APPLIED)
current = plan
if applied is not None:
    matches = plan is not None and (applied.plan.method == method and applied.plan.ranks == plan.ranks
                                    and applied.plan.channels == plan.channels and applied.plan.pruning == plan.pruning)
    if matches:
        current = applied.plan
    metrics = applied.plan.metrics
    quality = st.columns(4)
    quality[0].metric("Perplexity", f"{metrics['perplexity']:.3f}")
    quality[1].metric("Original perplexity", f"{applied.original['perplexity']:.3f}")
    quality[2].metric(METRIC_LABELS["kl_forward"], f"{metrics['kl_forward']:.4g}")
    quality[3].metric(METRIC_LABELS["kl_reverse"], f"{metrics['kl_reverse']:.4g}")
    st.caption(f"On {workspace.describe_evaluation()}, {metrics['tokens']:,} predicted tokens. Perplexity = exp(mean "
               "next-token NLL). KL per predicted token in nats, averaged: KL(P_orig‖P_comp) weighs the original's "
               "likely tokens, KL(P_comp‖P_orig) the compressed model's; the original has 0 for both."
               + ("" if matches else " These numbers are for the last applied plan; the table has changed since: "
                                     "Apply again."))
else:
    st.caption("Not evaluated on all evaluation windows yet: press Apply.")

walked = [point for point in history if point["scope"] == scope]
if walked:
    frame = pd.DataFrame(walked)
    frame["step"] = range(1, len(frame) + 1)
    trail = px.scatter(frame, x="decoder_params", y="perplexity", color="measured", symbol="measured", text="step",
                       hover_data={"kl_reverse": ":.4f", "step": True},
                       labels={"decoder_params": "decoder-linear parameters", "measured": "measured"})
    trail.update_traces(marker_size=11, textposition="top center")
    trail.update_layout(height=300, margin=dict(t=10, b=10))
    st.plotly_chart(trail, width="stretch", key="alloc_history")
    st.caption("What this browser session measured on this model, method and texts, numbered in order: quick points "
               "on the first evaluation windows, Apply points on all of them (their perplexities differ by the "
               "windows as well as by the allocation, so compare each kind with itself).")

st.subheader("Plans")
keep = st.columns([2, 1, 2])
name = keep[0].text_input("Plan name", key="alloc_plan_name", placeholder=f"plan-{len(saved) + 1}").strip()
if keep[1].button("Save plan", key="save_plan", disabled=current is None):
    plan_name = name or f"plan-{len(saved) + 1}"
    save_plan(plan_name, current)
    st.success(f"Saved '{plan_name}'{' with its metrics' if current.metrics else ' (not evaluated)'}.")
keep[2].download_button("Download this plan (JSON)", data=current.to_json() if current else "", mime="application/json",
                        file_name=f"{name or 'rank-plan'}.json", key="download_current_plan", disabled=current is None)

upload = st.file_uploader("Load a plan (rankscope.plan/v1 or v2 JSON)", type=["json"], key="alloc_upload")
if upload is not None:
    uploaded_plan = read_uploaded_plan(upload, shapes)  # None after an error saying why it was refused
    if uploaded_plan is not None:
        loaded_name = upload.name.removesuffix(".json")
        if saved.get(loaded_name) != uploaded_plan.to_dict():
            save_plan(loaded_name, uploaded_plan)
        st.success(f"Loaded '{loaded_name}' ({uploaded_plan.method}); it is listed below.")

if saved:
    summaries = pd.DataFrame([plan_summary(plan_name, RankPlan.from_dict(data)) for plan_name, data in saved.items()])
    st.dataframe(
        summaries.rename(columns=METRIC_LABELS), hide_index=True, width="stretch", key="saved_plans_table",
        column_config={
            "decoder_reduction": st.column_config.NumberColumn("removed (decoder)", format="percent"),
            "total_reduction": st.column_config.NumberColumn("removed (model)", format="percent"),
            "Perplexity": st.column_config.NumberColumn(format="%.3f"),
            METRIC_LABELS["kl_forward"]: st.column_config.NumberColumn(format="%.4f"),
            METRIC_LABELS["kl_reverse"]: st.column_config.NumberColumn(format="%.4f"),
        })
    st.caption("Saved and loaded plans of this browser session, compared on parameters (both ways) and on the "
               "metrics measured when they were applied (empty where a plan was saved before Apply).")
    pick = st.columns([2, 1, 1])
    chosen = pick[0].selectbox("Saved plan", list(saved), key="alloc_chosen_plan")
    pick[1].button("Edit in the table", key="edit_saved_plan", on_click=edit_saved_plan, args=(chosen,))
    pick[2].download_button("Download (JSON)", data=RankPlan.from_dict(saved[chosen]).to_json(),
                            mime="application/json", file_name=f"{chosen}.json", key="download_saved_plan")
else:
    st.caption("No saved plans yet: save the current one, or load a plan JSON.")
