"""Recover: train a few vectors on a saved plan's compressed model, watch the loss live, keep the recovered plan."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.access import AccessRefused, path_policy
from app.plans import check_plan_texts, plans_for_model, read_uploaded_plan, save_plan, saved_plans
from app.jobs import JobState
from app.progress import POLL_SECONDS, watch_job
from app.resources import current_store, get_job_board, model_shapes
from app.tasks import (
    recovery_job_id, recovery_job_prefix, recovery_run_id, recovery_steps, start_recovery,
)
from app.workspace import load_workspace_model, persistent, workspace_sidebar
from engine.analysis import METRIC_LABELS
from engine.analysis.allocation import plan_summary
from engine.analysis.recovery_summary import (
    history_rows, loss_points, parameter_rows, quality_rows, run_overview, validation_points,
)
from engine.compression.plan import RankPlan
from engine.compression.plan_settings import plan_settings
from engine.compression.recovered import DEFAULT_SUBSET, RECOVERY_KINDS
from engine.errors import RankScopeError
from engine.recovery.settings import DEFAULT_LEARNING_RATE, RecoverySettings
from engine.recovery.training import RecoveryOutcome, checkpoint_path, describe_settings, stored_outcome
from engine.texts.corpus import BUILTIN_BOOKS

DEFAULTS = RecoverySettings()  # the engine's defaults, as `rankscope recover` has them
SOURCES = {"saved": "a saved plan", "upload": "an uploaded plan JSON"}
PLAN_TEXT = ""  # the training-text choice that means "the plan's calibration text" (the engine's default)

st.title("Recover")
st.caption("Win back quality lost to compression: train a few vectors on a plan's compressed model, fold them into "
           "the factors and keep the recovered plan, which exports like any plan. Runs are stored as they go: a "
           "stopped run resumes from its checkpoint, a finished one is shown again at once.")

workspace = workspace_sidebar()
loaded = load_workspace_model(workspace)
store = current_store()
board = get_job_board()
shapes = model_shapes(loaded)

# -- the plan ---------------------------------------------------------------------------------------------------
st.subheader("Plan")
source = persistent(st.radio, "Plan from", "recover_source", "saved", options=list(SOURCES), format_func=SOURCES.get,
                    horizontal=True)
plan: RankPlan | None = None
plan_name = ""
if source == "saved":
    usable = plans_for_model(shapes)
    startable = {name: p for name, p in usable.items() if p.recovery is None}
    if startable:
        plan_name = persistent(st.selectbox, "Saved plan", "recover_plan", list(startable)[-1],
                               options=list(startable))
        plan = startable[plan_name]
    else:
        st.info("No saved plans for this model to recover yet: save one on the Allocate page, keep a study's best "
                "plan on the Search page, or upload a plan JSON.")
    if len(usable) > len(startable):
        st.caption(f"{len(usable) - len(startable)} recovered plan(s) are not listed: recovery runs do not stack, so "
                   "recover the plan a recovered plan started from.")
else:
    upload = st.file_uploader("Plan JSON (rankscope.plan/v1)", type=["json"], key="recover_upload")
    if upload is not None:
        plan = read_uploaded_plan(upload, shapes)
        plan_name = upload.name.removesuffix(".json")
        if plan is not None and plan.recovery is not None:
            st.error(f"Refused '{upload.name}': it is already the result of recovery run "
                     f"{plan.recovery['run_id'][:12]}; recovery runs do not stack. Upload the plan it started from.")
            plan = None
if plan is None:
    st.stop()

summary = pd.DataFrame([plan_summary(plan_name, plan)])
st.dataframe(summary.rename(columns=METRIC_LABELS), hide_index=True, width="stretch", key="recover_plan_summary",
             column_config={"decoder_reduction": st.column_config.NumberColumn("removed (decoder)", format="percent"),
                            "total_reduction": st.column_config.NumberColumn("removed (model)", format="percent"),
                            "Perplexity": st.column_config.NumberColumn(format="%.3f")})
policy = path_policy()
try:  # the run reads the plan's recorded texts: only where the path policy allows (a shared app), and unchanged
    check_plan_texts(plan)
    plan_settings(plan)
except AccessRefused as exc:
    st.error(f"This plan's recorded texts cannot be read here. {exc}")
    st.stop()
except RankScopeError as exc:
    st.error(f"This plan cannot be recovered as it was measured: {exc}")
    st.stop()
calibration = plan.calibration or {}

# -- the run's settings ---------------------------------------------------------------------------------------------
st.subheader("Recovery")
kind = persistent(st.radio, "Recovery", "recover_kind", DEFAULTS.kind, options=list(RECOVERY_KINDS), horizontal=True,
                  captions=[RECOVERY_KINDS[k] + "." for k in RECOVERY_KINDS],
                  help="subspace keeps the plan's ranks; basis keeps them too unless it prunes (below).")
row = st.columns(4)
steps = persistent(row[0].number_input, "Steps", "recover_steps", DEFAULTS.steps, min_value=1, max_value=1_000_000,
                   step=10, help="Training steps, the step budget (--steps).")
batch = persistent(row[1].number_input, "Windows per step", "recover_batch", DEFAULTS.batch_windows, min_value=1,
                   max_value=1024, step=1, help="The batch size (--batch).")
learning_rate = persistent(row[2].number_input, "Learning rate", f"recover_lr.{kind}", DEFAULT_LEARNING_RATE[kind],
                           min_value=0.0, max_value=1.0, step=1e-4, format="%.1e",
                           help=f"AdamW's learning rate (--lr; default {DEFAULT_LEARNING_RATE[kind]:g}, Bolaco's).")
subset = persistent(row[3].number_input, "r' (subspace)", "recover_subset", DEFAULT_SUBSET, min_value=1,
                    max_value=65536, step=8, disabled=kind != "subspace",
                    help="The leading directions of each compressed linear that subspace post-training trains, capped "
                         "at its rank (--subset).")
row = st.columns(3)
prune = persistent(row[0].checkbox, "Prune directions (basis)", "recover_prune", False, disabled=kind != "basis",
                   help="Drop the least important directions in rounds, retraining between rounds, until this share of "
                        "the decoder-linear parameters is removed (--prune-to).") and kind == "basis"
prune_to = persistent(row[1].number_input, "Prune to (decoder-linear share removed)", "recover_prune_to", 0.5,
                      min_value=0.01, max_value=0.99, step=0.05, format="%.2f", disabled=not prune)
prune_rounds = persistent(row[2].number_input, "Pruning rounds", "recover_prune_rounds", DEFAULTS.prune_rounds,
                          min_value=1, max_value=1000, step=1, disabled=not prune, help="--prune-rounds")

st.markdown("**Training text**")
plan_text = calibration.get("text") or (plan.evaluation or {}).get("text") or "?"
row = st.columns(2)
book = persistent(row[0].selectbox, "Text", "recover_text_book", PLAN_TEXT, options=[PLAN_TEXT, *BUILTIN_BOOKS],
                  format_func=lambda name: f"the plan's calibration text ({plan_text})" if name == PLAN_TEXT else name,
                  help="By default the run trains on the plan's calibration text after its calibration (and "
                       "evaluation) windows, so it never trains on what the factors were fitted to or what the "
                       "plan is measured on. Another text trains for a target application (--train-text).")
path = persistent(row[1].text_input, "...or a .txt/.jsonl/.parquet path", "recover_text_file", "").strip()
training_text = None if book == PLAN_TEXT else book
text_refused = None
if path:
    try:
        training_text = policy.text_source(path)
        st.caption(f"Training on the file, not the choice on the left: {path}")
    except AccessRefused as exc:
        text_refused = f"Training text: {exc}"
row = st.columns(3)
training_windows = persistent(row[0].number_input, "Training windows", "recover_training_windows",
                              DEFAULTS.training_windows, min_value=1, max_value=1_000_000, step=16,
                              help="Windows the steps cycle through (--training-windows).")
validation_windows = persistent(row[1].number_input, "Validation windows", "recover_validation_windows",
                                DEFAULTS.validation_windows, min_value=1, max_value=4096, step=1,
                                help="Held-out windows right after the training windows, for the live validation "
                                     "perplexity (--validation-windows).")
eval_every = persistent(row[2].number_input, "Validate every (steps)", "recover_eval_every", DEFAULTS.eval_every,
                        min_value=1, max_value=1_000_000, step=1,
                        help="--eval-every; the last step is always measured.")
with st.expander("More settings"):
    row = st.columns(4)
    window_len = persistent(row[0].number_input, "Window length (tokens)", "recover_window_len", None, min_value=2,
                            max_value=16384, step=16, placeholder=f"the plan's ({calibration.get('window_len', '?')})",
                            help="--train-window-len; empty: the plan's calibration window length.")
    start_window = persistent(row[1].number_input, "First training window", "recover_start_window", None, min_value=0,
                              max_value=10_000_000, step=1, placeholder="after the plan's windows",
                              help="--start-window; empty: after the plan's calibration (and evaluation) windows in "
                                   "that text.")
    checkpoint_every = persistent(row[2].number_input, "Checkpoint every (steps)", "recover_checkpoint_every",
                                  DEFAULTS.checkpoint_every, min_value=1, max_value=1_000_000, step=1,
                                  help="--checkpoint-every; Stop always checkpoints too.")
    seed = persistent(row[3].number_input, "Seed", "recover_seed", DEFAULTS.seed, min_value=0, step=1,
                      help="The batch order's seed (--seed).")

settings = None
try:
    # defaults are passed as the engine's own (None, or the default value), so the page and `rankscope recover`
    # name the same run (a run's key is its resolved settings) and each finds what the other stored
    settings = RecoverySettings(
        kind=kind, steps=int(steps), batch_windows=int(batch),
        learning_rate=None if learning_rate == DEFAULT_LEARNING_RATE[kind] else float(learning_rate),
        subset=int(subset) if kind == "subspace" else DEFAULT_SUBSET, training_text=training_text,
        window_len=None if window_len is None else int(window_len), training_windows=int(training_windows),
        start_window=None if start_window is None else int(start_window), validation_windows=int(validation_windows),
        eval_every=int(eval_every), checkpoint_every=int(checkpoint_every),
        prune_to=float(prune_to) if prune else None, prune_rounds=int(prune_rounds) if prune else DEFAULTS.prune_rounds,
        seed=int(seed))
    resolved = settings.resolved(plan.calibration, plan.evaluation)
    run_id = recovery_run_id(loaded, plan, settings)
except RankScopeError as exc:
    st.error(f"Cannot start this recovery: {exc}")
    settings = None
if text_refused:
    st.error(text_refused)
if settings is None or text_refused:
    st.stop()

st.caption(f"Recovery {describe_settings(resolved)}. Before and after: perplexity and both KLs on the plan's "
           f"evaluation text '{(plan.evaluation or {}).get('text', '?')}'.")
job_id = recovery_job_id(loaded, run_id)
job = board.get(job_id)
running = job is not None and job.running
outcome = job.result if job is not None and isinstance(job.result, RecoveryOutcome) else None
if outcome is None and not running:
    outcome = stored_outcome(store, run_id)  # finished before (here or by `rankscope recover`): shown at once
checkpointed = outcome is None and not running and checkpoint_path(store, run_id).is_file()
if checkpointed:
    st.info("This run was stopped part-way and its checkpoint is kept: Resume recovery continues from it.")
if st.button("Resume recovery" if checkpointed else "Start recovery", type="primary", key="recover_start",
             disabled=running or outcome is not None,
             help="Runs in the background: leave the page or close the tab, it goes on; a finished run is kept."):
    start_recovery(loaded, plan, settings, f"Recovery ({kind}) of '{plan_name}'")
    st.rerun()
job = watch_job(job_id, stoppable=True, what_to_do="Change the settings above and start again.")
for other in board.with_prefix(recovery_job_prefix(loaded)):
    if other.running and other.job_id != job_id:  # a run with other settings, started here or in another tab
        st.caption(f"Also running on this model: {other.label} (its settings differ from the ones above).")
        watch_job(other.job_id, stoppable=True)


def curve_figure(rows: list[dict]) -> go.Figure:
    """Training loss per step (left axis) and validation perplexity where measured (right axis)."""
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    losses, validations = pd.DataFrame(loss_points(rows)), pd.DataFrame(validation_points(rows))
    if not losses.empty:
        figure.add_scatter(x=losses["step"], y=losses["loss"], mode="lines", name="training loss",
                           line=dict(color="#4c78a8"), secondary_y=False)
    if not validations.empty:
        figure.add_scatter(x=validations["step"], y=validations["validation_perplexity"], mode="lines+markers",
                           name="validation perplexity", line=dict(color="#f58518"), secondary_y=True)
    figure.update_layout(height=360, margin=dict(t=10, b=10), xaxis_title="step",
                         legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    figure.update_yaxes(title_text="training loss (nats/token)", secondary_y=False)
    figure.update_yaxes(title_text="validation perplexity", secondary_y=True)
    return figure


if job is not None and job.state is JobState.STOPPED and recovery_steps(job_id):
    st.plotly_chart(curve_figure(history_rows(recovery_steps(job_id))), width="stretch", key="recovery_stopped_curve")
    st.caption("The steps this run took before it was stopped (a resumed run's curve continues from its checkpoint).")
if running:
    @st.fragment(run_every=POLL_SECONDS)
    def live_curve() -> None:
        rows = history_rows(recovery_steps(job_id))
        if not rows:
            st.caption("The training curve appears after the first step; the run first calibrates (once per plan) and "
                       "measures the plan before training.")
            return
        st.plotly_chart(curve_figure(rows), width="stretch", key="recovery_live_curve")
        st.caption(f"Step {rows[-1]['step']}: training loss {rows[-1]['loss']:.4f}. Validation perplexity is measured "
                   f"every {settings.eval_every} steps on {settings.validation_windows} held-out windows.")

    live_curve()
if outcome is None:
    st.stop()

# -- the result -------------------------------------------------------------------------------------------------
st.subheader("Result")
result = outcome.result
overview = run_overview(outcome.record, result)
if outcome.from_cache:
    st.info(f"This run (id {run_id[:12]}) finished before; its stored result is shown.")
elif overview["resumed_from"]:
    st.success(f"Finished, resumed from the checkpoint at step {overview['resumed_from']}.")
else:
    st.success("Finished.")
head = st.columns(4)
head[0].metric("Steps", f"{overview['steps']:,}")
head[1].metric("Tokens", f"{overview['tokens']:,}", help="steps × windows per step × window length")
head[2].metric("Training time", f"{overview['seconds']:.1f} s", help="The training steps, without the evaluations "
                                                                     "before and after; a resumed run adds its parts.")
head[3].metric("Peak memory", f"{overview['peak_memory_gib']:.2f} GiB",
               help="The app process's peak resident memory while the run trained (sampled), everything it holds "
                    "included.")
quality = pd.DataFrame(quality_rows(result, plan.evaluation))
st.dataframe(quality, hide_index=True, width="stretch", key="recover_quality",
             column_config={"before": st.column_config.NumberColumn(format="%.4g"),
                            "after": st.column_config.NumberColumn(format="%.4g"),
                            "change": st.column_config.NumberColumn("after vs before", format="percent")})
st.caption("Perplexity and both KLs (to the original model, per predicted token, in nats) on the plan's evaluation "
           "text, which the run never trains on; and perplexity on held-out windows of the training text.")
parameters = pd.DataFrame(parameter_rows(result))
st.dataframe(parameters, hide_index=True, width="stretch", key="recover_parameters",
             column_config={"removed_before": st.column_config.NumberColumn("removed before", format="percent"),
                            "removed_after": st.column_config.NumberColumn("removed after", format="percent")})
if overview["directions_kept"] is not None:
    st.caption(f"{overview['directions_kept']:,} directions kept over the compressed linears after the last step.")
rows = history_rows(result.get("history", []), (result.get("validation") or {}).get("before"))
st.plotly_chart(curve_figure(rows), width="stretch", key="recovery_curve")
st.caption("The training loss per step and the validation perplexity where it was measured (step 0: before "
           "training). A loss that falls while the validation perplexity rises means the run overfits its windows.")

st.markdown("**Keep the recovered plan**")
row = st.columns([3, 1])
name = row[0].text_input("Save as", f"{plan_name}-{kind}", key=f"recover_save_name.{run_id[:12]}").strip()
existing = saved_plans().get(name)
taken = existing is not None and ((existing.get("recovery") or {}).get("run_id") != run_id)
if taken:
    st.error(f"A saved plan named '{name}' exists and is not this run's: choose another name, so it is kept.")
if row[1].button("Save the recovered plan", key="recover_save", disabled=not name or taken,
                 help="Adds it to the saved plans (Allocate, Recover and Export pages) and to the shelf next to the "
                      "cache. It needs this cache: its trained vectors are stored here."):
    save_plan(name, outcome.plan)
if saved_plans().get(name) == outcome.plan.to_dict():
    st.success(f"'{name}' is in the saved plans: export it on the Export page.")
st.download_button("Download the recovered plan (JSON)", data=outcome.plan.to_json(), mime="application/json",
                   file_name=f"{name or 'recovered'}.json", key="download_recovered_plan")
