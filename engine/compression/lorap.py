"""LoRAP's allocation: every layer at the same ratio, attention factorised with a (q+k) : (v+o) parameter
split, the MLP pruned by channels (or, for comparison, factorised at the same parameter count).

Per decoder layer with reduction `λ`, attention keeps `(1 − λ)` of its parameters, split `s_qk : s_vo`
(LoRAP: 1 : 3) between q+k (one rank for both) and v+o (one rank for both). When v+o's share would make
factors no smaller than a matrix (its break-even rank), that matrix stays dense and what its share has left
over goes to q+k (LoRAP's Appendix, "special case"); a share larger than v+o's whole size keeps both dense.
Attention ranks are rounded down to multiples of 8. The MLP then gets what is left of the layer's budget, so each layer
lands within one channel (3·d parameters) of `(1 − λ)` of its size: `⌊left / 3d⌋` kept channels when pruned,
or the rank of the same parameter count for gate, up and down when factorised (`mlp="low-rank"`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from engine.compression.pruning import PruningSettings
from engine.compression.units import RANK_STEP, LinearShape, ModelShapes
from engine.errors import RankScopeError
from engine.progress import ProgressCallback

if TYPE_CHECKING:
    from engine.compression.plan import RankPlan
    from engine.compression.session import CompressionSession

DEFAULT_SPLIT = (1.0, 3.0)
MLP_FORMS = ("prune", "low-rank")


def parse_split(text: str) -> tuple[float, float]:
    """'1:3' -> (1.0, 3.0); refuses anything that is not two positive numbers."""
    try:
        qk, vo = (float(part) for part in text.split(":"))
    except ValueError:
        qk = vo = -1.0
    if qk <= 0 or vo <= 0:
        raise RankScopeError(f"The attention split is q+k:v+o as two positive numbers such as 1:3 (LoRAP's), got '{text}'.")
    return qk, vo


def lorap_plan(session: "CompressionSession", reduction: float, split: tuple[float, float] = DEFAULT_SPLIT,
               pruning: PruningSettings = PruningSettings(), mlp: str = "prune",
               progress: Optional[ProgressCallback] = None) -> "RankPlan":
    """LoRAP's plan for the session's model and method (awsvd is LoRAP's own); a v2 plan when the MLP is pruned."""
    ranks, channels = lorap_allocation(session.shapes, reduction, split, mlp)
    if channels:
        session.channel_order(pruning.aggregation, progress)  # the calibration it needs, with progress
    return session.plan(ranks, channels=channels or None, pruning=pruning.to_dict() if channels else None)


def lorap_allocation(shapes: ModelShapes, reduction: float, split: tuple[float, float] = DEFAULT_SPLIT,
                     mlp: str = "prune") -> tuple[dict[str, Optional[int]], dict[str, Optional[int]]]:
    """(ranks, kept channels) for LoRAP at decoder-linear `reduction`; see the module docstring."""
    if not 0.0 < reduction < 1.0:
        raise RankScopeError(f"The reduction is the share of decoder-linear parameters removed, between 0 and 1; "
                             f"got {reduction}.")
    if mlp not in MLP_FORMS:
        raise RankScopeError(f"The MLP is compressed by one of {', '.join(MLP_FORMS)}, got '{mlp}'.")
    if not shapes.mlps:
        raise RankScopeError(f"LoRAP prunes gated MLPs (gate, up and down); '{shapes.model_id}' has none.")
    by_layer: dict[int, dict[str, LinearShape]] = {}
    for s in shapes.linears:
        by_layer.setdefault(s.layer, {})[s.linear_type] = s
    ranks: dict[str, Optional[int]] = {}
    channels: dict[str, Optional[int]] = {}
    for mlp_shape in shapes.mlps:
        types = by_layer[mlp_shape.layer]
        attention = [types[t] for t in ("q", "k", "v", "o") if t in types]
        attention_dense = sum(s.d_in * s.d_out for s in attention)
        layer_budget = (1.0 - reduction) * (attention_dense + mlp_shape.params(None))
        layer_ranks = _attention_ranks(types, (1.0 - reduction) * attention_dense, split)
        ranks.update(layer_ranks)
        spent = sum(_params(types[t], layer_ranks[types[t].path]) for t in ("q", "k", "v", "o") if t in types)
        left = max(0.0, layer_budget - spent)
        kept = max(1, min(mlp_shape.d_ff, int(left // (3 * mlp_shape.d_model))))
        if mlp == "prune":
            channels[mlp_shape.path] = kept
            ranks.update({p: None for p in mlp_shape.paths})
        else:
            per_rank = sum(types[t].d_in + types[t].d_out for t in ("gate", "up", "down"))
            rank = max(1, int(mlp_shape.params(kept) // per_rank))  # exact, not a multiple of 8: equal parameters
            ranks.update({types[t].path: rank for t in ("gate", "up", "down")})
    return ranks, channels


def _attention_ranks(types: dict[str, LinearShape], budget: float, split: tuple[float, float]) -> dict[str, Optional[int]]:
    qk = [types[t] for t in ("q", "k") if t in types]
    vo = [types[t] for t in ("v", "o") if t in types]
    qk_budget = budget * split[0] / (split[0] + split[1])
    vo_ranks, vo_spent = _pair_ranks(vo, budget - qk_budget)
    # the special case: what v+o cannot use (matrices kept dense cost less than their share) goes to q+k
    qk_ranks, _ = _pair_ranks(qk, qk_budget + (budget - qk_budget - vo_spent))
    return {**vo_ranks, **qk_ranks}


def _pair_ranks(pair: list[LinearShape], budget: float) -> tuple[dict[str, Optional[int]], int]:
    """One rank for the pair within `budget`; a matrix whose factors would be no smaller than itself stays dense
    (the smaller first) and the other gets what is left. Returns the ranks and the parameters they use."""
    dense: list[LinearShape] = []
    while True:
        factored = [s for s in pair if s not in dense]
        if not factored:
            rank = None
            break
        left = budget - sum(s.d_in * s.d_out for s in dense)
        rank = _round(max(0.0, left) / sum(s.d_in + s.d_out for s in factored))
        # dense is affordable for such a matrix: rank·(its cost) >= its size, and rank·cost <= left
        over = [s for s in factored if rank * (s.d_in + s.d_out) >= s.d_in * s.d_out]
        if not over:
            break
        dense.append(min(over, key=lambda s: s.d_in * s.d_out))
    ranks = {s.path: None if s in dense else rank for s in pair}
    return ranks, sum(_params(s, ranks[s.path]) for s in pair)


def _round(rank: float) -> int:
    return max(RANK_STEP, int(rank // RANK_STEP) * RANK_STEP)


def _params(shape: LinearShape, rank: Optional[int]) -> int:
    return shape.d_in * shape.d_out if rank is None else rank * (shape.d_in + shape.d_out)
