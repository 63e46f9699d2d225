"""Compression commands: compress with a method and a plan, evaluate a plan, sweep sensitivities."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.cli import ModelOption, app, echo_json, fail
from engine.cli.options import (
    METHODS_HELP, JsonOption, MethodOption, RayAddressOption, TextOptions, WorkersOption, placement_options,
    text_options,
)
from engine.errors import RankScopeError
from engine.models.device import Placement
from engine.texts.settings import TextSettings



DEFAULT_MODEL = "smollm2-135m"
PlanModelOption = typer.Option(None, "--model", "-m", help="Registry name, model directory, .gguf file or hub id "
                               f"(default: the model a --plan names, else {DEFAULT_MODEL}).")
PlanMethodOption = typer.Option(None, "--method", help=f"{METHODS_HELP} (default: a --plan's own, awsvd for --lorap, "
                                "else feature-pca).")


def open_session(model: str, method: str, texts: TextSettings, plan=None, placement: Placement = Placement()):
    """Load the model on `placement` and open a compression session for these texts (shared by every command that
    evaluates).

    With `plan`, the model is checked against it before any calibration or factorisation starts.
    """
    from engine.compression.session import CompressionSession
    from engine.compression.units import ModelShapes
    from engine.models.loading import load_model
    from engine.progress import TerminalProgress
    from engine.store import open_store

    store = open_store()
    loaded = load_model(model, store, TerminalProgress(), placement)
    if plan is not None:
        plan.validate_for(ModelShapes.of(loaded))
    return CompressionSession.open(store, loaded, method, texts, TerminalProgress())


def read_plan(path: Path, model: Optional[str], method: Optional[str], texts: TextOptions, transfer: bool = False):
    """(plan, the settings it runs with, the model to load) for a command given `--plan`.

    The plan's own method, calibration and evaluation are used; options that contradict them are
    refused here, before any model is loaded (unless `transfer`: the plan only seeds a search); the
    departures that are allowed are printed as notes.
    """
    from engine.compression.plan import RankPlan

    plan = RankPlan.load(path)
    settings = texts.for_plan(plan, method, transfer)
    for note in settings.notes:
        typer.secho(f"Note: {note}", err=True, fg=typer.colors.YELLOW)
    return plan, settings, model or plan.model["id"]


def _quality_line(label: str, metrics: dict) -> str:
    return (f"{label:>10}: perplexity {metrics['perplexity']:9.3f}   KL(P_orig||P_comp) {metrics['kl_forward']:.4f}   "
            f"KL(P_comp||P_orig) {metrics['kl_reverse']:.4f}")


def _parameters_lines(parameters: dict) -> list[str]:
    dec, tot = parameters["decoder_linear"], parameters["total"]
    return [f"decoder linears: {dec['compressed']:,} of {dec['dense']:,} parameters ({dec['reduction']:.2%} removed)",
            f"whole model:     {tot['compressed']:,} of {tot['dense']:,} parameters ({tot['reduction']:.2%} removed)"]


@app.command()
@text_options
@placement_options
def compress(
    model: Optional[str] = PlanModelOption,
    method: Optional[str] = PlanMethodOption,
    uniform: Optional[float] = typer.Option(None, "--uniform", help="Remove this share of decoder-linear parameters, same ratio everywhere (e.g. 0.2)."),
    lorap: Optional[float] = typer.Option(None, "--lorap", help="LoRAP at this decoder-linear reduction (e.g. 0.2): "
                                          "every layer at that ratio, attention factorised with the --split, the MLP "
                                          "pruned by channels (default method: awsvd, LoRAP's)."),
    split: str = typer.Option("1:3", "--split", help="--lorap: the q+k : v+o parameter split of attention."),
    retention: float = typer.Option(0.01, "--retention", help="--lorap: the share of least important MLP channels "
                                    "kept (LoRAP: 0.01; 0 to 0.5)."),
    aggregation: str = typer.Option("l2", "--aggregation", help="--lorap: a channel row's score, l2 (LoRAP), l1 or max."),
    mlp: str = typer.Option("prune", "--mlp", help="--lorap: prune the MLP by channels, or low-rank (the same "
                            "parameters factorised, for comparison)."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A rank plan JSON (rankscope.plan/v1 or v2), run with its "
                                        "own method, calibration and evaluation unless options say otherwise."),
    save_plan: Optional[Path] = typer.Option(None, "--save-plan", help="Write the evaluated plan here."),
    texts: TextOptions = TextOptions(),
    placement: Placement = Placement(),
    as_json: bool = JsonOption,
):
    """Compress with a uniform ratio, LoRAP's allocation or a plan, and report parameters, perplexity and both KLs."""
    from engine.progress import TerminalProgress

    notes: tuple = ()
    try:
        if sum(x is not None for x in (uniform, lorap, plan)) != 1:
            raise RankScopeError("Give exactly one of --uniform RATIO, --lorap RATIO or --plan FILE.")
        if plan is not None:
            given, settings, model = read_plan(plan, model, method, texts)
            session = open_session(model, settings.method, settings.texts, given, placement)
            candidate, notes = given, settings.notes
        elif lorap is not None:
            from engine.compression.lorap import lorap_plan, parse_split
            from engine.compression.pruning import PruningSettings

            pruning, parsed_split = PruningSettings(aggregation, retention), parse_split(split)  # checked before loading
            model = model or DEFAULT_MODEL
            session = open_session(model, method or "awsvd", texts.settings(), placement=placement)
            candidate = lorap_plan(session, lorap, parsed_split, pruning, mlp, TerminalProgress())
        else:
            model = model or DEFAULT_MODEL
            session = open_session(model, method or "feature-pca", texts.settings(), placement=placement)
            candidate = session.uniform_plan(uniform)
        evaluated = session.evaluate(candidate, TerminalProgress())
        if save_plan is not None:
            evaluated.save(save_plan)
    except RankScopeError as exc:
        fail(exc)
    original = session.original_quality()
    metrics = {k: evaluated.metrics[k] for k in ("perplexity", "kl_forward", "kl_reverse", "tokens")}
    if as_json:
        echo_json({"model": model, "method": evaluated.method, "parameters": evaluated.parameters,
                   "original": original, "compressed": metrics, "plan_file": str(save_plan) if save_plan else None,
                   "texts": session.texts.to_dict(), "device": session.loaded.device, "dtype": session.loaded.dtype,
                   "notes": list(notes)})
        return
    typer.echo(f"{model} compressed with {evaluated.method}:")
    for line in _parameters_lines(evaluated.parameters):
        typer.echo("  " + line)
    typer.echo(_quality_line("original", original))
    typer.echo(_quality_line("compressed", metrics))
    if save_plan is not None:
        typer.echo(f"Plan written to {save_plan}")


