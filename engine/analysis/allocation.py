"""Hand allocation: the per-unit rank table a user edits, and one comparison row per plan.

A *unit* is what gets one rank (a linear, or a joint pair for joint-svd; see
`engine.compression.units`). The table lists units in the model's order, so an edited table maps
back to ranks by position: `ranks_from_unit_ranks(shapes, method, edited_ranks)`.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from engine.compression.plan import PlanError, RankPlan
from engine.compression.units import ModelShapes, ParameterCounts


def unit_rank_rows(shapes: ModelShapes, method: str, ranks: Mapping[str, Optional[int]]) -> list[dict]:
    """One row per rank unit: module path(s), layer, type, shape, largest rank, rank (None = dense), parameters."""
    rows = []
    for unit in shapes.units(method):
        rank = ranks.get(unit.paths[0])
        rows.append({
            "module": " + ".join(unit.paths),
            "layer": unit.layer,
            "type": "+".join(unit.types),
            "shape": f"{unit.d_out}×{unit.d_in}",
            "max_rank": unit.max_rank,
            "rank": rank,
            "parameters": unit.params(rank),
            "dense_parameters": unit.dense_params,
        })
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
    """
    if shapes is not None:
        plan = plan.for_model(shapes)
    decoder, total = plan.parameters["decoder_linear"], plan.parameters["total"]
    metrics = plan.metrics or {}
    grouping = plan.grouping or {}
    kind = grouping.get("kind", "by hand")
    label = f"5x{grouping.get('layer_blocks')}" if kind == "5xG" else kind
    return {
        "plan": name,
        "method": plan.method,
        "grouping": label + (" (edited)" if grouping.get("edited_units") else ""),
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
