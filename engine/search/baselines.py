"""Baseline allocations evaluated inside every study, so charts compare like with like.

- uniform: every decoder linear (v included) at the budget's ratio;
- lord: the LoRD heuristic, v dense and q/k at 1.5x the others' ratio;
- greedy: from per-type sensitivity curves, repeatedly raise the ratio of the type whose next
  step costs the least log-perplexity per parameter saved, until the budget is met;
- global: the budget spent matrix by matrix (the idea behind allocators such as LEMS and ZS-SVD): each
  matrix's loss at a ratio is its type's measured sensitivity at that ratio, shared among the type's
  layers in proportion to each layer's own measured sensitivity where a per-layer sweep covers every layer
  of the type (as the Allocate page's estimate shares it), else to the energy each layer's discarded
  components carry; repeatedly compress further the matrix whose next step costs the least loss per
  parameter saved.
uniform, lord and greedy return group ratios for the study's grouping (before projection onto the
budget); global returns ranks per matrix (it is finer than any grouping).

A study that prunes MLPs (`mlp="prune"`) compares with uniform on its own groups and with LoRAP's allocation
at its budget (`engine.compression.lorap.lorap_allocation`, q+k:v+o = 1:3, MLPs pruned); LoRD and greedy
allocate ranks of gate, up and down, which such a study does not have, so they are skipped there.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from engine.compression.grouping import Grouping, budget_target, pruning_groups, top_up_to_target
from engine.compression.units import ModelShapes
from engine.records import SensitivityPoint


def _base(group: str) -> str:
    """The type group of a group (`qk@0-7`) or of a curve's knot (`qk~1`)."""
    return group.split("@")[0].split("~")[0]


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


GLOBAL_STEP = 0.05  # ratio grid of the global allocation, up to the largest swept ratio


def type_curves(points: list[SensitivityPoint], original_perplexity: float) -> dict[str, dict[float, float]]:
    """Per-type sensitivity curves: type label -> {ratio: log PPL - log PPL of the original} (layer -1 points)."""
    curves: dict[str, dict[float, float]] = {}
    for p in points:
        if p.layer == -1:
            curves.setdefault(p.linear_type, {})[round(p.ratio, 6)] = math.log(p.perplexity) - math.log(original_perplexity)
    return curves


def layer_shares(points: list[SensitivityPoint], original_perplexity: float,
                 layers: dict[str, set[int]]) -> dict[str, dict[int, float]]:
    """Each type's per-layer shares of its loss, from per-layer points (layer >= 0): at each ratio measured at
    every layer of the type (`layers`: type label -> its layers), layer ℓ's share is max(Δ_ℓ, 0) / Σ max(Δ, 0)
    (Δ = log PPL − log PPL of the original); shares are averaged over such ratios. Types with no such ratio, or
    whose every layer's Δ is at most 0, are left out."""
    measured: dict[str, dict[float, dict[int, float]]] = {}
    for p in points:
        if p.layer >= 0 and p.linear_type in layers and p.perplexity > 0 and math.isfinite(p.perplexity):
            loss = math.log(p.perplexity) - math.log(original_perplexity)
            measured.setdefault(p.linear_type, {}).setdefault(round(p.ratio, 6), {})[p.layer] = loss
    shares: dict[str, dict[int, float]] = {}
    for label, by_ratio in measured.items():
        wanted, per_ratio = layers[label], []
        for losses in by_ratio.values():
            if wanted <= set(losses):
                sensitivity = {layer: max(losses[layer], 0.0) for layer in wanted}
                total = sum(sensitivity.values())
                if total > 0:
                    per_ratio.append({layer: s / total for layer, s in sensitivity.items()})
        if per_ratio:
            shares[label] = {layer: sum(s[layer] for s in per_ratio) / len(per_ratio) for layer in wanted}
    return shares


