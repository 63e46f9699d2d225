"""Groupings of rank units and exact projection of group ratios onto a parameter budget.

Groupings (DESIGN.md §7):
- `5x1`: groups `qk`, `o`, `gate`, `up`, `down` (plus `v` when searched), one ratio for all layers;
- `5xG`: the same per block of consecutive layers (`G` blocks), named like `qk@0-7`;
- `per-layer`: one ratio per type and layer, named like `q@3`;
- `curveK` (kind `curve`): the per-layer groups, but searched through K knots per type spread evenly over
  depth (`q~0` .. `q~K-1`), each layer's ratio linearly interpolated between its two nearest knots; a
  smooth curve over depth keeps a per-layer search low-dimensional (5 types x K instead of 5 x layers);
- `custom`: a map from group name to module paths.
`v` is kept dense unless `search_v` is set. A ratio of 0 keeps a group dense.

`project_to_budget` scales all group ratios by one factor (so dense groups stay dense and relative
ratios are kept) until the plan meets the target parameter count; if the groups with a positive
ratio cannot meet it on their own, it then raises every group together until it does. It finally
tops matrices up by one rank step at a time, so the result lies within one rank step of the target
and never above it. Any ratios can be projected onto any feasible target (a search may ask for a
point with a single compressed group); an infeasible target raises `BudgetError` saying what is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from engine.compression.units import RANK_STEP, ModelShapes, RankUnit, count_parameters
from engine.errors import RankScopeError

GROUPINGS = ("5x1", "5xG", "per-layer", "curve", "custom")
TYPE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qk", ("q", "k")), ("v", ("v",)), ("o", ("o",)), ("gate", ("gate",)), ("up", ("up",)), ("down", ("down",)),
)
MAX_RATIO = 0.99


class BudgetError(RankScopeError):
    """A budget that no plan of the requested form can meet."""


@dataclass(frozen=True)
class Grouping:
    kind: str = "5x1"
    layer_blocks: int = 1  # G, for 5xG; the number of knots K, for curve
    search_v: bool = False
    custom: Optional[Mapping[str, tuple[str, ...]]] = field(default=None, hash=False)

    def __post_init__(self):
        if self.kind not in GROUPINGS:
            raise RankScopeError(f"Unknown grouping '{self.kind}'. Groupings: {', '.join(GROUPINGS)} (5xG as e.g. 5x4).")
        if self.layer_blocks < 1:
            raise RankScopeError(f"A 5xG grouping needs G >= 1, got {self.layer_blocks}.")
        if self.kind == "curve" and self.layer_blocks < 2:
            raise RankScopeError(f"A curve grouping needs at least 2 knots (curve2 is a straight line), got {self.layer_blocks}.")
        if self.kind == "custom" and not self.custom:
            raise RankScopeError("A custom grouping needs a map from group name to module paths.")

    @classmethod
    def parse(cls, text: str, search_v: bool = False) -> "Grouping":
        """`5x1`, `5x4` (5xG with G=4), `5xG` (G=1), `per-layer`, or `curve3` (3 knots per type over depth)."""
        if text == "per-layer":
            return cls("per-layer", search_v=search_v)
        if text.startswith("curve") and text[5:].isdigit():
            return cls("curve", int(text[5:]), search_v)
        if text.startswith("5x"):
            tail = text[2:]
            if tail == "1":
                return cls("5x1", search_v=search_v)
            if tail.isdigit() and int(tail) >= 1:
                return cls("5xG", int(tail), search_v)
        raise RankScopeError(f"Unknown grouping '{text}'. Use 5x1, 5xG with a number for G (e.g. 5x4), per-layer, "
                             "or curveK with a number of knots K >= 2 (e.g. curve3).")

    @property
    def label(self) -> str:
        return {"5xG": f"5x{self.layer_blocks}", "curve": f"curve{self.layer_blocks}"}.get(self.kind, self.kind)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "layer_blocks": self.layer_blocks, "search_v": self.search_v}
        if self.custom:
            out["custom"] = {k: list(v) for k, v in self.custom.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "Grouping":
        custom = data.get("custom")
        return cls(data["kind"], int(data.get("layer_blocks", 1)), bool(data.get("search_v", False)),
                   {k: tuple(v) for k, v in custom.items()} if custom else None)

    def groups(self, shapes: ModelShapes, method: str) -> dict[str, list[RankUnit]]:
        """Group name -> rank units, in a stable order. Units in no group stay dense."""
        units = shapes.units(method)
        if self.kind == "custom":
            by_path = {p: u for u in units for p in u.paths}
            missing = [p for paths in self.custom.values() for p in paths if p not in by_path]
            if missing:
                raise RankScopeError(f"Custom grouping names modules the model does not have: {', '.join(missing[:5])}.")
            return {name: list(dict.fromkeys(by_path[p] for p in paths)) for name, paths in self.custom.items()}
        type_groups = [(n, ts) for n, ts in TYPE_GROUPS if n != "v" or self.search_v]
        groups: dict[str, list[RankUnit]] = {}
        if self.kind in ("per-layer", "curve"):
            if self.kind == "curve" and self.layer_blocks > shapes.num_layers:
                raise RankScopeError(f"curve{self.layer_blocks} needs at least {self.layer_blocks} layers; "
                                     f"the model has {shapes.num_layers}.")
            for unit in units:
                if unit.types[0] == "v" and not self.search_v:
                    continue
                groups.setdefault(f"{'+'.join(unit.types)}@{unit.layer}", []).append(unit)
            return groups
        blocks = _layer_blocks(shapes.num_layers, self.layer_blocks if self.kind == "5xG" else 1)
        for first, last in blocks:
            suffix = "" if self.kind == "5x1" else f"@{first}-{last}"
            for name, types in type_groups:
                members = [u for u in units if first <= u.layer <= last and u.types[0] in types]
                if members:
                    groups[f"{name}{suffix}"] = members
        return groups


    # -- the optimiser's coordinates: the groups themselves, or a curve's knots ------------------------------
    def search_dims(self, shapes: ModelShapes, method: str) -> list[str]:
        """The coordinates a search asks values for: the groups, or for a curve `type~k` for each knot k."""
        groups = self.groups(shapes, method)
        if self.kind != "curve":
            return list(groups)
        types = list(dict.fromkeys(name.split("@")[0] for name in groups))
        return [f"{t}~{k}" for t in types for k in range(self.layer_blocks)]

    def knot_weights(self, layer: int, num_layers: int) -> list[float]:
        """How much each knot counts in `layer`'s value: linear interpolation between the two nearest knots."""
        position = layer / max(1, num_layers - 1) * (self.layer_blocks - 1)
        left = min(int(position), self.layer_blocks - 2)
        weights = [0.0] * self.layer_blocks
        weights[left], weights[left + 1] = left + 1 - position, position - left
        return weights

    def expand(self, shapes: ModelShapes, method: str, values: Mapping[str, float]) -> dict[str, float]:
        """Group values for search coordinates (the same values, except for a curve: interpolated knots)."""
        groups = self.groups(shapes, method)
        if self.kind != "curve":
            return {g: float(values.get(g, 0.0)) for g in groups}
        out = {}
        for name in groups:
            base, layer = name.split("@")
            weights = self.knot_weights(int(layer), shapes.num_layers)
            out[name] = min(MAX_RATIO, max(0.0, sum(w * float(values.get(f"{base}~{k}", 0.0)) for k, w in enumerate(weights))))
        return out

    def fit(self, shapes: ModelShapes, method: str, group_values: Mapping[str, float]) -> dict[str, float]:
        """Search coordinates closest to `group_values` (for a curve: least squares over layers, clipped)."""
        groups = self.groups(shapes, method)
        if self.kind != "curve":
            return {g: float(group_values.get(g, 0.0)) for g in groups}
        import numpy as np

        out = {}
        for base in dict.fromkeys(name.split("@")[0] for name in groups):
            names = [n for n in groups if n.split("@")[0] == base]
            basis = np.array([self.knot_weights(int(n.split("@")[1]), shapes.num_layers) for n in names])
            target = np.array([float(group_values.get(n, 0.0)) for n in names])
            knots = np.linalg.lstsq(basis, target, rcond=None)[0]
            out.update({f"{base}~{k}": float(min(MAX_RATIO, max(0.0, v))) for k, v in enumerate(knots)})
        return out

    def dim_params(self, shapes: ModelShapes, method: str) -> dict[str, float]:
        """Dense parameters each search coordinate scales (removing ratio x of a group removes about x times its
        dense parameters): the linear budget model a search uses to stay near its budget between projections."""
        groups = self.groups(shapes, method)
        dense = {name: float(sum(u.dense_params for u in units)) for name, units in groups.items()}
        if self.kind != "curve":
            return dense
        out = {d: 0.0 for d in self.search_dims(shapes, method)}
        for name, params in dense.items():
            base, layer = name.split("@")
            for k, w in enumerate(self.knot_weights(int(layer), shapes.num_layers)):
                out[f"{base}~{k}"] += w * params
        return out


