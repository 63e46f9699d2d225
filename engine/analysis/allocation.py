"""Hand allocation: the per-unit rank table a user edits, and one comparison row per plan.

A *unit* is what gets one rank (a linear, or a joint pair for joint-svd; see
`engine.compression.units`). The table lists units in the model's order, so an edited table maps
back to ranks by position: `ranks_from_unit_ranks(shapes, method, edited_ranks)`.

With MLPs pruned by channels (LoRAP; a `rankscope.plan/v2` plan) a second table lists one row per
gated MLP with its kept channels (`kept_channel_rows`, read back by `channels_from_kept`), and the
rank table shows the gate, up and down of a pruned MLP without a rank (they stay dense, sliced to the
kept channels) and with the parameters of their slices.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from engine.compression.lorap import lorap_allocation, parse_split
from engine.compression.plan import PlanError, RankPlan
from engine.compression.pruning import MAX_RETENTION, PruningError, PruningSettings
from engine.compression.units import MlpShape, ModelShapes, ParameterCounts


def unit_rank_rows(shapes: ModelShapes, method: str, ranks: Mapping[str, Optional[int]],
                   channels: Optional[Mapping[str, Optional[float]]] = None) -> list[dict]:
    """One row per rank unit: module path(s), layer, type, shape, largest rank, rank (None = dense), parameters.

    With `channels` (MLP path -> kept channels, None = not pruned; as typed, so possibly not allowed) every row
    also has a "pruned" column, and the units of a pruned MLP have no rank (whatever `ranks` says) and the
    parameters of their kept slices (None while the kept count is not allowed)."""
    pruned = _pruned_linears(shapes, channels or {})
    rows = []
    for unit in shapes.units(method):
        mlp_kept = next((pruned[p] for p in unit.paths if p in pruned), None)
        rank = None if mlp_kept is not None else ranks.get(unit.paths[0])
        row = {
            "module": " + ".join(unit.paths),
            "layer": unit.layer,
            "type": "+".join(unit.types),
            "shape": f"{unit.d_out}×{unit.d_in}",
            "max_rank": unit.break_even_rank,  # the largest rank a plan may use (above it, dense is cheaper)
            "rank": rank,
            "parameters": unit.params(rank),
            "dense_parameters": unit.dense_params,
        }
        if channels is not None:
            row["pruned"] = ""
            if mlp_kept is not None:
                mlp, kept = mlp_kept
                row["pruned"] = f"pruned: {_number(kept)} of {mlp.d_ff} channels"
                row["parameters"] = len(unit.paths) * mlp.d_model * int(kept) if _allowed_kept(mlp, kept) else None
        rows.append(row)
    return rows


def ranks_from_unit_ranks(shapes: ModelShapes, method: str,
                          unit_ranks: Sequence[Optional[float]]) -> dict[str, Optional[int]]:
    """Module path -> rank from one rank per unit (in `unit_rank_rows` order); None or NaN = dense.

    Raises `PlanError` when the count does not match or a rank is not a whole number.
    """
    units = shapes.units(method)
    if len(unit_ranks) != len(units):
        raise PlanError(f"Expected one rank for each of the {len(units)} units, got {len(unit_ranks)}.")
    ranks: dict[str, Optional[int]] = {}
    for unit, value in zip(units, unit_ranks):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            rank = None
        elif float(value).is_integer():
            rank = int(value)
        else:
            raise PlanError(f"Rank {value} for {' + '.join(unit.paths)} is not a whole number.")
        for path in unit.paths:
            ranks[path] = rank
    return ranks


def plan_summary(name: str, plan: RankPlan, shapes: Optional[ModelShapes] = None) -> dict:
    """A comparison row: parameters both ways, grouping, and metrics where the plan was evaluated.

    With `shapes`, the plan is checked against that model first (`RankPlan.for_model`: a `PlanError`
    when its recorded counts are not what its ranks give); without, it must be a checked plan already.
    The grouping label says when the plan was edited by hand and how many MLPs it prunes.
    """
    if shapes is not None:
        plan = plan.for_model(shapes)
    decoder, total = plan.parameters["decoder_linear"], plan.parameters["total"]
    metrics = plan.metrics or {}
    grouping = plan.grouping or {}
    kind = grouping.get("kind", "by hand")
    label = f"5x{grouping.get('layer_blocks')}" if kind == "5xG" else kind
    split = grouping.get("split")
    if kind == "lorap" and isinstance(split, list) and len(split) == 2:
        label = "LoRAP " + ":".join(_number(float(v)) for v in split)
    pruned = sum(1 for kept in (plan.channels or {}).values() if kept is not None)
    edited = grouping.get("edited_units") or grouping.get("edited_mlps")
    return {
        "plan": name,
        "method": plan.method,
        "grouping": label + (" (edited)" if edited else "") + (f", {pruned} MLPs pruned" if pruned else ""),
        "decoder_params": decoder["compressed"],
        "decoder_reduction": decoder["reduction"],
        "total_params": total["compressed"],
        "total_reduction": total["reduction"],
        "perplexity": metrics.get("perplexity"),
        "kl_forward": metrics.get("kl_forward"),
        "kl_reverse": metrics.get("kl_reverse"),
        "evaluation_text": (plan.evaluation or {}).get("text"),
    }


def budget_meter_rows(counts: ParameterCounts) -> list[dict]:
    """Kept and removed parameters over decoder linears and over the whole model, for a stacked bar."""
    return [
        {"scope": scope, "part": part, "parameters": value}
        for scope, dense, compressed in (("decoder linears", counts.decoder_dense, counts.decoder_compressed),
                                         ("whole model", counts.total_dense, counts.total_compressed))
        for part, value in (("kept", compressed), ("removed", dense - compressed))
    ]


# -- pruned MLPs (LoRAP) -------------------------------------------------------------------------------------


def channels_from_ratio(shapes: ModelShapes, ratio: float) -> dict[str, int]:
    """MLP path -> kept channels when a share `ratio` of every MLP's channels is removed: `round((1 − ratio)·d_ff)`,
    at least 1 (ratio 0 keeps every channel)."""
    if not 0.0 <= ratio < 1.0:
        raise PruningError(f"The share of MLP channels removed is from 0 to below 1, got {ratio}.")
    return {m.path: max(1, min(m.d_ff, int(round((1.0 - ratio) * m.d_ff)))) for m in shapes.mlps}


def kept_channel_rows(shapes: ModelShapes, channels: Mapping[str, Optional[int]]) -> list[dict]:
    """One row per gated MLP: its path, layer, width d_ff, kept channels (None = not pruned), and the parameters of
    its gate, up and down together (3·d_model·kept) and dense."""
    return [{"module": mlp.path, "layer": mlp.layer, "d_ff": mlp.d_ff, "kept": channels.get(mlp.path),
             "parameters": mlp.params(channels.get(mlp.path)), "dense_parameters": mlp.params(None)}
            for mlp in shapes.mlps]


def channels_from_kept(shapes: ModelShapes, kept: Sequence[Optional[float]]) -> dict[str, Optional[int]]:
    """MLP path -> kept channels from one value per MLP (in `kept_channel_rows` order); None or NaN = not pruned.

    Raises `PruningError` naming every value that is not a whole number from 1 to its MLP's d_ff."""
    mlps = shapes.mlps
    if len(kept) != len(mlps):
        raise PruningError(f"Expected one kept-channel count for each of the {len(mlps)} MLPs, got {len(kept)}.")
    channels: dict[str, Optional[int]] = {}
    bad = []
    for mlp, value in zip(mlps, kept):
        if _empty(value):
            channels[mlp.path] = None
        elif _allowed_kept(mlp, value):
            channels[mlp.path] = int(value)
        else:
            bad.append(f"{_number(value)} for {mlp.path}")
    if bad:
        widths = sorted({m.d_ff for m in mlps})
        width = f"its width d_ff = {widths[0]}" if len(widths) == 1 else "its width (the d_ff column)"
        raise PruningError(f"A pruned MLP keeps a whole number of channels from 1 to {width}, or its cell is empty "
                           f"when it is not pruned; got {', '.join(bad)}.")
    return channels


