"""Export: keep a plan as JSON, write the compressed model as a directory that reloads anywhere, and compare."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from app.access import AccessRefused, path_policy
from app.plans import check_plan_texts, plans_for_model, read_uploaded_plan, save_plan
from app.progress import watch_job
from app.resources import current_store, get_job_board, model_shapes
from app.tasks import (
    export_job_prefix, export_plan_settings, generation_job_id, start_export, start_generation, start_study_plan,
    study_plan_job_id,
)
from app.workspace import load_workspace_model, persistent, workspace_sidebar
from engine.analysis import METRIC_LABELS
from engine.analysis.allocation import plan_summary
from engine.analysis.export_summary import MIB, check_rows, export_overview, export_rows, quality_rows, size_speed_rows
from engine.compression.plan import RankPlan
from engine.errors import RankScopeError
from engine.export import check_export_storage
from engine.export.format import CARD_FILE, PLAN_FILE
from engine.export.report import DEFAULT_NEW_TOKENS, DEFAULT_PROMPT, SideBySide
from engine.search.summary import best_trial
from engine.search.duckdb_storage import DuckDBStudyStorage

SOURCES = {"saved": "a saved plan", "study": "a study's best plan", "upload": "an uploaded plan JSON"}
SHOWN = "export_shown"  # the export id whose report is shown

st.title("Export")
st.caption("Keep what you found: download the rank plan, write the compressed model as a Hugging Face directory "
           "that reloads anywhere (the export proves it by reloading it and comparing its tensors and logits with "
           "the model in memory), and compare generations.")

workspace = workspace_sidebar()
loaded = load_workspace_model(workspace)
store = current_store()
board = get_job_board()
shapes = model_shapes(loaded)

# -- the plan ---------------------------------------------------------------------------------------------------
st.subheader("Plan")
source = persistent(st.radio, "Plan from", "export_source", "saved", options=list(SOURCES), format_func=SOURCES.get,
                    horizontal=True)
plan: RankPlan | None = None
plan_name = ""
if source == "saved":
    usable = plans_for_model(shapes)
    if usable:
        plan_name = persistent(st.selectbox, "Saved plan", "export_saved_plan", list(usable)[-1], options=list(usable))
        plan = usable[plan_name]
    else:
        st.info("No saved plans for this model yet: save one on the Allocate page, use a study's best plan, or "
                "upload a plan JSON.")
elif source == "study":
    storage = DuckDBStudyStorage(store)
    studies = [r.study_id for r in storage.list_studies()
               if r.model_fingerprint == loaded.fingerprint and best_trial(storage, r.study_id) is not None]
    if studies:
        study_id = st.selectbox("Study", studies[::-1], key="export_study")
        if st.button("Use its best plan", key="export_use_best"):
            start_study_plan(loaded, study_id)
            st.rerun()
        job = watch_job(study_plan_job_id(loaded, study_id), what_to_do="Resume the study on the Search page, then "
                                                                         "try again.")
        if job is not None and isinstance(job.result, RankPlan):
            plan_name = f"{study_id}-best"
            plan = job.result
            save_plan(plan_name, plan)
    else:
        st.info("No study of this model has a finished trial yet: run one on the Search page.")
else:
    upload = st.file_uploader("Plan JSON (rankscope.plan/v1)", type=["json"], key="export_upload")
    if upload is not None:
        plan = read_uploaded_plan(upload, shapes)
        plan_name = upload.name.removesuffix(".json")
if plan is None:
    st.stop()

summary = pd.DataFrame([plan_summary(plan_name, plan)])
st.dataframe(summary.rename(columns=METRIC_LABELS), hide_index=True, width="stretch", key="export_plan_summary",
             column_config={"decoder_reduction": st.column_config.NumberColumn("removed (decoder)", format="percent"),
                            "total_reduction": st.column_config.NumberColumn("removed (model)", format="percent"),
                            "Perplexity": st.column_config.NumberColumn(format="%.3f")})
st.download_button("Download the rank plan (JSON)", data=plan.to_json(), mime="application/json",
                   file_name=f"{plan_name}.json", key="download_plan")
try:  # the plan's recorded texts are read to locate them: only where the path policy allows (a shared app)
    check_plan_texts(plan)
    run_with = export_plan_settings(workspace, plan)
except AccessRefused as exc:
    st.error(f"This plan's recorded texts cannot be read here. {exc}")
    st.stop()
except RankScopeError as exc:
    st.error(f"This plan cannot be exported as it was measured: {exc}")
    st.stop()
texts = run_with.texts
st.caption(f"Factors from {plan.method} calibrated on {texts.describe_calibration()} (the plan's own calibration, so "
           f"the exported model is the one it measured); quality measured on {texts.describe_evaluation()}.")
for note in run_with.notes:
    st.info(note)

# -- export -----------------------------------------------------------------------------------------------------
st.subheader("Export the compressed model")
slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{Path(loaded.model_id).name}-{plan_name}").strip("-.") or "export"
policy = path_policy()
out_dir = persistent(st.text_input, "Directory", f"export_dir.{plan_name}", str(policy.workspace / slug),
                     help="A new or empty directory, or an earlier export with the box below ticked."
                          + (f" Inside {policy.workspace} (this app is shared)." if policy.shared else "")).strip()
try:
    target = policy.export_directory(out_dir) if out_dir else None
except AccessRefused as exc:
    target = None
    st.error(str(exc))
overwrite = st.checkbox("Replace an earlier export in this directory", key="export_overwrite",
                        help="Only a RankScope export is replaced, once the new one has passed its checks; a directory "
                             "holding any file that export did not write (or that is not an export) is never changed.")
dense = st.checkbox("Dense export: NOT smaller. Stores W = B·A as plain linear weights, for tools that need "
                    "standard layers; same size and speed as the original.", key="export_dense")
evaluate_reload = st.checkbox("Evaluate the reloaded model on every evaluation window", key="export_evaluate_reload",
                              help="Slower. Without it, a plan that records its quality for these windows reports that "
                                   "record once the reload is proven to hold the written tensors bit for bit (and to "
                                   "give identical logits); a plan without a record is always evaluated.")
storage_refused = None
try:
    check_export_storage(plan, dense)  # a pruned plan cannot be written dense: said now, before any work
except RankScopeError as exc:
    storage_refused = str(exc)
    st.error(storage_refused)
options = st.columns([3, 1, 1])
prompt = options[0].text_input("Prompt for the report's generation and tokens/s", DEFAULT_PROMPT, key="export_prompt")
new_tokens = options[1].number_input("New tokens", min_value=1, max_value=512, value=DEFAULT_NEW_TOKENS, step=1,
                                     key="export_new_tokens")
timing_runs = options[2].number_input("Timing runs", min_value=1, max_value=10, value=1, step=1, key="export_runs",
                                      help="tokens/s is 1 / the median time between generated tokens, timed during "
                                           "the side-by-side generation; more runs add that many − 1 generations per "
                                           "model, alternating.")
if st.button("Export", type="primary", key="export_model", disabled=target is None or storage_refused is not None) \
        and target is not None and storage_refused is None:
    start_export(loaded, plan, texts, target, dense, prompt, int(new_tokens), int(timing_runs), overwrite=overwrite,
                 evaluate_reload=evaluate_reload)
    st.rerun()
for job in board.with_prefix(export_job_prefix(loaded)):
    finished = watch_job(job.job_id, stoppable=True,
                         what_to_do="Choose another directory, or fix the cause above, then export again.")
    if finished is not None and isinstance(finished.result, str) and not finished.running:
        st.success(f"Exported to {finished.result}; it reloads and reproduces the compressed model (report below).")
        latest = [e for e in store.exports(loaded.fingerprint) if e["path"] == finished.result]
        if latest and st.session_state.get(f"{SHOWN}.{job.job_id}") != finished.finished_at:
            st.session_state[f"{SHOWN}.{job.job_id}"] = finished.finished_at
            st.session_state[SHOWN] = latest[-1]["export_id"]

# -- the report -----------------------------------------------------------------------------------------------------
st.subheader("Export report")
exports = {entry["export_id"]: entry for entry in store.exports(loaded.fingerprint)}
if not exports:
    st.info("No exports of this model yet: export a plan above.")
    st.stop()
rows = export_rows(list(exports.values()))
labels = {row["export_id"]: f"{row['directory']} ({row['storage']}, {row['exported_at']:%Y-%m-%d %H:%M:%S}"
          f"{'' if row['current'] else ', replaced since'})" for row in rows}
if st.session_state.get(SHOWN) not in exports:
    st.session_state[SHOWN] = rows[0]["export_id"]
shown = st.selectbox("Export", list(labels), format_func=labels.get, key=SHOWN)
report = exports[shown]["report"]
overview = export_overview(report)
directory = Path(overview["out_dir"])

if overview["storage"] == "dense":
    st.warning("Dense export: NOT smaller than the original. The low-rank products are stored as plain weights.")
head = st.columns(4)
head[0].metric("Reload check", "passed" if overview["passed"] else "FAILED",
               help=f"{overview['checks_passed']} of {overview['checks_total']} self-checks passed (table below).")
head[1].metric("Decoder-linear parameters", f"{overview['decoder_compressed']:,}",
               f"{overview['decoder_reduction']:.2%} removed", delta_color="off", delta_arrow="off",
               help=f"of {overview['decoder_dense']:,} dense")
head[2].metric("Model parameters", f"{overview['total_compressed']:,}", f"{overview['total_reduction']:.2%} removed",
               delta_color="off", delta_arrow="off", help=f"of {overview['total_dense']:,}; {overview['reloaded_parameters']:,} after "
                                       "reloading (plus any bias the method adds)")
head[3].metric("Weights file", f"{overview['weights_bytes'] / MIB:,.2f} MiB",
               None if overview["size_ratio"] is None else f"{overview['size_ratio']:.1%} of the original",
               delta_color="off", delta_arrow="off", help="model.safetensors, float32")
quality = st.columns(4)
quality[0].metric("Perplexity", f"{overview['perplexity']:.3f}",
                  help="of the model reloaded from the directory" if report.get("reload_evaluated", True) else
                  "the plan's record for these windows: the reloaded tensors are the written ones bit for bit")
quality[1].metric("Original perplexity", f"{overview['original_perplexity']:.3f}")
quality[2].metric(METRIC_LABELS["kl_forward"], f"{overview['kl_forward']:.4g}")
quality[3].metric(METRIC_LABELS["kl_reverse"], f"{overview['kl_reverse']:.4g}")
speed = st.columns(4)
speed[0].metric("Tokens/s original", f"{overview['original_tokens_per_second']:.1f}")
speed[1].metric("Tokens/s compressed", f"{overview['compressed_tokens_per_second']:.1f}",
                f"×{overview['speedup']:.2f} the original" if overview["speedup"] else None, delta_color="off",
                delta_arrow="off")
evaluation = report["evaluation"]
st.caption(f"Quality on '{evaluation['text']}', {evaluation['n_windows']} windows of {evaluation['window_len']} tokens; "
           "KL per predicted token in nats. Tokens/s: batch 1, greedy, measured at export time on this machine.")

bars = px.bar(pd.DataFrame(size_speed_rows(report)), x="model", y="value", color="model", facet_col="measure",
              color_discrete_map={"original": "#4c78a8", "compressed": "#f58518"})
bars.update_yaxes(matches=None, showticklabels=True, title_text="")
bars.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
bars.update_layout(height=300, margin=dict(t=30, b=10), showlegend=False)
st.plotly_chart(bars, width="stretch", key="size_and_speed")
st.caption("File size of the weights and generation speed, original against compressed. Low-rank factors save bytes "
           "in proportion to the parameters removed; on a small model the embeddings dominate both, so expect less "
           "than the decoder-linear reduction suggests.")

st.dataframe(pd.DataFrame(quality_rows(report)).rename(columns=METRIC_LABELS), hide_index=True, width="stretch",
             key="export_quality", column_config={"Perplexity": st.column_config.NumberColumn(format="%.4f"),
                                                  METRIC_LABELS["kl_forward"]: st.column_config.NumberColumn(format="%.3e"),
                                                  METRIC_LABELS["kl_reverse"]: st.column_config.NumberColumn(format="%.3e")})
st.caption("The original, the compressed model in memory and the model reloaded from the directory: the last two "
           "agree when the export is faithful.")
st.dataframe(pd.DataFrame(check_rows(report)), hide_index=True, width="stretch", key="export_checks",
             column_config={"detail": st.column_config.TextColumn(width="large")})
st.caption("The checks the export ran before it reported success; a failed check leaves the directory unwritten.")
generation = report["generation"]
st.markdown(f"At export, prompt `{generation['prompt']}`: the first {generation['matching_tokens']} of "
            f"{generation['new_tokens']} generated tokens are identical.")

downloads = st.columns(2)
for column, name, label, mime in ((downloads[0], PLAN_FILE, "Download rank_plan.json (with the export's metrics)",
                                   "application/json"),
                                  (downloads[1], CARD_FILE, "Download the model card (README.md)", "text/markdown")):
    path = directory / name
    if path.is_file():
        column.download_button(label, data=path.read_bytes(), file_name=name, mime=mime, key=f"download_{name}")
if not directory.is_dir():
    st.warning(f"{directory} is no longer there; the report above is what the export measured.")
    st.stop()

# -- side by side -------------------------------------------------------------------------------------------------
st.subheader("Side by side")
inputs = st.columns([4, 1])
user_prompt = inputs[0].text_input("Prompt", DEFAULT_PROMPT, key="generate_prompt")
user_tokens = inputs[1].number_input("New tokens", min_value=1, max_value=512, value=DEFAULT_NEW_TOKENS, step=1,
                                     key="generate_new_tokens")
if st.button("Generate", key="generate", disabled=not user_prompt.strip()):
    start_generation(loaded, str(directory), user_prompt, int(user_tokens))
    st.rerun()
job = watch_job(generation_job_id(loaded, str(directory)), what_to_do="Check the export directory, then try again.")
if job is not None and isinstance(job.result, SideBySide):
    result = job.result
    sides = st.columns(2)
    sides[0].markdown("**Original**")
    sides[0].text(result.prompt + result.original)
    sides[1].markdown(f"**Compressed** (reloaded from `{directory.name}`)")
    sides[1].text(result.prompt + result.compressed)
    st.caption(f"Greedy decoding, {result.new_tokens} new tokens; the first {result.matching_tokens} are identical. "
               "Where they part is where the compression first changed the most likely next token.")
