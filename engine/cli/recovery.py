"""The `rankscope recover` command: train a recovery on a plan's compressed model and write the recovered plan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.cli import app, echo_json, fail
from engine.cli.compression import _parameters_lines, _quality_line, read_plan
from engine.cli.options import JsonOption, TextOptions, placement_options
from engine.errors import RankScopeError
from engine.models.device import Placement

_HELP = "\n\n".join([
    "Recover quality lost to compression: train a few vectors on the plan's compressed model, fold them into the "
    "factors and write the recovered plan.",
    "--kind subspace is Bolaco's post-training (two diagonal vectors on each linear's leading r' directions); "
    "--kind basis is Basis Selection (a relearned scale per direction; with --prune-to, the least important "
    "directions are pruned in rounds until that decoder-linear reduction, retraining between rounds).",
    "By default the run trains on the plan's calibration text after its calibration windows (disjoint from the "
    "windows the factors were fitted to and from the evaluation text); --train-text names another text, for a "
    "target application. It reports perplexity and both KLs on the plan's evaluation set before and after, and "
    "perplexity on held-out windows of the training text.",
    "A checkpoint is written every --checkpoint-every steps: a run that was killed resumes when the same command "
    "runs again. A finished run is stored in the cache and returned at once when asked for again. The plan given "
    "is never changed; the recovered plan (with a 'recovery' section) goes to --out and exports like any plan.",
])


@app.command(help=_HELP)
@placement_options
def recover(
    plan: Path = typer.Option(..., "--plan", help="The rank plan JSON to recover (run with its own method and texts)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the recovered plan (default: "
                                       "<plan>-<kind>.json beside the plan)."),
    kind: str = typer.Option("subspace", "--kind", help="subspace (Bolaco) or basis (Basis Selection)."),
    steps: int = typer.Option(100, "--steps", help="Training steps (the step budget)."),
    batch: int = typer.Option(4, "--batch", help="Windows per step."),
    learning_rate: Optional[float] = typer.Option(None, "--lr", help="AdamW learning rate (default 2e-3, Bolaco's)."),
    subset: int = typer.Option(64, "--subset", help="r': the leading directions of each linear that subspace trains."),
    train_text: Optional[str] = typer.Option(None, "--train-text", help="Training text: built-in name, file or "
                                             "hf:NAME[:CONFIG]:SPLIT (default: the plan's calibration text)."),
    window_len: Optional[int] = typer.Option(None, "--train-window-len", help="Tokens per training window "
                                             "(default: the plan's calibration window length)."),
    training_windows: int = typer.Option(256, "--training-windows", help="Training windows (cycled through)."),
    start_window: Optional[int] = typer.Option(None, "--start-window", help="First training window (default: after "
                                               "the plan's calibration and evaluation windows in that text)."),
    validation_windows: int = typer.Option(8, "--validation-windows", help="Held-out windows after the training ones."),
    eval_every: int = typer.Option(20, "--eval-every", help="Measure validation perplexity every N steps."),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", help="Write a resumable checkpoint every N steps."),
    prune_to: Optional[float] = typer.Option(None, "--prune-to", help="basis: prune directions until this share of "
                                             "decoder-linear parameters is removed (e.g. 0.25)."),
    prune_rounds: int = typer.Option(4, "--prune-rounds", help="basis: pruning rounds, spread over the steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the batch order."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model the plan was made for (default: the one it names)."),
    placement: Placement = Placement(),
    as_json: bool = JsonOption,
):
    from engine.models.loading import load_model
    from engine.progress import TerminalProgress
    from engine.recovery.settings import RecoverySettings
    from engine.recovery.training import RecoveryInterrupted, describe_settings
    from engine.recovery.training import recover as run_recovery
    from engine.store import open_store

    try:
        settings = RecoverySettings(kind, steps, batch, learning_rate, subset, train_text, window_len, training_windows,
                                    start_window, validation_windows, eval_every, checkpoint_every, prune_to,
                                    prune_rounds, seed)
        given, _, model = read_plan(plan, model, None, TextOptions())
        target = out or plan.with_name(f"{plan.stem}-{kind}.json")
        _check_target(target, plan)
        store = open_store()
        loaded = load_model(model, store, TerminalProgress(), placement)
        bar = TerminalProgress()
        resolved = settings.resolved(given.calibration, given.evaluation)
        if not as_json:
            typer.echo(f"Recovery {describe_settings(resolved)}", err=True)
        outcome = run_recovery(store, loaded, given, settings, progress=bar, on_step=_step_printer(bar))
    except RecoveryInterrupted as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.secho("Interrupted. The last checkpoint is kept: run the same command again to resume from it.",
                    err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(code=130)
    except RankScopeError as exc:
        fail(exc)
    outcome.plan.save(target)
    result = outcome.result
    if as_json:
        echo_json({"plan": str(target), "run_id": outcome.record.run_id, "from_cache": outcome.from_cache,
                   "resumed_from": outcome.resumed_from, "before": result["before"], "after": result["after"],
                   "validation": result["validation"], "parameters": result["parameters"]["after"],
                   "steps": outcome.record.steps, "tokens": outcome.record.tokens, "seconds": outcome.record.seconds,
                   "peak_rss_bytes": outcome.record.peak_rss_bytes})
        return
    if outcome.from_cache:
        typer.echo(f"This run (id {outcome.record.run_id[:12]}) finished before; its stored result:")
    elif outcome.resumed_from:
        typer.echo(f"Resumed from the checkpoint at step {outcome.resumed_from}.")
    for line in _parameters_lines(result["parameters"]["after"]):
        typer.echo("  " + line)
    typer.echo(_quality_line("before", result["before"]))
    typer.echo(_quality_line("after", result["after"]))
    v = result["validation"]
    typer.echo(f"held-out '{v['text']}' ({v['n_windows']} windows): perplexity {v['before']:.3f} -> {v['after']:.3f}")
    typer.echo(f"{outcome.record.steps} steps, {outcome.record.tokens:,} tokens, {outcome.record.seconds:.0f} s, "
               f"peak memory {outcome.record.peak_rss_bytes / 2**30:.2f} GiB")
    typer.echo(f"Recovered plan written to {target} (export it with rankscope export --plan {target} --out DIR)")


def _check_target(target: Path, plan: Path) -> None:
    """Never write over the plan the run starts from, nor over a file that is not an earlier recovered plan."""
    from engine.compression.plan import PlanError, RankPlan

    if target.resolve() == plan.resolve():
        raise RankScopeError(f"--out {target} is the plan this run starts from; a recovery never changes it. "
                             "Give another --out.")
    if target.exists():
        try:
            earlier = RankPlan.load(target)
        except PlanError:
            earlier = None
        if earlier is None or earlier.recovery is None:
            raise RankScopeError(f"--out {target} exists and is not a recovered plan; it is left as it is. "
                                 "Give another --out, or move that file.")
    if not target.parent.is_dir():
        raise RankScopeError(f"The folder of --out ({target.parent}) does not exist.")


def _step_printer(bar):
    def show(report) -> None:
        if report.validation_perplexity is not None:
            import sys

            from tqdm import tqdm

            kept = f", {report.ranks_total:,} directions kept" if report.ranks_total is not None else ""
            tqdm.write(f"step {report.step}/{report.steps}: loss {report.loss:.4f}, validation perplexity "
                       f"{report.validation_perplexity:.3f}{kept}", file=sys.stderr)
    return show
