"""`rankscope search ...`: start, resume and read Bayesian-optimisation studies of rank allocations."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.analysis.search_summary import selection_rows
from engine.cli import app, echo_json, fail
from engine.cli.compression import DEFAULT_MODEL, PlanMethodOption, PlanModelOption, open_session, read_plan
from engine.cli.options import (
    DeviceOption, JsonOption, RayAddressOption, TextOptions, WorkersOption, placement_options, text_options,
)
from engine.errors import RankScopeError
from engine.models.device import Placement

search_app = typer.Typer(no_args_is_help=True, help="Rank-allocation search studies (scikit-optimize GP + EI), persisted and resumable.")
app.add_typer(search_app, name="search")

StudyOption = typer.Option(..., "--study", help="Study id (see `rankscope search status`).")


def _storage():
    from engine.search.duckdb_storage import DuckDBStudyStorage
    from engine.store import open_store

    return DuckDBStudyStorage(open_store())


def _readable_storage():
    """The store's studies, or, while another process holds the database (a study running from another
    terminal, or the app), the studies' JSON files next to it, which that process keeps up to date."""
    from engine.errors import StoreError
    from engine.paths import cache_root
    from engine.search.mirror import StudyMirror, mirror_folder

    try:
        return _storage()
    except StoreError as exc:
        if "in use by another" not in str(exc):
            raise
        folder = mirror_folder(cache_root())
        typer.echo(f"(The database is in use by another process: reading the study files in {folder}.)", err=True)
        return StudyMirror(folder)


def _session_for(settings, device: str = "auto"):
    """The compression session a study's settings describe (its texts and forward dtype were stored with it), with
    the model on `device`."""
    from engine.models.device import resolve_placement

    return open_session(settings.model, settings.method, settings.texts,
                        placement=resolve_placement(device, settings.dtype))


def _run(storage, session, study_id: str, workers: int = 1, ray_address: Optional[str] = None) -> None:
    from engine.progress import TerminalProgress
    from engine.search.runner import StudyRunner
    from engine.search.settings import StudySettings
    from engine.workers import open_evaluator

    settings = StudySettings.from_dict(storage.get_study(study_id).settings)
    if settings.prunes and (workers > 1 or ray_address):  # workers adopt the channel order; computed once, here
        session.channel_order(settings.pruning["aggregation"])
    evaluator = open_evaluator(session, workers, ray_address)
    try:
        StudyRunner(storage, session, study_id, progress=TerminalProgress(), evaluator=evaluator).run()
    except KeyboardInterrupt:
        typer.echo(f"\nStopped. Resume with: rankscope search resume --study {study_id}", err=True)
        raise typer.Exit(code=130)
    finally:
        evaluator.close()


_RESUMABLE = ("interrupted", "stopped", "failed")


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        echo_json(summary)
        return
    s = summary["settings"]
    typer.echo(f"Study {summary['study_id']} [{summary['state']}]: {s['method']}, grouping {s['grouping']}"
               f"{', MLPs pruned' if s.get('mlp') == 'prune' else ''}, "
               f"budget {s['budget']:.0%} of decoder linears, objective log PPL + {s['beta']} x KL ({s['kl']}); "
               f"{summary['trials_done']}/{summary['trials_planned']} trials")
    if summary["validation"]:
        v = summary["validation"]
        typer.echo(f"  validation windows ({v['kind']}): {v['windows']} - {v['reason']}")
    if summary["best"]:
        b = summary["best"]
        typer.echo(f"  best: {b['label']} (#{b['number']}) objective {b['objective']:.4f} (validation perplexity "
                   f"{b['perplexity']:.3f})")
    if summary.get("selection"):
        chosen = summary["selection"]
        typer.echo(f"  final selection on {chosen['windows']} candidate windows (#stored number: objective there, "
                   "validation objective):")
        there = f"objective ({chosen['windows']} windows)"
        for row in selection_rows(chosen):  # the study's choice first
            typer.echo(f"    #{row['trial']:>4}: {row[there]:.4f}  ({row['validation objective']:.4f})")
    full = summary["full_text"]
    if full:
        typer.echo("  on the full evaluation text (never seen by the search):")
        for label in ["best"] + [b["label"] for b in summary["baselines"]]:
            if label in full:
                r = full[label]
                typer.echo(f"    {label:>8}: perplexity {r['perplexity']:8.3f}  KL(P_orig||P_comp) {r['kl_forward']:.4f}  "
                           f"KL(P_comp||P_orig) {r['kl_reverse']:.4f}")
    for label, why in summary.get("skipped_baselines", {}).items():
        typer.echo(f"  baseline {label} skipped: {why}")
    if summary["state"] in _RESUMABLE and summary["resume"]:
        typer.echo(f"  {summary['state']}: resume with: {summary['resume']}")
    if summary["mean_trial_seconds"]:
        typer.echo(f"  mean trial time {summary['mean_trial_seconds']:.1f} s")