def global_allocation(shapes: ModelShapes, method: str, budget: float, points: list[SensitivityPoint],
                      original_perplexity: float, energies: dict[str, np.ndarray]) -> Optional[dict]:
    """Ranks per matrix spending the budget on the measured marginal loss (module docstring), or None when a type
    has no sensitivity curve or a unit has no energies (joint units, whose layers share one basis, included).

    `energies`: module path -> per-component energies of its factors (any order of magnitude; only shares count).
    A matrix's cost at ratio ρ is Δ_t(ρ) · w_ℓ: Δ_t the type's measured loss (linear between swept ratios, 0 at
    0), w_ℓ its layer's measured share of it (`layer_shares`) where a per-layer sweep covers the type, else
    f_m(ρ) / (n_t · f̄_t(ρ)): n_t the type's number of layers, f_m the share of the matrix's energy its discarded
    components carry at that ratio's rank, f̄_t the mean of that share over the type's layers. Ratios stop at the
    largest swept one, since nothing beyond it was measured."""
    curves = type_curves(points, original_perplexity)
    units = shapes.units(method)
    labels = {u.paths: "+".join(u.types) for u in units}
    if not curves or any(len(u.paths) != 1 or u.paths[0] not in energies for u in units if labels[u.paths] in curves):
        return None
    chosen = [u for u in units if labels[u.paths] in curves]
    if not chosen:
        return None
    top = max(r for c in curves.values() for r in c)
    grid = [0.0] + [r for r in np.arange(GLOBAL_STEP, top + 1e-9, GLOBAL_STEP).round(6).tolist()]

    def discarded(unit, ratio: float) -> float:
        rank = unit.rank_for_ratio(ratio) if ratio > 0 else None
        e = energies[unit.paths[0]]
        return 0.0 if rank is None else float(e[rank:].sum() / max(e.sum(), 1e-30))

    shares = {u.paths: [discarded(u, r) for r in grid] for u in chosen}
    measured = layer_shares(points, original_perplexity,
                            {label: {u.layer for u in chosen if labels[u.paths] == label} for label in curves})
    cost, params = {}, {}
    for label in {labels[u.paths] for u in chosen}:
        members = [u for u in chosen if labels[u.paths] == label]
        ratios = sorted(curves[label])
        loss = np.interp(grid, [0.0, *ratios], [0.0, *(max(0.0, curves[label][r]) for r in ratios)])
        for i, _ in enumerate(grid):
            mean = sum(shares[u.paths][i] for u in members) / len(members)
            for u in members:
                if label in measured:
                    weight = measured[label][u.layer]
                else:
                    weight = (shares[u.paths][i] / mean if mean > 0 else 1.0) / len(members)
                cost.setdefault(u.paths, []).append(float(loss[i]) * weight)
    for u in chosen:
        params[u.paths] = [u.params(u.rank_for_ratio(r) if r > 0 else None) for r in grid]
    target = budget_target(shapes, budget)
    step = {u.paths: 0 for u in chosen}
    total = shapes.decoder_linear_params
    while total > target:
        best, best_rate = None, math.inf
        for u in chosen:
            i = step[u.paths]
            # the next grid ratio that saves parameters (small ratios of a small matrix keep it dense)
            j = next((j for j in range(i + 1, len(grid)) if params[u.paths][j] < params[u.paths][i]), None)
            if j is None:
                continue
            rate = (cost[u.paths][j] - cost[u.paths][i]) / (params[u.paths][i] - params[u.paths][j])
            if rate < best_rate:
                best, best_rate = (u, j), rate
        if best is None:
            return None  # the swept ratios cannot reach the budget
        unit, j = best
        total -= params[unit.paths][step[unit.paths]] - params[unit.paths][j]
        step[unit.paths] = j
    ranks = {p: None for u in units for p in u.paths}
    for u in chosen:
        ratio = grid[step[u.paths]]
        ranks[u.paths[0]] = u.rank_for_ratio(ratio) if ratio > 0 else None
    return top_up_to_target(shapes, method, ranks, target)
