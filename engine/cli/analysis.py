"""Analysis commands: prepare a model, list models, calibrate, and inspect spectra."""

from __future__ import annotations

from typing import List, Optional

import typer

from engine.cli import ModelOption, app, echo_json, fail
from engine.cli.options import (
    CalibrationTextOption, CalibrationWindowsOption, EvaluationTextOption, EvaluationWindowsOption, GroupsOption,
    JsonOption, WindowLenOption,
)
from engine.errors import RankScopeError


@app.command()
def prepare(model: str = ModelOption):
    """Convert a model once to a safetensors directory under the cache (no-op when already done)."""
    from engine.models.loading import locate_model
    from engine.progress import TerminalProgress
    from engine.store import open_store

    try:
        location = locate_model(model, open_store(), TerminalProgress())
    except RankScopeError as exc:
        fail(exc)
    typer.echo(f"{location.model_id}: ready at {location.path} (fingerprint {location.fingerprint[:12]})")


@app.command()
def models(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Describe only this model (any reference)."),
    evaluate: bool = typer.Option(False, "--eval", help="Also compute (or recall) perplexity of the original model."),
    text: str = EvaluationTextOption,
    windows: int = EvaluationWindowsOption,
    window_len: int = WindowLenOption,
    as_json: bool = JsonOption,
):
    """List the registry (or one model): architecture, parameters by type, embedding share."""
    from engine.models.loading import is_prepared, load_model
    from engine.models.registry import REGISTRY
    from engine.models.summary import parameter_summary
    from engine.progress import TerminalProgress
    from engine.store import open_store
    from engine.texts.windows import Windowing
    from engine.cache.evaluation import ensure_baseline_evaluation

    references = [model] if model else list(REGISTRY)
    results = []
    try:
        store = open_store()
        for reference in references:
            entry: dict = {"model": reference}
            if reference in REGISTRY:
                entry.update(title=REGISTRY[reference].title, package=REGISTRY[reference].package)
                if not model and not is_prepared(reference):
                    entry["status"] = f"not prepared: run `rankscope prepare --model {reference}`"
                    results.append(entry)
                    continue
            loaded = load_model(reference, store, TerminalProgress())
            summary = parameter_summary(loaded)
            entry.update(
                status="ready",
                fingerprint=loaded.fingerprint,
                architecture=summary.model_type,
                layers=summary.num_layers,
                hidden_size=summary.hidden_size,
                intermediate_size=summary.intermediate_size,
                heads=f"{summary.num_attention_heads} query / {summary.num_key_value_heads} key-value",
                vocab_size=summary.vocab_size,
                parameters=summary.total,
                decoder_linear_parameters=summary.decoder_linear,
                embedding_share=summary.embedding_share,
                parameters_by_group={row["group"]: row["parameters"] for row in summary.rows()},
            )
            if evaluate:
                record = ensure_baseline_evaluation(store, loaded, text, Windowing(window_len, windows), TerminalProgress())
                entry["evaluation"] = {
                    "text": text,
                    "windows": record.n_windows,
                    "window_len": record.window_len,
                    "predicted_tokens": record.n_tokens,
                    "perplexity": record.perplexity,
                }
            results.append(entry)
    except RankScopeError as exc:
        fail(exc)
    if as_json:
        echo_json(results)
        return
    for entry in results:
        typer.echo(f"{entry['model']}: {entry.get('title', '')} [{entry['status']}]")
        if entry["status"] != "ready":
            continue
        typer.echo(
            f"  {entry['architecture']}, {entry['layers']} layers, hidden {entry['hidden_size']}, "
            f"intermediate {entry['intermediate_size']}, heads {entry['heads']}, vocab {entry['vocab_size']:,}"
        )
        typer.echo(
            f"  {entry['parameters']:,} parameters; decoder linears {entry['decoder_linear_parameters']:,}; "
            f"embedding share {entry['embedding_share']:.1%}"
        )
        typer.echo("  by group: " + ", ".join(f"{k} {v:,}" for k, v in entry["parameters_by_group"].items()))
        if "evaluation" in entry:
            ev = entry["evaluation"]
            typer.echo(
                f"  perplexity {ev['perplexity']:.3f} on {ev['text']} "
                f"({ev['windows']} x {ev['window_len']} tokens, {ev['predicted_tokens']:,} predicted)"
            )


@app.command()
def calibrate(
    model: str = ModelOption,
    text: str = CalibrationTextOption,
    windows: int = CalibrationWindowsOption,
    window_len: int = WindowLenOption,
    groups: int = GroupsOption,
    as_json: bool = JsonOption,
):
    """Gather calibration statistics (mean, covariances, second moment, channel norms) and cache them."""
    from engine.models.loading import load_model
    from engine.progress import TerminalProgress
    from engine.store import open_store
    from engine.texts.windows import Windowing
    from engine.cache.calibration import ensure_calibration

    try:
        store = open_store()
        loaded = load_model(model, store, TerminalProgress())
        calibration = ensure_calibration(store, loaded, text, Windowing(window_len, windows), groups, TerminalProgress())
    except RankScopeError as exc:
        fail(exc)
    record = calibration.record
    summary = {
        "model": model,
        "text": text,
        "calibration_id": record.calibration_id,
        "windows": record.n_windows,
        "window_len": record.window_len,
        "groups": record.n_groups,
        "tokens": record.n_tokens,
        "bos": record.add_bos,
        "sites": len(calibration.statistics.sites),
        "from_cache": calibration.from_cache,
        "compute_seconds": round(record.seconds, 1),
    }
    if as_json:
        echo_json(summary)
    else:
        source = "from cache" if calibration.from_cache else f"computed in {record.seconds:.1f} s"
        typer.echo(
            f"Calibration {record.calibration_id[:12]}: {record.n_windows} x {record.window_len} tokens of {text}, "
            f"{record.n_groups} groups, {summary['sites']} sites ({source})."
        )


