"""Model & texts: which model is loaded, what it is made of, how well it predicts, and what is cached."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app.jobs import ModelBusy
from app.progress import progress_bar, watch_job
from app.resources import current_store, get_job_board, get_model_guard
from app.tasks import calibration_scope, model_scope, start_calibration
from app.workspace import load_workspace_model, workspace_sidebar
from engine.cache.lookups import find_baseline_evaluation, find_calibration
from engine.errors import RankScopeError
from engine.models.summary import parameter_summary
from engine.store.cache_inventory import (
    cached_artifacts, cached_calibrations, cached_evaluations, cached_sweeps, forget_artifact, human_bytes,
)
from engine.cache.evaluation import ensure_baseline_evaluation

st.title("RankScope")
st.caption("Where does a language model's redundancy live? Start by choosing the model and the texts.")

workspace = workspace_sidebar()
loaded = load_workspace_model(workspace)
store = current_store()
board = get_job_board()

summary = parameter_summary(loaded)
st.subheader(workspace.model_reference)
cols = st.columns(5)
cols[0].metric("Architecture", summary.model_type)
cols[1].metric("Layers", summary.num_layers)
cols[2].metric("Parameters", f"{summary.total / 1e6:.1f} M" if summary.total >= 1e6 else f"{summary.total:,}")
cols[3].metric("Decoder linears", f"{summary.decoder_linear / 1e6:.1f} M" if summary.decoder_linear >= 1e6
               else f"{summary.decoder_linear:,}")
cols[4].metric("Embedding share", f"{summary.embedding_share:.1%}")
st.write(
    f"Hidden size {summary.hidden_size}, intermediate size {summary.intermediate_size}, "
    f"{summary.num_attention_heads} query / {summary.num_key_value_heads} key-value heads, "
    f"vocabulary {summary.vocab_size:,}, embeddings {'tied' if summary.tied_embeddings else 'untied'}."
)

rows = pd.DataFrame(summary.rows())
left, right = st.columns([3, 2])
with left:
    figure = px.bar(rows, x="group", y="parameters", text=rows["share"].map(lambda s: f"{s:.1%}"))
    figure.update_layout(height=340, margin=dict(t=10, b=10), yaxis_title="parameters")
    st.plotly_chart(figure, width="stretch")
    st.caption(
        "Parameters by group, summed over layers. Low-rank compression acts on the seven decoder linear types; "
        "on a small model the embedding is a large share that it cannot touch, so compression is reported "
        "over decoder linears and over the whole model."
    )
with right:
    st.dataframe(
        rows.assign(share=rows["share"].map(lambda s: f"{s:.2%}")), hide_index=True, width="stretch"
    )

st.subheader("Original model quality")
text_source = workspace.evaluation_text
try:
    record = find_baseline_evaluation(store, loaded.fingerprint, text_source, workspace.evaluation_windowing,
                                      loaded.dtype)
    if record is None:
        with get_model_guard(loaded.fingerprint).hold("measuring the original perplexity", timeout=0.5):
            record = ensure_baseline_evaluation(
                store, loaded, text_source, workspace.evaluation_windowing,
                progress_bar("Evaluating the original model..."),
            )
except ModelBusy as exc:
    record = None
    st.info(str(exc))
    for job in board.with_prefix(model_scope(loaded)):
        watch_job(job.job_id)
except RankScopeError as exc:
    record = None
    st.error(f"Could not evaluate on '{text_source}'. {exc} Choose another evaluation text or fewer windows.")
if record is not None:
    quality = st.columns(3)
    quality[0].metric("Perplexity", f"{record.perplexity:.3f}")
    quality[1].metric("Predicted tokens", f"{record.n_tokens:,}")
    quality[2].metric("Evaluation time", f"{record.seconds:.1f} s")
    st.caption(
        f"Perplexity = exp(mean next-token negative log-likelihood) over {record.n_windows} windows of "
        f"{record.window_len} tokens from the start of '{text_source}'"
        f"{' (each window starts with BOS)' if record.add_bos else ''}. Cached: reopening this page is instant."
    )

st.subheader("Calibration")
st.write(f"Calibration statistics (mean, covariances, second moment and channel norms of every input site) "
         f"over {workspace.describe_calibration()}. Spectra, data-aware methods and sweeps build on them.")
try:
    calibration = find_calibration(store, loaded.fingerprint, workspace.calibration_text,
                                   workspace.calibration_windowing, workspace.n_groups, loaded.dtype)
except RankScopeError as exc:
    calibration = None
    st.error(f"Calibration text problem: {exc}")
scope = calibration_scope(workspace, loaded)
running = [job for job in board.with_prefix(scope) if job.running]
if calibration is not None:
    st.success(f"Cached: {calibration.n_tokens:,} tokens in {calibration.n_windows} windows, "
               f"computed in {calibration.seconds:.1f} s.")
elif not running:
    if st.button("Run calibration", type="primary", key="run_calibration"):
        start_calibration(workspace, loaded)
        st.rerun()
for job in board.with_prefix(scope):
    watch_job(job.job_id, stoppable=True,
              what_to_do="Check the calibration text, or use fewer groups or windows, then run it again.")

st.subheader("Cached for this model")
calibrations = pd.DataFrame(cached_calibrations(store, loaded.fingerprint))
evaluations = pd.DataFrame(cached_evaluations(store, loaded.fingerprint))
sweeps = pd.DataFrame(cached_sweeps(store, loaded.fingerprint))
st.markdown("**Calibrations**")
if calibrations.empty:
    st.caption("None yet.")
else:
    st.dataframe(calibrations[["text", "window_len", "n_windows", "n_groups", "n_tokens", "seconds", "created_at"]]
                 .rename(columns={"window_len": "window", "n_windows": "windows", "n_groups": "groups",
                                  "n_tokens": "tokens", "created_at": "computed at"}),
                 hide_index=True, width="stretch", key="cached_calibrations",
                 column_config={"seconds": st.column_config.NumberColumn(format="%.1f")})
st.markdown("**Evaluations of the original model**")
if evaluations.empty:
    st.caption("None yet.")
else:
    st.dataframe(evaluations[["text", "window_len", "n_windows", "n_tokens", "perplexity", "seconds", "created_at"]]
                 .rename(columns={"window_len": "window", "n_windows": "windows", "n_tokens": "tokens",
                                  "created_at": "computed at"}),
                 hide_index=True, width="stretch", key="cached_evaluations",
                 column_config={"perplexity": st.column_config.NumberColumn(format="%.3f"),
                                "seconds": st.column_config.NumberColumn(format="%.1f")})
st.markdown("**Sensitivity sweeps**")
if sweeps.empty:
    st.caption("None yet.")
else:
    st.dataframe(sweeps[["method", "evaluation_text", "window_len", "n_windows", "points_by_type", "points_by_layer"]]
                 .rename(columns={"evaluation_text": "evaluation text", "window_len": "window", "n_windows": "windows",
                                  "points_by_type": "per-type points", "points_by_layer": "per-layer points"}),
                 hide_index=True, width="stretch", key="cached_sweeps")
st.caption("Everything here is read from the cache database: a result computed once (on any page, in the "
           "command line or in a script) is reused, and deleting the cache loses only computing time.")

st.subheader("Cache on disk")
whole = st.radio("Show", ["this model", "the whole cache"], horizontal=True, key="cache_scope") == "the whole cache"
artifacts = cached_artifacts(store, None if whole else loaded.fingerprint)
by_id = {a.artifact_id: a for a in artifacts}
totals = st.columns(2)
totals[0].metric("On disk", human_bytes(sum(a.n_bytes for a in artifacts)))
totals[1].metric("Artifacts", len(artifacts))
if artifacts:
    st.dataframe(pd.DataFrame([{
        "kind": a.kind, "what": a.description, "model": a.model, "texts": a.texts, "MB": a.n_bytes / 1e6,
        "made": a.created_at, "id": a.artifact_id} for a in artifacts]),
        hide_index=True, width="stretch", key="cache_artifacts",
        column_config={"MB": st.column_config.NumberColumn(format="%.2f")})
else:
    st.caption("Nothing cached yet.")
st.caption("Sizes are the files each artifact keeps below the cache folder (arrays, a study's JSON copy, a "
           "checkpoint, a converted model); spectra, evaluations, sweeps and export records are rows of the "
           "database. Windows, MLP sweep points, recovery checkpoints and unused array files do not record their "
           "model: they are listed with the whole cache. Studies and converted models are listed, not deleted here.")
notice = st.session_state.pop("cache_deleted", None)
if notice:
    st.success(notice)
version = st.session_state.get("cache_selection_version", 0)
deletable = [a.artifact_id for a in artifacts if a.deletable]
chosen = st.multiselect(
    "Artifacts to delete", deletable, key=f"cache_selection_{version}",
    format_func=lambda aid: f"{by_id[aid].kind}: {by_id[aid].description} ({human_bytes(by_id[aid].n_bytes)})")
chosen_bytes = sum(by_id[a].n_bytes for a in chosen)
if chosen and st.button(f"Delete {len(chosen)} artifact(s), {human_bytes(chosen_bytes)}...", key="cache_delete"):
    st.session_state["cache_pending"] = list(chosen)
pending = [aid for aid in st.session_state.get("cache_pending", []) if aid in by_id]
if pending:
    with st.container(border=True):
        pending_bytes = sum(by_id[a].n_bytes for a in pending)
        st.warning(f"Delete these {len(pending)} artifact(s) and free {human_bytes(pending_bytes)}? What each one costs:")
        st.markdown("\n".join(f"- **{by_id[a].kind}** {by_id[a].description}: {by_id[a].on_delete}" for a in pending))
        confirm, cancel = st.columns(2)
        if confirm.button("Delete them", type="primary", key="cache_confirm"):
            freed, failed = 0, []
            for aid in pending:
                try:
                    freed += forget_artifact(store, aid).bytes_freed
                except RankScopeError as exc:
                    failed.append(f"{aid}: {exc}")
            st.session_state["cache_deleted"] = (
                f"Deleted {len(pending) - len(failed)} artifact(s), freed {human_bytes(freed)}."
                + (f" Not deleted: {'; '.join(failed)}" if failed else ""))
            st.session_state.pop("cache_pending", None)
            st.session_state["cache_selection_version"] = version + 1
            st.rerun()
        if cancel.button("Cancel", key="cache_cancel"):
            st.session_state.pop("cache_pending", None)
            st.rerun()
