"""Baseline allocations evaluated inside every study, so charts compare like with like.

- uniform: every decoder linear (v included) at the budget's ratio;
- lord: the LoRD heuristic, v dense and q/k at 1.5x the others' ratio;
- greedy: from per-type sensitivity curves, repeatedly raise the ratio of the type whose next
  step costs the least log-perplexity per parameter saved, until the budget is met.
Each returns group ratios for the study's grouping (before projection onto the budget).

A study that prunes MLPs (`mlp="prune"`) compares with uniform on its own groups and with LoRAP's allocation
at its budget (`engine.compression.lorap.lorap_allocation`, q+k:v+o = 1:3, MLPs pruned); LoRD and greedy
allocate ranks of gate, up and down, which such a study does not have, so they are skipped there.
"""

from __future__ import annotations

import math
from typing import Optional

from engine.compression.grouping import Grouping, pruning_groups
from engine.compression.units import ModelShapes
from engine.records import SensitivityPoint


def _base(group: str) -> str:
    return group.split("@")[0]


SKIPPED_WHEN_PRUNING = {
    "lord": "LoRD allocates ranks to gate, up and down, which a study that prunes MLPs does not factorise",
    "greedy": "greedy follows per-type low-rank sensitivity curves of gate, up and down, which a study that prunes "
              "MLPs does not factorise",
}


def skipped_baselines(settings: dict) -> dict[str, str]:
    """Baselines a study does not evaluate, and why (a study's settings dict)."""
    return dict(SKIPPED_WHEN_PRUNING) if settings.get("mlp") == "prune" else {}


def achieved_values(shapes: ModelShapes, method: str, grouping: Grouping, ranks: dict, channels: dict) -> dict[str, float]:
    """Each group's value under an allocation that prunes MLPs: attention groups' achieved parameter reduction,
    `mlp-prune` groups' share of channels removed."""
    rank_groups, prune_groups = pruning_groups(shapes, method, grouping)
    values = {}
    for name, units in rank_groups.items():
        dense = sum(u.dense_params for u in units)
        values[name] = max(0.0, 1.0 - sum(u.params(ranks.get(u.paths[0])) for u in units) / dense)
    for name, mlps in prune_groups.items():
        total = sum(m.d_ff for m in mlps)
        kept = sum(m.d_ff if channels.get(m.path) is None else channels[m.path] for m in mlps)
        values[name] = 1.0 - kept / total
    return values


def uniform_ratios(groups: list[str], budget: float) -> dict[str, float]:
    return {g: budget for g in groups}


def lord_ratios(groups: list[str], budget: float) -> dict[str, float]:
    return {g: 0.0 if _base(g) == "v" else (1.5 * budget if _base(g) in ("qk", "q+k", "q", "k") else budget)
            for g in groups}


def greedy_ratios(
    shapes: ModelShapes, method: str, grouping: Grouping, budget: float, points: list[SensitivityPoint],
    original_perplexity: float,
) -> Optional[dict[str, float]]:
    """Ratios from per-type sensitivity points (layer -1), or None when there are too few points."""
    curves: dict[str, dict[float, float]] = {}
    for p in points:
        if p.layer == -1:
            curves.setdefault(p.linear_type, {})[round(p.ratio, 6)] = math.log(p.perplexity) - math.log(original_perplexity)
    groups = grouping.groups(shapes, method)
    # sensitivity types are unit labels (q, k, ...; q+k for joint); a group "qk" covers q and k
    members = {g: {"+".join(u.types) for u in units} for g, units in groups.items()}
    if not curves or any(not (types & set(curves)) for types in members.values()):
        return None
    grid = sorted({r for c in curves.values() for r in c})
    params = {g: sum(u.dense_params for u in units) for g, units in groups.items()}
    total = sum(u.dense_params for u in shapes.units(method))
    ratios = {g: 0.0 for g in groups}

    def cost(group: str, ratio: float) -> float:
        if ratio == 0.0:
            return 0.0
        values = [curves[t][ratio] for t in members[group] if t in curves and ratio in curves[t]]
        return sum(values) / len(values) if values else math.inf

    while sum(params[g] * ratios[g] for g in groups) < budget * total:
        best, best_rate = None, math.inf
        for g in groups:
            higher = [r for r in grid if r > ratios[g]]
            if not higher:
                continue
            step = higher[0]
            rate = (cost(g, step) - cost(g, ratios[g])) / (params[g] * (step - ratios[g]))
            if rate < best_rate:
                best, best_rate = (g, step), rate
        if best is None:
            break
        ratios[best[0]] = best[1]
    return ratios