@app.command()
def spectra(
    model: str = ModelOption,
    text: str = CalibrationTextOption,
    windows: int = CalibrationWindowsOption,
    window_len: int = WindowLenOption,
    groups: int = GroupsOption,
    covariance: str = typer.Option("pooled", help="Input covariance for feature spectra: pooled or sample."),
    energy: List[float] = typer.Option([0.8, 0.9, 0.95, 0.99], help="Energy levels (repeat the option)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: ranks per layer and type."),
):
    """Singular-value energy of weights and features: the rank needed for each energy level.

    Also LoRAP's Table 1: the share of singular values holding 80% of the energy, of each weight and of the
    activation-weighted weight W·diag(‖X‖₂). Answers from the store when these spectra were computed before
    (no model load).
    """
    from engine.analysis.spectra_summary import LORAP_LEVEL, lorap_table, lorap_table_rows
    from engine.cache.lookups import find_calibration, stored_spectra
    from engine.energy import rank_table, summarise_by_type
    from engine.records import ACTIVATION_WEIGHTED
    from engine.models.loading import load_model, locate_model
    from engine.progress import TerminalProgress
    from engine.store import open_store
    from engine.texts.windows import Windowing

    covariances = ("pooled", "sample")

    try:
        if covariance not in covariances:
            raise RankScopeError(f"--covariance must be one of {', '.join(covariances)}, got '{covariance}'.")
        if any(not 0 < level <= 1 for level in energy):
            raise RankScopeError(f"--energy levels must be in (0, 1], got {energy}.")
        store = open_store()
        windowing = Windowing(window_len, windows)
        location = locate_model(model, store, TerminalProgress())
        record = find_calibration(store, location.fingerprint, text, windowing, groups)
        result = stored_spectra(store, location.fingerprint, record.calibration_id, covariance) if record else None
        weighted = store.get_feature_spectra(record.calibration_id, ACTIVATION_WEIGHTED) if record else []
        from_cache = result is not None and bool(weighted)
        if not from_cache:  # compute what is missing (imports torch only now)
            from engine.cache.calibration import ensure_calibration
            from engine.cache.spectra import ensure_activation_weighted_spectra, ensure_spectra

            loaded = load_model(model, store, TerminalProgress())
            calibration = ensure_calibration(store, loaded, text, windowing, groups, TerminalProgress())
            result = ensure_spectra(store, loaded, calibration, covariance, TerminalProgress())
            weighted = ensure_activation_weighted_spectra(store, loaded, calibration, TerminalProgress())
    except RankScopeError as exc:
        fail(exc)
    table = rank_table(result.weight, result.feature, energy)
    lorap = lorap_table(result.weight, weighted)
    if as_json:
        echo_json(
            {
                "model": model,
                "fingerprint": location.fingerprint,
                "calibration_id": result.calibration_id,
                "text": text,
                "windows": windows,
                "window_len": window_len,
                "covariance": covariance,
                "energy_levels": energy,
                "from_cache": from_cache,
                "summary_by_type": {f"{lv:g}": summarise_by_type(table, lv) for lv in energy},
                "matrices": table,
                "lorap_table": {"energy": LORAP_LEVEL, "by_type": lorap,
                                "matrices": lorap_table_rows(result.weight, weighted)},
            }
        )
        return
    typer.echo(
        f"Spectra of {model} ({'from the store' if from_cache else 'computed'}; features use the {covariance} "
        f"covariance of {windows} x {window_len} tokens of {text})."
    )
    typer.echo("Mean rank share over layers needed for each energy level (weights | features):")
    typer.echo(f"{'type':>6} {'full':>6}  " + "  ".join(f"{lv:>13g}" for lv in energy))
    summaries = {lv: {row["type"]: row for row in summarise_by_type(table, lv)} for lv in energy}
    for linear_type in summaries[energy[0]]:
        cells = [
            f"{summaries[lv][linear_type]['weight_rank_share']:5.1%} | {summaries[lv][linear_type]['feature_rank_share']:5.1%}"
            for lv in energy
        ]
        typer.echo(f"{linear_type:>6} {summaries[energy[0]][linear_type]['full_rank']:>6}  " + "  ".join(cells))
    typer.echo(f"LoRAP Table 1, share of singular values for {LORAP_LEVEL:.0%} energy (weights | activation-weighted "
               "W·diag(‖X‖₂)): " + ", ".join(f"{row['type']} {row['weight_share']:.1%} | {row['weighted_share']:.1%}"
                                             for row in lorap))