@app.command()
@text_options
@placement_options
def evaluate(
    model: Optional[str] = PlanModelOption,
    plan: Optional[Path] = typer.Option(None, "--plan", help="Evaluate this plan (with its own method, calibration and "
                                        "evaluation unless options say otherwise); without it, the original model."),
    texts: TextOptions = TextOptions(),
    placement: Placement = Placement(),
    as_json: bool = JsonOption,
):
    """Perplexity and KL of the original model, or of a plan, on the evaluation text."""
    from engine.progress import TerminalProgress

    notes: tuple = ()
    try:
        if plan is not None:
            given, settings, model = read_plan(plan, model, None, texts)
            used, notes = settings.texts, settings.notes
            session = open_session(model, settings.method, used, given, placement)
            metrics = session.evaluate(given, TerminalProgress()).metrics
            device, dtype = session.loaded.device, session.loaded.dtype
        else:
            model, used = model or DEFAULT_MODEL, texts.settings()
            metrics, device, dtype = _original_metrics(model, used, placement)
    except RankScopeError as exc:
        fail(exc)
    result = {"model": model, "plan": str(plan) if plan else None, "evaluation_text": used.evaluation_text,
              "windows": used.evaluation_windowing.n_windows, "window_len": used.evaluation_windowing.window_len,
              **{k: metrics[k] for k in ("perplexity", "kl_forward", "kl_reverse", "tokens")}, "device": device,
              "dtype": dtype, "notes": list(notes)}
    if as_json:
        echo_json(result)
    else:
        typer.echo(_quality_line("plan" if plan else "original", metrics) + f"   ({metrics['tokens']:,} predicted tokens)")


