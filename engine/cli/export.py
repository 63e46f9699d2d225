"""The `rankscope export` command: write a plan's compressed model as a reloadable Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.cli import app, echo_json, fail
from engine.cli.compression import _parameters_lines, _quality_line, open_session, read_plan
from engine.cli.options import JsonOption, TextOptions, placement_options, text_options
from engine.errors import RankScopeError
from engine.models.device import Placement
from engine.export.report import DEFAULT_CHECK_WINDOWS, DEFAULT_NEW_TOKENS, DEFAULT_PROMPT, DEFAULT_TIMING_RUNS


_HELP = "\n\n".join([
    "Export a plan's compressed model to a Hugging Face directory and prove it reloads.",
    "Writes config.json (with a rankscope_compression section), model.safetensors (low-rank factors plus the "
    "untouched dense weights), tokenizer files, rank_plan.json, modeling_rankscope.py and a README.md model card.",
    "Before reporting success it reloads the directory through RankScope's load_compressed and through "
    "transformers (trust_remote_code=True), compares logits with the in-memory compressed model on the first "
    "--check-windows evaluation window(s), compares every reloaded tensor bit for bit with the tensor written and "
    "counts parameters; any difference is an error and the target directory is left untouched. When the plan records "
    "its metrics for the same evaluation windows (as compress --save-plan writes it), the reload is thereby the model "
    "they were measured on, and they are reported without evaluating again; --evaluate-reload evaluates the reload "
    "on every evaluation window anyway and compares. Without such a record (or if a tensor differs) the in-memory "
    "model and the reload are each evaluated once.",
    "An earlier export at --out is replaced only with --overwrite, and never when it holds files that export did "
    "not write (listed in its rankscope_manifest.json); a directory that is not an export is never changed.",
    "The plan's own method, calibration and evaluation set are used; a calibration option that contradicts the "
    "plan is refused before any work, and another evaluation set is allowed and noted.",
])


@app.command(help=_HELP)
@text_options
@placement_options
def export(
    plan: Path = typer.Option(..., "--plan", help="The rank plan JSON (rankscope.plan/v1, or v2 with pruned MLPs) to apply, with its own settings."),
    out: Path = typer.Option(..., "--out", help="Directory to write: new, empty, or an earlier export with --overwrite."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier RankScope export at --out (once the new one passed its checks)."),
    dense: bool = typer.Option(False, "--dense", help="Write W_r = B_r A_r as plain Linear weights: loads without remote code, NOT smaller."),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="Prompt for the side-by-side generation and the tokens/s measurement."),
    new_tokens: int = typer.Option(DEFAULT_NEW_TOKENS, "--new-tokens", help="Tokens generated per run (batch 1, greedy)."),
    timing_runs: int = typer.Option(DEFAULT_TIMING_RUNS, "--timing-runs", help="Generations timed per model for "
                                    "tokens/s (1 / median seconds per decode step): the side-by-side one, and "
                                    "N - 1 more, the two models' runs interleaved."),
    check_windows: int = typer.Option(DEFAULT_CHECK_WINDOWS, "--check-windows", help="Evaluation windows whose logits are compared with "
                                      "the in-memory model after each reload (identical for the low-rank form)."),
    evaluate_reload: bool = typer.Option(False, "--evaluate-reload", help="Evaluate the reloaded model on every "
                                         "evaluation window and compare with the plan's record, even when its tensors "
                                         "are proven identical to those written (slower; the default reports the record)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model the plan was made for (default: the model the plan names)."),
    texts: TextOptions = TextOptions(),
    placement: Placement = Placement(),
    as_json: bool = JsonOption,
):
    from engine.export import check_export_storage, check_export_target, export_compressed
    from engine.progress import TerminalProgress

    try:
        check_export_target(out, overwrite)  # before any model loads
        given, settings, model = read_plan(plan, model, None, texts)
        check_export_storage(given, dense)  # a pruned plan cannot be written dense: refused before the model loads
        session = open_session(model, settings.method, settings.texts, given, placement)
        report = export_compressed(session, given, out, dense=dense, overwrite=overwrite, prompt=prompt,
                                   progress=TerminalProgress(), max_new_tokens=new_tokens, timing_runs=timing_runs,
                                   check_windows=check_windows, evaluate_reload=evaluate_reload)
    except RankScopeError as exc:
        fail(exc)
    if as_json:
        echo_json(report.to_dict())
        return
    _print_report(report)


def _print_report(report) -> None:
    label = "DENSE (not smaller)" if report.storage == "dense" else "low-rank"
    typer.echo(f"Exported {report.model_id} ({report.method}, {label}) to {report.out_dir}")
    for name, size in report.files.items():
        typer.echo(f"  {name:<24} {size:>14,} bytes")
    original = report.original_weights_bytes
    typer.echo(f"model.safetensors: {report.weights_bytes:,} bytes"
               + (f" vs the original's {original:,} ({report.weights_bytes / original:.1%})" if original else ""))
    for line in _parameters_lines(report.parameters):
        typer.echo("  " + line)
    p = report.parameters
    typer.echo(f"  reloaded:        {p['reloaded']:,} parameters (plan {p['expected_from_plan']:,} + {p['added_bias']:,} added bias)")
    typer.echo(_quality_line("original", report.quality["original"]))
    typer.echo(_quality_line("compressed", report.quality["compressed"])
               + ("   (the plan's record for these windows)" if report.compressed_quality_from == "plan" else "   (in memory)"))
    typer.echo(_quality_line("reloaded", report.quality["reloaded"])
               + ("" if report.reload_evaluated else "   (the plan's record: tensors identical to those written)"))
    s = report.speed
    typer.echo(f"generation (batch 1, greedy, {s['compressed'].new_tokens} tokens, {s['compressed'].runs} run(s), "
               f"1 / median decode step): original {s['original'].tokens_per_second:.1f} tokens/s, compressed "
               f"{s['compressed'].tokens_per_second:.1f} tokens/s")
    g = report.generation
    typer.echo(f"prompt:     {g.prompt!r}\noriginal:   {g.original!r}\ncompressed: {g.compressed!r}")
    typer.echo("reload check: " + ("passed" if report.passed else "FAILED"))
    for check in report.checks:
        typer.echo(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    t = report.timings
    if t:
        parts = ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                          for name, seconds in t.items() if name != "total_s")
        typer.echo(f"export took {t['total_s']:.1f} s ({parts})")