def _layer_blocks(num_layers: int, blocks: int) -> list[tuple[int, int]]:
    if blocks > num_layers:
        raise RankScopeError(f"5x{blocks} needs at least {blocks} layers; the model has {num_layers}.")
    bounds = [round(i * num_layers / blocks) for i in range(blocks + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(blocks)]


def ranks_from_ratios(units_by_group: Mapping[str, list[RankUnit]], ratios: Mapping[str, float]) -> dict[str, Optional[int]]:
    """Module path -> rank for group ratios (no budget projection). Unknown group names are an error."""
    unknown = set(ratios) - set(units_by_group)
    if unknown:
        raise RankScopeError(
            f"Unknown group(s) {', '.join(sorted(unknown))}; this grouping's groups are: {', '.join(units_by_group)}."
        )
    ranks: dict[str, Optional[int]] = {}
    for name, units in units_by_group.items():
        ratio = float(ratios.get(name, 0.0))
        if not 0.0 <= ratio <= MAX_RATIO:
            raise RankScopeError(f"Ratio for group '{name}' must be between 0 (dense) and {MAX_RATIO}, got {ratio}.")
        for unit in units:
            rank = unit.rank_for_ratio(ratio)
            for path in unit.paths:
                ranks[path] = rank
    return ranks


def budget_target(shapes: ModelShapes, reduction: float) -> int:
    """Target decoder-linear parameter count for a reduction (0.2 = remove 20% of decoder linears)."""
    if not 0.0 <= reduction < 1.0:
        raise BudgetError(f"A budget is a decoder-linear reduction in [0, 1), got {reduction}.")
    return int(round(shapes.decoder_linear_params * (1.0 - reduction)))


def project_to_budget(
    shapes: ModelShapes, method: str, grouping: Grouping, ratios: Mapping[str, float], target: int
) -> tuple[dict[str, Optional[int]], dict[str, float]]:
    """Ranks meeting `target` decoder-linear parameters (within one rank step, never above).

    Returns the rank map and the scaled group ratios actually used.
    """
    groups = grouping.groups(shapes, method)
    grouped = {u.paths for units in groups.values() for u in units}
    fixed = sum(u.dense_params for u in shapes.units(method) if u.paths not in grouped)
    searchable = [u for units in groups.values() for u in units]
    cheapest = fixed + sum(u.params(RANK_STEP) if not u.keeps_dense(RANK_STEP) else u.dense_params for u in searchable)
    dense = shapes.decoder_linear_params
    if target >= dense:
        return {p: None for u in shapes.units(method) for p in u.paths}, {k: 0.0 for k in groups}
    if target < cheapest:
        raise BudgetError(
            f"A target of {target:,} decoder-linear parameters ({1 - target / dense:.1%} reduction) is infeasible with "
            f"grouping {grouping.label}{'' if grouping.search_v else ' and v dense'}: the most it can remove is "
            f"{1 - cheapest / dense:.1%} (every compressible matrix at rank {RANK_STEP}). Ask for at most that."
        )
    unknown = set(ratios) - set(groups)
    if unknown:
        raise BudgetError(f"Unknown group(s) {', '.join(sorted(unknown))}; this grouping's groups are: {', '.join(groups)}.")
    values = {k: float(ratios.get(k, 0.0)) for k in groups}

    chosen = _scaled_onto_target(values, lambda ratio_of: _params(shapes, method, ranks_from_ratios(groups, ratio_of)),
                                 target)
    ranks = ranks_from_ratios(groups, chosen)
    return _top_up(shapes, method, groups, ranks, target), chosen


def _scaled_onto_target(values: Mapping[str, float], evaluate, target: int) -> dict[str, float]:
    """Group values moved onto `target` parameters (`evaluate(values)` counts them), as the module docstring says:
    1. scale the positive values by one factor, up to where the largest-scaled one reaches MAX_RATIO (dense
       groups stay dense, proportions are kept);
    2. if that is not enough (or all groups are dense), from there raise every group together, which reaches
       MAX_RATIO everywhere (feasible, checked by the caller) at the end of the path."""
    def bisect(path) -> dict[str, float]:
        """The first point along a monotone path t in [0, 1] (fewer parameters as t grows) that meets the target."""
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            if evaluate(path(mid)) <= target:
                high = mid
            else:
                low = mid
        return path(high)

    positive = {k: v for k, v in values.items() if v > 0}
    reach = MAX_RATIO / min(positive.values()) if positive else 0.0

    def scaled(t: float) -> dict[str, float]:
        return {k: min(MAX_RATIO, v * t * reach) for k, v in values.items()}

    if positive and evaluate(scaled(1.0)) <= target:
        return bisect(scaled)
    base = scaled(1.0)
    return bisect(lambda t: {k: min(MAX_RATIO, b + t * MAX_RATIO) for k, b in base.items()})


def _params(shapes: ModelShapes, method: str, ranks: Mapping[str, Optional[int]]) -> int:
    return sum(u.params(ranks.get(u.paths[0])) for u in shapes.units(method))


def top_up_to_target(shapes: ModelShapes, method: str, ranks: dict, target: int) -> dict:
    """`ranks` with what is left under `target` spent one rank step at a time on its compressed units."""
    return _top_up(shapes, method, {"all": list(shapes.units(method))}, dict(ranks), target)


def _rank_steps(units, ranks: dict, total: int, target: int) -> tuple[int, bool]:
    """One pass over `units` in order, each raised one rank step (to dense past break-even) where the step still fits
    under the target; (the new total, whether anything changed). `ranks` is changed in place."""
    changed = False
    for unit in units:
        rank = ranks[unit.paths[0]]
        if rank is None:
            continue
        new_rank = rank + RANK_STEP
        new = None if unit.keeps_dense(new_rank) or new_rank > unit.max_rank else new_rank
        delta = unit.params(new) - unit.params(rank)
        if total + delta <= target:
            for path in unit.paths:
                ranks[path] = new
            total += delta
            changed = True
    return total, changed


def _top_up(shapes, method, groups, ranks: dict, target: int) -> dict:
    """Spend what is left under the target one rank step at a time, unit by unit in layer order."""
    units = [u for members in groups.values() for u in members if ranks.get(u.paths[0]) is not None]
    total, changed = _params(shapes, method, ranks), True
    while changed:
        total, changed = _rank_steps(units, ranks, total, target)
    return ranks


# -- attention ranks and MLP channel pruning in one allocation (a search with mlp="prune") -----------------------
PRUNE_GROUP = "mlp-prune"


def pruning_groups(shapes: ModelShapes, method: str, grouping: Grouping
                   ) -> tuple[dict[str, list[RankUnit]], dict[str, list]]:
    """(rank groups, pruning groups) for a study that prunes MLPs instead of factorising them.

    Rank groups are the grouping's groups without gate, up and down (attention stays as it is); pruning groups
    are one `mlp-prune` group per layer block, named like the others (`mlp-prune`, `mlp-prune@0-7`,
    `mlp-prune@3` for per-layer), each holding its layers' `MlpShape`s. A pruning group's value is the share
    of its MLPs' channels removed.
    """
    if grouping.kind in ("custom", "curve"):
        raise RankScopeError(f"MLP pruning groups follow a 5x1, 5xG or per-layer grouping, not a {grouping.kind} one.")
    if not shapes.mlps:
        raise RankScopeError(f"Pruning MLP channels needs gated MLPs (gate, up and down); '{shapes.model_id}' has none.")
    mlp_paths = {p for m in shapes.mlps for p in m.paths}
    rank_groups = {}
    for name, units in grouping.groups(shapes, method).items():
        kept = [u for u in units if not mlp_paths.intersection(u.paths)]
        if kept:
            rank_groups[name] = kept
    if grouping.kind == "per-layer":
        blocks = [(layer, layer) for layer in range(shapes.num_layers)]
    else:
        blocks = _layer_blocks(shapes.num_layers, grouping.layer_blocks if grouping.kind == "5xG" else 1)
    prune: dict[str, list] = {}
    for first, last in blocks:
        members = [m for m in shapes.mlps if first <= m.layer <= last]
        if not members:
            continue
        suffix = "" if grouping.kind == "5x1" else (f"@{first}" if grouping.kind == "per-layer" else f"@{first}-{last}")
        prune[f"{PRUNE_GROUP}{suffix}"] = members
    return rank_groups, prune


def kept_for_value(d_ff: int, value: float) -> Optional[int]:
    """Kept channels for a removed share `value`: max(1, round((1 − value)·d_ff)); None (not pruned) for 0 or all."""
    if value == 0.0:
        return None
    kept = max(1, int(round((1.0 - value) * d_ff)))
    return None if kept >= d_ff else kept


def channels_from_values(prune_groups: Mapping[str, list], values: Mapping[str, float]) -> dict[str, Optional[int]]:
    """MLP path -> kept channels (None: not pruned) for pruning-group values."""
    channels: dict[str, Optional[int]] = {}
    for name, mlps in prune_groups.items():
        value = float(values.get(name, 0.0))
        if not 0.0 <= value <= MAX_RATIO:
            raise RankScopeError(f"Value for group '{name}' must be between 0 (not pruned) and {MAX_RATIO}, got {value}.")
        for mlp in mlps:
            channels[mlp.path] = kept_for_value(mlp.d_ff, value)
    return channels


def project_mixed_to_budget(
    shapes: ModelShapes, method: str, grouping: Grouping, values: Mapping[str, float], target: int
) -> tuple[dict[str, Optional[int]], dict[str, Optional[int]], dict[str, float]]:
    """`project_to_budget` for rank groups and MLP pruning groups together (see `pruning_groups`).

    Every group's value scales by one common factor (then, if that is not enough, all rise together) until the
    plan, counted with `count_parameters(..., channels)`, meets `target`; then ranks are topped up one rank step
    and pruned MLPs one channel at a time, so the result is at or under the target and within one step of it.
    Returns (ranks with every pruned MLP's gate/up/down dense, kept channels per MLP, the values used).
    """
    rank_groups, prune_groups = pruning_groups(shapes, method, grouping)
    names = [*rank_groups, *prune_groups]
    unknown = set(values) - set(names)
    if unknown:
        raise BudgetError(f"Unknown group(s) {', '.join(sorted(unknown))}; this study's groups are: {', '.join(names)}.")
    all_paths = [p for u in shapes.units(method) for p in u.paths]

    def plan(ratio_of: Mapping[str, float]):
        ranks = {p: None for p in all_paths}
        ranks.update(ranks_from_ratios(rank_groups, {k: ratio_of[k] for k in rank_groups}))
        return ranks, channels_from_values(prune_groups, {k: ratio_of[k] for k in prune_groups})

    def evaluate(ratio_of: Mapping[str, float]) -> int:
        return count_parameters(shapes, method, *plan(ratio_of)).decoder_compressed

    dense = shapes.decoder_linear_params
    if target >= dense:
        return {p: None for p in all_paths}, {m.path: None for m in shapes.mlps}, {k: 0.0 for k in names}
    cheapest = evaluate({k: MAX_RATIO for k in names})
    if target < cheapest:
        raise BudgetError(
            f"A target of {target:,} decoder-linear parameters ({1 - target / dense:.1%} reduction) is infeasible with "
            f"grouping {grouping.label}, MLPs pruned{'' if grouping.search_v else ' and v dense'}: the most it can "
            f"remove is {1 - cheapest / dense:.1%}. Ask for at most that.")
    chosen = _scaled_onto_target({k: float(values.get(k, 0.0)) for k in names}, evaluate, target)
    ranks, channels = plan(chosen)
    _top_up_mixed(shapes, method, rank_groups, prune_groups, ranks, channels, target)
    return ranks, channels, chosen


def _top_up_mixed(shapes, method, rank_groups, prune_groups, ranks: dict, channels: dict, target: int) -> None:
    """Spend what is left under the target: one rank step per factorised unit, one channel per pruned MLP, in turn."""
    units = [u for members in rank_groups.values() for u in members if ranks.get(u.paths[0]) is not None]
    mlps = [m for members in prune_groups.values() for m in members if channels.get(m.path) is not None]
    total = count_parameters(shapes, method, ranks, channels).decoder_compressed
    changed = True
    while changed:
        total, changed = _rank_steps(units, ranks, total, target)
        for mlp in mlps:
            kept = channels[mlp.path]
            if kept is None:
                continue
            new = None if kept + 1 >= mlp.d_ff else kept + 1
            delta = mlp.params(new) - mlp.params(kept)
            if total + delta <= target:
                channels[mlp.path] = new
                total += delta
                changed = True