@search_app.command("start")
@text_options
@placement_options
def start(
    model: Optional[str] = PlanModelOption,
    method: Optional[str] = PlanMethodOption,
    grouping: str = typer.Option("5x1", "--grouping", help="5x1, 5xG (e.g. 5x4), per-layer, or curveK (e.g. curve3: "
                                 "per-layer ranks searched through K knots per type over depth)."),
    strategy: str = typer.Option("trust", "--strategy", help="trust: LoRD, greedy, the global allocation and the "
                                 "warm start told to the GP first, a random phase, then expected improvement local "
                                 "around the incumbent and global in turn; bo: the plain scikit-optimize loop."),
    search_v: bool = typer.Option(False, "--search-v", help="Search v too (default: keep v dense)."),
    mlp: str = typer.Option("low-rank", "--mlp", help="MLPs: low-rank (groups gate, up, down) or prune (one mlp-prune "
                            "group per layer block: the share of channels removed, LoRAP's l2 scores, 1% retained; "
                            "LoRAP's allocation joins the baselines)."),
    budget: float = typer.Option(0.2, "--budget", help="Decoder-linear parameter reduction to meet (0.2 = 20%)."),
    beta: float = typer.Option(1.0, "--beta", help="Objective: log PPL + beta x KL."),
    kl: str = typer.Option("reverse", "--kl", help="KL in the objective: reverse = KL(P_comp||P_orig), forward = KL(P_orig||P_comp)."),
    trials: int = typer.Option(50, "--trials", help="Optimiser trials (warm start included; baselines extra)."),
    initial_points: int = typer.Option(10, "--initial-points", help="Random points before the GP takes over "
                                       "(with --strategy trust, after the priors)."),
    seed: int = typer.Option(0, "--seed"),
    subset: str = typer.Option("sensitive", "--subset", help="Validation windows: sensitive, random or all."),
    subset_size: int = typer.Option(8, "--subset-size"),
    subset_candidates: int = typer.Option(24, "--subset-candidates", help="Candidate windows, after the evaluation windows."),
    probe_plans: int = typer.Option(6, "--probe-plans", help="Random plans used to find sensitive windows."),
    select_top: int = typer.Option(4, "--select-top", help="Final selection: the best K plans by validation "
                                   "objective are measured on every candidate window and the best there is the "
                                   "study's choice (1: the best by the validation objective)."),
    warm_start: Optional[Path] = typer.Option(None, "--warm-start", help="Seed with a rank plan JSON; the study then "
                                              "uses the plan's model, method and texts unless options say otherwise."),
    warm_start_study: Optional[str] = typer.Option(None, "--warm-start-study", help="Seed with another study's best plan."),
    name: Optional[str] = typer.Option(None, "--name", help="Study id (default: generated)."),
    workers: int = WorkersOption,
    ray_address: Optional[str] = RayAddressOption,
    batch: Optional[int] = typer.Option(None, "--batch", help="Points proposed at once (trust strategy; default: "
                                        "--workers). Part of the study: the same batch gives the same trials on any "
                                        "number of workers."),
    texts: TextOptions = TextOptions(),
    placement: Placement = Placement(),
    as_json: bool = JsonOption,
):
    """Start a study; prints the best plan re-measured on the full evaluation text, next to the baselines."""
    from engine.search.runner import create_study
    from engine.search.settings import StudySettings
    from engine.search.summary import best_trial, study_summary, trial_values, warm_start_from_plan

    try:
        if workers < 1:
            raise RankScopeError(f"--workers must be at least 1 (1 evaluates in this process), got {workers}.")
        if warm_start is not None and warm_start_study is not None:
            raise RankScopeError("Give at most one of --warm-start and --warm-start-study.")
        plan = None
        if warm_start is not None:  # the plan's own model, method and texts unless options say otherwise
            plan, plan_run, model = read_plan(warm_start, model, method, texts, transfer=True)
            method, study_texts = plan_run.method, plan_run.texts
        else:
            model, method, study_texts = model or DEFAULT_MODEL, method or "feature-pca", texts.settings()
        settings = StudySettings(model=model, method=method, grouping=grouping, search_v=search_v, budget=budget,
                                 beta=beta, kl=kl, n_trials=trials, n_initial_points=initial_points, seed=seed,
                                 subset=subset, subset_size=subset_size, subset_candidates=subset_candidates,
                                 subset_probe_plans=probe_plans, select_top=select_top, texts=study_texts, mlp=mlp,
                                 strategy=strategy,
                                 batch=batch if batch is not None else (workers if strategy == "trust" else 1),
                                 dtype=placement.dtype)
        storage = _storage()
        session = open_session(settings.model, settings.method, settings.texts, plan, placement)
        if plan is not None:
            ratios = warm_start_from_plan(plan, session.shapes, method, settings.parsed_grouping(), settings.mlp)
            settings = StudySettings.from_dict({**settings.to_dict(), "warm_start": ratios})
        elif warm_start_study is not None:
            best = best_trial(storage, warm_start_study)
            source = storage.get_study(warm_start_study)
            if best is None or source is None:
                raise RankScopeError(f"Study '{warm_start_study}' has no finished trials to start from.")
            if source.model_fingerprint != session.loaded.fingerprint:
                raise RankScopeError(f"Study '{warm_start_study}' was made for another model.")
            ratios = trial_values(session.shapes, method, settings.parsed_grouping(), best.ranks, best.channels,
                                  settings.mlp)
            settings = StudySettings.from_dict({**settings.to_dict(), "warm_start": ratios})
        record = create_study(storage, session, settings, name)
        typer.echo(f"Study {record.study_id} created.", err=True)
        _run(storage, session, record.study_id, workers, ray_address)
        summary = study_summary(storage, record.study_id)
    except RankScopeError as exc:
        fail(exc)
    _print_summary(summary, as_json)