def pruned_linear_paths(shapes: ModelShapes, channels: Mapping[str, Optional[float]]) -> set[str]:
    """The gate, up and down paths of the MLPs that `channels` prunes (any kept count given, allowed or not)."""
    return set(_pruned_linears(shapes, channels))


def pruning_section(aggregation: str, retention_percent: Optional[float]) -> dict:
    """A plan's `pruning` section from the page's controls, the retention given in percent.

    Raises `PruningError` naming what is allowed: an aggregation among l2, l1, max; a retention from 0 to 50%."""
    if retention_percent is None or isinstance(retention_percent, bool) or math.isnan(float(retention_percent)) \
            or not 0.0 <= float(retention_percent) <= 100 * MAX_RETENTION:
        got = "nothing" if retention_percent is None else f"{_number(retention_percent)}%"
        raise PruningError(f"The retention (the share of a pruned MLP's least important channels kept among its "
                           f"kept ones) is from 0 to {MAX_RETENTION:.0%}; LoRAP keeps 1%. Got {got}.")
    return PruningSettings(aggregation, round(float(retention_percent) / 100.0, 10)).to_dict()


def retention_percent(pruning: Optional[Mapping]) -> float:
    """The retention of a plan's pruning section (LoRAP's 1% when it has none), in percent."""
    return round(100.0 * PruningSettings.from_dict(pruning).retention, 8)


def lorap_tables(shapes: ModelShapes, reduction: float, split: str
                 ) -> tuple[dict[str, Optional[int]], dict[str, Optional[int]], dict]:
    """(ranks, kept channels, grouping) of LoRAP's allocation (`lorap_allocation`, MLPs pruned) at decoder-linear
    `reduction` with the attention split 'q+k:v+o'. Raises `RankScopeError` for a split that is not two positive
    numbers, a reduction outside (0, 1), or a model without gated MLPs."""
    split_values = parse_split(split)
    ranks, channels = lorap_allocation(shapes, reduction, split_values)
    return ranks, channels, {"kind": "lorap", "budget": reduction, "split": list(split_values)}


def _pruned_linears(shapes: ModelShapes, channels: Mapping[str, Optional[float]]) -> dict[str, tuple[MlpShape, float]]:
    """Linear path -> (its MLP, the kept channels) for the gate, up and down of each pruned MLP."""
    return {path: (mlp, channels[mlp.path]) for mlp in shapes.mlps if not _empty(channels.get(mlp.path))
            for path in mlp.paths}


def _empty(value: Optional[float]) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _allowed_kept(mlp: MlpShape, kept: float) -> bool:
    return not isinstance(kept, bool) and float(kept).is_integer() and 1 <= kept <= mlp.d_ff


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
