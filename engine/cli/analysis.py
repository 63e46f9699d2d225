"""Analysis commands: prepare a model, list models, calibrate, and inspect spectra."""

from __future__ import annotations

from typing import List, Optional

import typer

from engine.cli import ModelOption, app, echo_json, fail
from engine.cli.options import (
    CalibrationTextOption, CalibrationWindowsOption, EvaluationTextOption, EvaluationWindowsOption, GroupsOption,
    JsonOption, WindowLenOption, placement_options,
)
from engine.errors import RankScopeError
from engine.models.device import Placement


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
@placement_options
def models(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Describe only this model (any reference)."),
    evaluate: bool = typer.Option(False, "--eval", help="Also compute (or recall) perplexity of the original model."),
    text: str = EvaluationTextOption,
    windows: int = EvaluationWindowsOption,
    window_len: int = WindowLenOption,
    placement: Placement = Placement(),
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
            loaded = load_model(reference, store, TerminalProgress(), placement)
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
@placement_options
def calibrate(
    model: str = ModelOption,
    text: str = CalibrationTextOption,
    windows: int = CalibrationWindowsOption,
    window_len: int = WindowLenOption,
    groups: int = GroupsOption,
    by_layer: Optional[bool] = typer.Option(
        None, "--by-layer/--whole-model",
        help="Calibrate one decoder layer at a time (memory bounded by one layer), or every layer at once; the "
             "statistics are identical. Default: by layer when every layer's sums at once would take over 4 GiB."),
    placement: Placement = Placement(),
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
        loaded = load_model(model, store, TerminalProgress(), placement)
        calibration = ensure_calibration(store, loaded, text, Windowing(window_len, windows), groups, TerminalProgress(),
                                         by_layer=by_layer)
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
@placement_options
def spectra(
    model: str = ModelOption,
    text: str = CalibrationTextOption,
    windows: int = CalibrationWindowsOption,
    window_len: int = WindowLenOption,
    groups: int = GroupsOption,
    covariance: str = typer.Option("pooled", help="Input covariance for feature spectra: pooled or sample."),
    energy: List[float] = typer.Option([0.8, 0.9, 0.95, 0.99], help="Energy levels (repeat the option)."),
    placement: Placement = Placement(),
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
        record = find_calibration(store, location.fingerprint, text, windowing, groups, placement.dtype)
        result = stored_spectra(store, location.fingerprint, record.calibration_id, covariance) if record else None
        weighted = store.get_feature_spectra(record.calibration_id, ACTIVATION_WEIGHTED) if record else []
        from_cache = result is not None and bool(weighted)
        if not from_cache:  # compute what is missing (imports torch only now)
            from engine.cache.spectra import ensure_all_spectra

            loaded = load_model(model, store, TerminalProgress(), placement)
            # text output: the weight spectra at once, then each calibration snapshot's spectra ("refining: n/N")
            preview = None if as_json else _PreviewPrinter(model, energy)
            computed = ensure_all_spectra(store, loaded, text, windowing, groups, covariance, TerminalProgress(),
                                          preview)
            result, weighted = computed.spectra, computed.weighted
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
    _echo_rank_shares(table, energy)
    typer.echo(f"LoRAP Table 1, share of singular values for {LORAP_LEVEL:.0%} energy (weights | activation-weighted "
               "W·diag(‖X‖₂)): " + ", ".join(f"{row['type']} {row['weight_share']:.1%} | {row['weighted_share']:.1%}"
                                             for row in lorap))


def _echo_rank_shares(table: list[dict], energy: List[float]) -> None:
    """The mean rank share per type for each energy level, weights | features, one line per type."""
    from engine.energy import summarise_by_type

    typer.echo("Mean rank share over layers needed for each energy level (weights | features):")
    typer.echo(f"{'type':>6} {'full':>6}  " + "  ".join(f"{lv:>13g}" for lv in energy))
    summaries = {lv: {row["type"]: row for row in summarise_by_type(table, lv)} for lv in energy}
    for linear_type in summaries[energy[0]]:
        cells = [
            f"{summaries[lv][linear_type]['weight_rank_share']:5.1%} | {summaries[lv][linear_type]['feature_rank_share']:5.1%}"
            for lv in energy
        ]
        typer.echo(f"{linear_type:>6} {summaries[energy[0]][linear_type]['full_rank']:>6}  " + "  ".join(cells))


class _PreviewPrinter:
    """Prints spectra while the calibration refines: the weights' rank shares at once, the first snapshot's full
    summary, then one line per later snapshot (the final summary follows when the calibration is stored)."""

    def __init__(self, model: str, energy: List[float]):
        self.model, self.energy, self.printed_snapshot = model, energy, False
        self.level = 0.9 if 0.9 in energy else energy[0]  # the one level of the compact lines

    def __call__(self, preview) -> None:
        from engine.analysis.spectra_summary import weight_summary_by_type
        from engine.energy import rank_table, summarise_by_type

        spectra = preview.spectra
        if not preview.has_features:
            typer.echo(f"Weights of {self.model} (no calibration needed), mean rank share for {self.level:.0%} energy: "
                       + ", ".join(f"{row['type']} {row['weight_rank_share']:.1%}"
                                   for row in weight_summary_by_type(spectra.weight, self.level))
                       + f"; {preview.describe()}.")
            return
        table = rank_table(spectra.weight, spectra.feature, self.energy)
        if not self.printed_snapshot:
            self.printed_snapshot = True
            typer.echo(f"Spectra of {self.model} ({preview.describe()}; features use the {spectra.covariance} "
                       "covariance of the windows so far, and change a little as windows arrive).")
            _echo_rank_shares(table, self.energy)
            return
        typer.echo(f"{preview.describe()}: feature rank share for {self.level:.0%} energy: " + ", ".join(
            f"{row['type']} {row['feature_rank_share']:.1%}" for row in summarise_by_type(table, self.level)))