@search_app.command("resume")
def resume(study: str = StudyOption, workers: int = WorkersOption, ray_address: Optional[str] = RayAddressOption,
           device: str = DeviceOption, as_json: bool = JsonOption):
    """Resume a stopped, failed or interrupted study from its stored trials (a finished one returns at once)."""
    from engine.search.records import StudyState, is_interrupted
    from engine.search.settings import StudySettings
    from engine.search.summary import is_complete, study_summary

    try:
        storage = _storage()
        record = storage.get_study(study)
        if record is None:
            raise RankScopeError(f"No study with id '{study}'. `rankscope search status` lists the studies.")
        if is_complete(storage, record):
            typer.echo(f"Study {study} has finished all its trials; nothing to resume.", err=True)
        elif record.state == StudyState.RUNNING and not is_interrupted(record):
            owner = record.owner or {}
            raise RankScopeError(f"Study {study} is running in process {owner.get('pid')} on {owner.get('host')}; "
                                 "stop that process first, or wait for it.")
        else:
            if workers < 1:
                raise RankScopeError(f"--workers must be at least 1 (1 evaluates in this process), got {workers}.")
            _run(storage, _session_for(StudySettings.from_dict(record.settings), device), study, workers, ray_address)
        summary = study_summary(storage, study)
    except RankScopeError as exc:
        fail(exc)
    _print_summary(summary, as_json)


@search_app.command("status")
def status(study: Optional[str] = typer.Option(None, "--study", help="One study (default: list all)."),
           as_json: bool = JsonOption):
    """List studies, or show one study's state and best trial so far."""
    from engine.search.summary import study_summary

    try:
        storage = _readable_storage()
        if study is not None:
            _print_summary(study_summary(storage, study), as_json)
            return
        rows = [study_summary(storage, r.study_id) for r in storage.list_studies()]
    except RankScopeError as exc:
        fail(exc)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        typer.echo("No studies yet: rankscope search start --help")
    for r in rows:
        best = f"best objective {r['best']['objective']:.4f}" if r["best"] else "no trials yet"
        hint = f" - resume with: {r['resume']}" if r["state"] in _RESUMABLE and r["resume"] else ""
        typer.echo(f"{r['study_id']}: {r['state']}, {r['trials_done']}/{r['trials_planned']} trials, {best}{hint}")


@search_app.command("best")
def best(study: str = StudyOption, as_json: bool = JsonOption):
    """The best trial of a study and the full-text measurements."""
    from engine.search.summary import study_summary

    try:
        summary = study_summary(_readable_storage(), study)
    except RankScopeError as exc:
        fail(exc)
    if as_json:
        echo_json({"study_id": study, "best": summary["best"], "full_text": summary["full_text"].get("best")})
    else:
        _print_summary(summary, False)


@search_app.command("export-plan")
def export_plan(study: str = StudyOption, out: Path = typer.Option(..., "--out", help="Where to write the plan JSON."),
                trial: Optional[int] = typer.Option(None, "--trial", help="A trial number (default: the best)."),
                device: str = DeviceOption, as_json: bool = JsonOption):
    """Write a study's best (or chosen) trial as a rank plan (rankscope.plan/v1; v2 when it prunes MLPs)."""
    from engine.search.summary import trial_plan

    try:
        chosen, plan = trial_plan(_storage(), study, lambda settings: _session_for(settings, device), trial)
        plan.save(out)
    except RankScopeError as exc:
        fail(exc)
    if as_json:
        echo_json({"study_id": study, "trial": chosen.number, "plan": str(out), "parameters": plan.parameters,
                   "metrics": plan.metrics})
    else:
        typer.echo(f"Trial {chosen.number} of {study} written to {out} "
                   f"({plan.parameters['decoder_linear']['reduction']:.2%} of decoder linears removed, "
                   f"perplexity {plan.metrics['perplexity']:.3f}).")


@search_app.command("restore")
def restore(as_json: bool = JsonOption):
    """Copy studies from their JSON files next to the database back into it (after the database was lost)."""
    from engine.search.mirror import restore_studies

    try:
        storage = _storage()
        restored = restore_studies(storage, storage.mirror)
    except RankScopeError as exc:
        fail(exc)
    if as_json:
        echo_json({"restored": restored})
    else:
        typer.echo(f"Restored {len(restored)} stud{'y' if len(restored) == 1 else 'ies'} from {storage.mirror}"
                   + (f": {', '.join(restored)}" if restored else " (the database already has every study there)."))