def _original_metrics(model: str, texts: TextSettings, placement: Placement = Placement()) -> tuple[dict, str, str]:
    """Perplexity of the original model (KL against itself is 0), from the store when cached; with the device and
    dtype it was loaded on."""
    from engine.models.loading import load_model
    from engine.progress import TerminalProgress
    from engine.store import open_store
    from engine.cache.evaluation import ensure_baseline_evaluation

    store = open_store()
    loaded = load_model(model, store, TerminalProgress(), placement)
    record = ensure_baseline_evaluation(store, loaded, texts.evaluation_text, texts.evaluation_windowing,
                                        TerminalProgress())
    return ({"perplexity": record.perplexity, "kl_forward": 0.0, "kl_reverse": 0.0, "tokens": record.n_tokens},
            loaded.device, loaded.dtype)


@app.command()
@text_options
@placement_options
def sweep(
    model: str = ModelOption,
    method: str = MethodOption,
    by: str = typer.Option("type", "--by", help="type: each type in all layers; layer: one layer of one type at a time."),
    ratios: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "--ratios", help="Ratios for --by type, comma-separated."),
    types: Optional[str] = typer.Option(None, "--types", help="Types for --by type, comma-separated (default: all)."),
    linear_type: str = typer.Option("q", "--type", help="The type for --by layer."),
    ratio: float = typer.Option(0.5, "--ratio", help="The ratio for --by layer."),
    workers: int = WorkersOption,
    ray_address: Optional[str] = RayAddressOption,
    texts: TextOptions = TextOptions(),
    placement: Placement = Placement(),
    as_json: bool = JsonOption,
):
    """Sensitivity sweep; each point is stored as it finishes, and a rerun resumes (stored points are reused)."""
    from engine.compression.sweep import sweep_by_layer, sweep_by_type
    from engine.progress import TerminalProgress
    from engine.workers import open_evaluator

    try:
        if by not in ("type", "layer"):
            raise RankScopeError(f"--by must be 'type' or 'layer', got '{by}'.")
        try:
            grid = [float(r) for r in ratios.split(",") if r.strip()]
        except ValueError as exc:
            raise RankScopeError(f"--ratios must be comma-separated numbers, got '{ratios}'.") from exc
        if workers < 1:
            raise RankScopeError(f"--workers must be at least 1 (1 evaluates in this process), got {workers}.")
        session = open_session(model, method, texts.settings(), placement=placement)
        evaluator = open_evaluator(session, workers, ray_address)
        try:
            if by == "type":
                chosen = [t.strip() for t in types.split(",")] if types else None
                points = sweep_by_type(session, grid, chosen, TerminalProgress(), evaluator=evaluator)
            else:
                points = sweep_by_layer(session, linear_type, ratio, progress=TerminalProgress(), evaluator=evaluator)
        finally:
            evaluator.close()
    except RankScopeError as exc:
        fail(exc)
    original = session.original_quality()
    rows = [{"type": p.linear_type, "layer": None if p.layer < 0 else p.layer, "ratio": p.ratio,
             "decoder_params": p.decoder_params, "perplexity": p.perplexity, "kl_forward": p.kl_forward,
             "kl_reverse": p.kl_reverse} for p in points]
    if as_json:
        echo_json({"model": model, "method": method, "by": by, "original": original, "points": rows})
        return
    typer.echo(f"Sensitivity of {model} ({method}); original perplexity {original['perplexity']:.3f}")
    typer.echo(f"{'type':>8} {'layer':>5} {'ratio':>5} {'perplexity':>11} {'KL fwd':>8} {'KL rev':>8}")
    for r in rows:
        typer.echo(f"{r['type']:>8} {'all' if r['layer'] is None else r['layer']:>5} {r['ratio']:>5.2f} "
                   f"{r['perplexity']:>11.3f} {r['kl_forward']:>8.4f} {r['kl_reverse']:>8.4f}")
