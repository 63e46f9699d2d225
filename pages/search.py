"""Search: Bayesian optimisation of rank allocations under a budget, with trials watched live from the store."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app.plans import plans_for_model, read_uploaded_plan, save_plan
from app.progress import watch_job
from app.resources import current_store, get_job_board, model_shapes
from app.tasks import model_scope, start_study, start_study_plan, study_job_id, study_plan_job_id
from app.workspace import choose_method, load_workspace_model, persistent, set_persistent, workspace_sidebar
from engine.analysis import METRIC_LABELS
from engine.analysis.search_summary import (
    INTERRUPTED, achieved_ratios, baseline_marks, best_so_far_rows, full_text_rows, selection_rows, study_rows, study_state,
    trial_rows,
)
from engine.compression.grouping import Grouping
from engine.compression.plan import RankPlan
from engine.errors import RankScopeError
from engine.search.records import StudyState
from engine.search.runner import new_study_id, study_groups
from engine.search.settings import MLP_FORMS, OBJECTIVE_KL, STRATEGIES, SUBSETS, StudySettings
from engine.search.summary import best_trial, study_summary, trial_values, warm_start_from_plan
from engine.search.duckdb_storage import DuckDBStudyStorage

DEFAULTS = StudySettings()  # the engine's defaults, as `rankscope search start` has them
WARM_STARTS = {"none": "none", "saved": "a saved plan", "upload": "an uploaded plan JSON", "study": "another study's best"}
KIND_COLOURS = {"search": "#4c78a8", "warm start": "#f58518", "prior": "#54a24b", "baseline": "#e45756"}

st.title("Search")
st.caption("Bayesian optimisation (Gaussian process, Expected Improvement) of one ratio per group, every plan "
           "projected exactly onto the budget and scored by log PPL + β·KL on validation windows. Trials are "
           "stored as they finish, so they arrive here live, in every tab, and survive a closed tab or a restart.")

workspace = workspace_sidebar()
loaded = load_workspace_model(workspace)
storage = DuckDBStudyStorage(current_store())
board = get_job_board()
shapes = model_shapes(loaded)
records = storage.list_studies()
studies = [r for r in records if r.model_fingerprint == loaded.fingerprint]

# -- a new study ------------------------------------------------------------------------------------------------
with st.expander("New study", expanded=not studies):
    method = choose_method()
    row = st.columns(3)
    kind = persistent(row[0].radio, "Grouping", "search_grouping", "5x1",
                      options=["5x1", "5xG", "per-layer", "curve"], horizontal=True,
                      help="5x1: one ratio per type group for all layers; 5xG: per block of layers; per-layer: per "
                           "matrix type and layer; curve: per-layer ranks searched through K knots per type over "
                           "depth (a smooth curve keeps a per-layer search low-dimensional).")
    blocks = persistent(row[1].number_input, "G (layer blocks, for 5xG) or K (knots, for curve)", "search_blocks",
                        min(2, shapes.num_layers), min_value=1, max_value=shapes.num_layers, step=1,
                        disabled=kind not in ("5xG", "curve"))
    search_v = persistent(row[2].checkbox, "Search v too", "search_v", DEFAULTS.search_v,
                          help="By default v stays dense (docs/search.md).")
    mlp = persistent(st.radio, "MLPs", "search_mlp", DEFAULTS.mlp, options=list(MLP_FORMS), horizontal=True,
                     format_func={"low-rank": "low rank (gate, up, down groups)",
                                  "prune": "pruned channels (one mlp-prune group per block; LoRAP baseline)"}.get,
                     help="prune: each layer block's share of MLP channels removed is searched next to the attention "
                          "ranks (LoRAP's l2 channel scores, 1% retained); LoRAP's allocation joins the baselines.")
    row = st.columns(3)
    budget = persistent(row[0].number_input, "Budget: share of decoder-linear parameters removed", "search_budget",
                        DEFAULTS.budget, min_value=0.01, max_value=0.95, step=0.05, format="%.2f")
    beta = persistent(row[1].number_input, "β (objective = log PPL + β·KL)", "search_beta", DEFAULTS.beta,
                      min_value=0.0, step=0.5, format="%.2f")
    kl = persistent(row[2].radio, "KL in the objective", "search_kl", DEFAULTS.kl, options=list(OBJECTIVE_KL),
                    format_func=lambda k: METRIC_LABELS[f"kl_{k}"], horizontal=True)
    row = st.columns(3)
    n_trials = persistent(row[0].number_input, "Trials", "search_trials", DEFAULTS.n_trials, min_value=1,
                          max_value=2000, step=1, help="Optimiser trials, the warm start included; baselines are extra.")
    n_initial = persistent(row[1].number_input, "Initial random points", "search_initial_points",
                           DEFAULTS.n_initial_points, min_value=1, max_value=2000, step=1,
                           help="Random plans before the Gaussian process takes over.")
    seed = persistent(row[2].number_input, "Seed", "search_seed", DEFAULTS.seed, min_value=0, step=1)
    row = st.columns(4)
    subset = persistent(row[0].selectbox, "Validation windows", "search_subset", DEFAULTS.subset, options=list(SUBSETS),
                        help="sensitive: the windows whose perplexity varies most across random plans; random: a "
                             "random sample; all: every candidate. Candidates follow the evaluation windows, which "
                             "the search never sees.")
    candidates = persistent(row[1].number_input, "Candidate windows", "search_subset_candidates",
                            DEFAULTS.subset_candidates, min_value=1, max_value=512, step=1)
    subset_size = persistent(row[2].number_input, "Subset size", "search_subset_size", DEFAULTS.subset_size,
                             min_value=1, max_value=512, step=1)
    probes = persistent(row[3].number_input, "Probe plans", "search_probe_plans", DEFAULTS.subset_probe_plans,
                        min_value=1, max_value=100, step=1, disabled=subset != "sensitive")
    strategy = persistent(st.radio, "Strategy", "search_strategy", DEFAULTS.strategy, options=list(STRATEGIES),
                          horizontal=True, format_func={"trust": "trust (priors told, then local and global EI)",
                                                        "bo": "plain Bayesian optimisation"}.get,
                          help="trust: LoRD, greedy, the global allocation and the warm start are told to the "
                               "Gaussian process first; after the random points, expected improvement looks around "
                               "the best plan two trials in three and anywhere every third (docs/search.md). bo: "
                               "scikit-optimize's ask/tell loop, told only the warm start.")
    select_top = persistent(st.number_input, "Final selection: best plans re-measured on every candidate window",
                            "search_select_top", DEFAULTS.select_top, min_value=1, max_value=100, step=1,
                            help="After the search, this many of the best plans by validation objective are measured "
                                 "on every candidate window, and the best there is the study's choice (a few subset "
                                 "windows overrate their own winner). 1: the best by the validation objective.")
    grouping_label = {"5xG": f"5x{int(blocks)}", "curve": f"curve{int(blocks)}"}.get(kind, kind)
    try:
        grouping = Grouping.parse(grouping_label, search_v)
        grouping.groups(shapes, method)  # a curve needs as many layers as knots
    except RankScopeError as exc:
        st.error(f"{exc}")
        st.stop()

    warm_kind = persistent(st.radio, "Warm start from", "search_warm_kind", "none", options=list(WARM_STARTS),
                           format_func=WARM_STARTS.get, horizontal=True,
                           help="The warm-start plan is the first trial, told to the optimiser.")
    warm_plan: RankPlan | None = None
    warm_study: str | None = None
    if warm_kind == "saved":
        usable = plans_for_model(shapes)
        if usable:
            warm_plan = usable[st.selectbox("Saved plan", list(usable), key="search_warm_saved")]
        else:
            st.caption("No saved plans for this model yet: save one on the Allocate page.")
    elif warm_kind == "upload":
        upload = st.file_uploader("Plan JSON (rankscope.plan/v1)", type=["json"], key="search_warm_upload")
        warm_plan = None if upload is None else read_uploaded_plan(upload, shapes)
    elif warm_kind == "study":
        with_trials = [r.study_id for r in studies if best_trial(storage, r.study_id) is not None]
        if with_trials:
            warm_study = st.selectbox("Study", with_trials, key="search_warm_study")
        else:
            st.caption("No study of this model has a finished trial yet.")
    name = st.text_input("Study name (optional; also its id)", key="search_name").strip()

    if st.button("Start study", type="primary", key="start_study"):
        try:
            warm = None
            if warm_plan is not None:
                warm = warm_start_from_plan(warm_plan, shapes, method, grouping, mlp)
            elif warm_study is not None:
                source = best_trial(storage, warm_study)
                warm = trial_values(shapes, method, grouping, source.ranks, source.channels, mlp)
            settings = StudySettings(
                model=workspace.model_reference, method=method, grouping=grouping_label, search_v=search_v,
                budget=float(budget), beta=float(beta), kl=kl, n_trials=int(n_trials), n_initial_points=int(n_initial),
                seed=int(seed), subset=subset, subset_size=int(subset_size), subset_candidates=int(candidates),
                subset_probe_plans=int(probes), select_top=int(select_top), warm_start=warm, texts=workspace.text_settings(), mlp=mlp,
                strategy=strategy)
            if name and storage.get_study(name) is not None:
                raise RankScopeError(f"A study named '{name}' already exists; choose another name or leave it empty.")
        except RankScopeError as exc:
            st.error(f"Cannot start this study: {exc}")
        else:
            study_id = new_study_id(settings, name or None)
            start_study(loaded, settings, study_id, create=True)
            set_persistent("search_study", study_id)
            st.rerun()

# -- the stored studies ---------------------------------------------------------------------------------------------
st.subheader("Studies")
study_prefix = f"{model_scope(loaded)}study/"
study_jobs = {job.job_id.removeprefix(study_prefix): job for job in board.with_prefix(study_prefix)}
running_ids = {sid for sid, job in study_jobs.items() if job.running}
stored_ids = [r.study_id for r in studies]
unstored = [sid for sid in study_jobs if sid not in stored_ids]  # preparing, or ended before it was registered
if not stored_ids and not unstored:
    st.info("No studies for this model yet: set one up under New study and start it.")
    st.stop()
if stored_ids:
    table = pd.DataFrame(study_rows([study_summary(storage, sid) for sid in stored_ids], running_ids))
    st.dataframe(table.rename(columns={"best_objective": "best objective", "best_perplexity": "best perplexity"}),
                 hide_index=True, width="stretch", key="studies_table",
                 column_config={"budget": st.column_config.NumberColumn(format="percent"),
                                "best objective": st.column_config.NumberColumn(format="%.4f"),
                                "best perplexity": st.column_config.NumberColumn(format="%.3f")})
    st.caption("Every study of this model in the cache database (best perplexity: on the full evaluation text, once a "
               "study has finished). Interrupted: stored as running, but the app was restarted; resume it.")
others = len(records) - len(studies)
if others:
    st.caption(f"{others} more stud{'y' if others == 1 else 'ies'} of other models: choose that model in the sidebar.")

options = unstored[::-1] + stored_ids[::-1]
study_id = persistent(st.selectbox, "Study", "search_study", options[0], options=options)
record = storage.get_study(study_id)
job = watch_job(study_job_id(loaded, study_id), stoppable=True,
                what_to_do="Change the settings under New study and start again." if record is None else
                "Every finished trial is stored: fix the cause and Resume.")
running = job is not None and job.running
if record is None:  # started in this app, not registered yet: preparing, or it ended first (its message is above)
    if running:
        st.info("Preparing the study: calibration, factorisation and the original model's distribution, once per "
                "model, method and texts. Trials appear below as they finish.")

        @st.fragment(run_every=1.0)
        def wait_for_registration() -> None:
            if storage.get_study(study_id) is not None:
                st.rerun(scope="app")  # registered: draw the study, and poll its trials

        wait_for_registration()
    st.stop()
settings = StudySettings.from_dict(record.settings)
state = study_state(record, running)
st.markdown(f"**{study_id}** · {state} · {settings.method}, grouping {settings.grouping}"
            f"{' (v searched)' if settings.search_v else ''}{', MLPs pruned' if settings.prunes else ''}, budget {settings.budget:.0%} of decoder linears, "
            f"objective log PPL + {settings.beta:g}·{METRIC_LABELS['kl_' + settings.kl]}, {settings.n_trials} trials "
            f"({settings.n_initial_points} random first), {settings.strategy} strategy, seed {settings.seed}"
            f"{', warm-started' if settings.warm_start else ''}.")
if state in (StudyState.STOPPED.value, StudyState.FAILED.value, INTERRUPTED):
    if state == StudyState.FAILED.value and job is None:
        st.warning(f"This study failed: {record.message}. Its finished trials are stored; Resume retries from them.")
    if st.button("Resume", type="primary", key="resume_study",
                 help="Continue from the stored trials: the search goes on exactly as if it had not stopped."):
        start_study(loaded, settings, study_id, create=False)
        st.rerun()


def draw_study() -> None:
    """The study's trials from the store (redrawn every two seconds while it runs)."""
    trials = storage.trials(study_id)
    summary = study_summary(storage, study_id)
    if not trials:
        st.info("No trials yet: the study is choosing its validation windows; trials appear here as they finish.")
        return
    best, full = summary["best"], summary["full_text"]
    top = st.columns(4)
    top[0].metric("Trials", f"{summary['trials_done']}/{summary['trials_planned']}",
                  help="Optimiser trials (warm start included); baselines are extra.")
    top[1].metric("Chosen plan's objective", "–" if best is None else f"{best['objective']:.4f}",
                  help="The validation objective of the study's choice: the lowest one until the study finishes, then "
                       "the finalist that scores best on every candidate window (the final selection below).")
    top[2].metric("Best perplexity (validation)", "–" if best is None else f"{best['perplexity']:.3f}")
    top[3].metric("Best perplexity (full text)", f"{full['best']['perplexity']:.3f}" if "best" in full else "–",
                  help="The best plan re-measured on the evaluation windows, which the search never saw "
                       "(when the study finishes).")
    if summary["validation"]:
        v = summary["validation"]
        st.caption(f"Scored on {len(v['windows'])} {v['kind']} validation windows ({v['reason']}).")

    group_names = study_groups(settings, shapes, settings.method)
    rows = pd.DataFrame(trial_rows(trials, achieved_ratios(trials, shapes, settings.method, settings.parsed_grouping(),
                                                              settings.mlp)))
    marks = baseline_marks(trials)
    left, right = st.columns(2)
    with left:
        curve = pd.DataFrame(best_so_far_rows(trials))
        figure = go.Figure()
        if not curve.empty:
            figure.add_scatter(x=curve["trial"], y=curve["objective"], mode="markers", name="trial",
                               marker=dict(color=KIND_COLOURS["search"]), text=curve["label"])
            figure.add_scatter(x=curve["trial"], y=curve["best_so_far"], mode="lines", name="best so far",
                               line=dict(shape="hv", color="#54a24b"))
        for position, mark in zip(["top left", "bottom right", "top right", "bottom left"] * 2, marks):
            figure.add_hline(y=mark["objective"], line_dash="dot", line_color=KIND_COLOURS["baseline"],
                             annotation_text=mark["label"], annotation_position=position)
        figure.update_layout(height=380, margin=dict(t=10, b=10), xaxis_title="trial (in the order run)",
                             yaxis_title="objective (lower is better)",
                             legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
        st.plotly_chart(figure, width="stretch", key="best_so_far")
        st.caption("Each trial's objective and the best so far; dotted lines are the baselines on the same windows. "
                   "A curve that drops below the baselines and flattens means the search has found a better "
                   "allocation than the heuristics and is converging.")
    with right:
        scatter = px.scatter(rows, x="decoder_params", y="perplexity", color="kind", symbol="kind",
                             color_discrete_map=KIND_COLOURS, hover_data=["label", "objective"],
                             labels={"decoder_params": "decoder-linear parameters", "perplexity": "perplexity (validation)"})
        for mark in marks:
            scatter.add_annotation(x=mark["decoder_params"], y=mark["perplexity"], text=mark["label"], showarrow=False,
                                   yshift=12, font=dict(color=KIND_COLOURS["baseline"]))
        scatter.update_layout(height=380, margin=dict(t=10, b=10), legend_title_text="",
                              legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
        st.plotly_chart(scatter, width="stretch", key="perplexity_vs_parameters")
        st.caption("Validation perplexity against decoder-linear parameters. Every plan is projected onto the budget, "
                   "so the points share (within one rank step) the same size: lower is simply better at that size.")

    dimensions = [dict(label=group, values=rows[group], range=[0, 1]) for group in group_names]
    kinds = list(KIND_COLOURS)
    dimensions += [dict(label="kind", values=rows["kind"].map(kinds.index), tickvals=list(range(len(kinds))),
                        ticktext=kinds, range=[0, len(kinds) - 1]),
                   dict(label="objective", values=rows["objective"])]
    parallel = go.Figure(go.Parcoords(dimensions=dimensions, line=dict(color=rows["objective"], colorscale="Viridis_r",
                                                                       showscale=True, colorbar=dict(title="objective"))))
    parallel.update_layout(height=380, margin=dict(t=40, b=20, l=40, r=40))
    st.plotly_chart(parallel, width="stretch", key="group_values")
    st.caption("One line per trial through each group's achieved share of parameters removed (baselines on the same "
               "groups), coloured by objective (yellow is better). Groups where the good lines bunch low are the "
               "sensitive ones; drag along an axis to pick out trials.")

    table = rows.drop(columns=["total_params"]).rename(columns=METRIC_LABELS | {"best_so_far": "best so far"})
    st.dataframe(table, hide_index=True, width="stretch", key="trials_table",
                 column_config={name: st.column_config.NumberColumn(format="%.3f") for name in group_names} |
                 {"objective": st.column_config.NumberColumn(format="%.4f"),
                  "best so far": st.column_config.NumberColumn(format="%.4f"),
                  "Perplexity": st.column_config.NumberColumn(format="%.3f"),
                  "seconds": st.column_config.NumberColumn(format="%.1f")})
    st.caption("Every stored trial, baselines included (group columns: achieved share removed). A trial is written "
               "once, when it finishes, and never changed.")

    if full:
        st.markdown("**On the full evaluation text** (never seen by the search)")
        remeasured = pd.DataFrame(full_text_rows(full, trials)).rename(columns=METRIC_LABELS)
        st.dataframe(remeasured, hide_index=True, width="stretch", key="full_text_table",
                     column_config={"Perplexity": st.column_config.NumberColumn(format="%.3f"),
                                    METRIC_LABELS["kl_forward"]: st.column_config.NumberColumn(format="%.4f"),
                                    METRIC_LABELS["kl_reverse"]: st.column_config.NumberColumn(format="%.4f"),
                                    "perplexity_vs_best": st.column_config.NumberColumn("vs best", format="percent")})
        st.caption(f"The best plan and the baselines on {settings.texts.describe_evaluation()}: the honest comparison, "
                   "since validation scores favour what the search optimised.")
    if summary["selection"]:
        st.markdown("**Final selection** (the study's choice is the first row)")
        st.dataframe(pd.DataFrame(selection_rows(summary["selection"])).rename(columns=METRIC_LABELS), hide_index=True,
                     width="stretch", key="selection_table")
        st.caption("The best plans by validation objective, each measured on every candidate validation window (still "
                   "none of the evaluation windows); the best there is the plan re-measured above and exported.")


st.subheader("Trials")
st.fragment(run_every=2.0 if running else None)(draw_study)()

st.subheader("Best plan")
best_now = best_trial(storage, study_id)
has_trials = best_now is not None
if st.button("Use best plan", key="use_best_plan", disabled=not has_trials,
             help="Make the best trial a rank plan (with its full-text metrics), add it to the Allocate page's saved "
                  "plans, and offer it as JSON."):
    start_study_plan(loaded, study_id)
    st.rerun()
plan_job = watch_job(study_plan_job_id(loaded, study_id), what_to_do="Resume the study, then try again.")
if plan_job is not None and isinstance(plan_job.result, RankPlan) and best_now is not None \
        and plan_job.result.ranks != {**plan_job.result.ranks, **best_now.ranks}:
    st.caption("The best trial has changed since that plan was made: press Use best plan again.")
elif plan_job is not None and isinstance(plan_job.result, RankPlan):
    plan_name = f"{study_id}-best"
    save_plan(plan_name, plan_job.result)
    metrics = plan_job.result.metrics
    st.success(f"'{plan_name}' is in the saved plans (Allocate and Export pages): perplexity {metrics['perplexity']:.3f} "
               f"on the evaluation text, {plan_job.result.parameters['decoder_linear']['reduction']:.2%} of decoder "
               "linears removed.")
    st.download_button("Download the best plan (JSON)", data=plan_job.result.to_json(), mime="application/json",
                       file_name=f"{plan_name}.json", key="download_best_plan")
elif not has_trials:
    st.caption("Available once the study has a finished trial.")
