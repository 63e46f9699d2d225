"""Rank units: the things a plan gives one rank to, and their parameter arithmetic (DESIGN.md §7).

A unit is one decoder linear, or, for methods that share `A` (joint-svd), a pair of linears with
the same input (q‖k, gate‖up). A unit with input size `d_in` and output sizes `d_out_i` has
`d_in·Σd_out_i` dense parameters and `r·(d_in + Σd_out_i)` at rank r. Ratios map to ranks by
`r = (1 − λ)·d_in·Σd_out/(d_in + Σd_out)` rounded to a multiple of 8; a rank whose factors would not
be smaller than the dense matrices means "keep dense" (None). A rank above the break-even rank
`⌊d_in·Σd_out/(d_in + Σd_out)⌋` costs more parameters than the dense matrices and cannot be closer to
them than they are, so plans refuse it and the cache keeps factors only up to it. MACs per token equal
parameters for a linear, so the same counts serve both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from engine.models.loading import LoadedModel
from engine.models.summary import parameter_summary

RANK_STEP = 8
JOINT_METHODS: dict[str, tuple[tuple[str, str], ...]] = {"joint-svd": (("q", "k"), ("gate", "up"))}


@dataclass(frozen=True)
class LinearShape:
    path: str
    layer: int
    linear_type: str
    d_out: int
    d_in: int


@dataclass(frozen=True)
class RankUnit:
    """Linears that share one rank: one matrix, or a joint pair sharing A."""

    paths: tuple[str, ...]
    layer: int
    types: tuple[str, ...]
    d_in: int
    d_out: int  # summed over the unit's linears

    @property
    def dense_params(self) -> int:
        return self.d_in * self.d_out

    @property
    def max_rank(self) -> int:
        return min(self.d_in, self.d_out)

    @property
    def break_even_rank(self) -> int:
        """The largest rank whose factors are not larger than the dense matrices, `⌊d_in·d_out / (d_in + d_out)⌋`:
        above it a rank only costs parameters, so plans refuse it and the cache keeps factors up to it."""
        return self.dense_params // (self.d_in + self.d_out)

    def params(self, rank: Optional[int]) -> int:
        return self.dense_params if rank is None else rank * (self.d_in + self.d_out)

    def keeps_dense(self, rank: int) -> bool:
        """True when rank-`rank` factors would be no smaller than the dense matrices."""
        return rank * (self.d_in + self.d_out) >= self.dense_params

    def rank_for_ratio(self, ratio: float) -> Optional[int]:
        """Rank for a parameter-reduction ratio λ in [0, 1): multiple of 8, at least 8; None = dense."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if ratio == 0.0:
            return None
        exact = (1.0 - ratio) * self.dense_params / (self.d_in + self.d_out)
        rank = max(RANK_STEP, int(round(exact / RANK_STEP)) * RANK_STEP)
        return None if self.keeps_dense(rank) else min(rank, self.max_rank)


@dataclass(frozen=True)
class MlpShape:
    """One layer's gated MLP, the unit of channel pruning: `d_ff` channels of gate rows, up rows, down columns."""

    path: str  # the MLP module, e.g. model.layers.3.mlp
    layer: int
    gate: str
    up: str
    down: str
    d_model: int
    d_ff: int

    @property
    def paths(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down

    def params(self, kept: Optional[int]) -> int:
        """Weights of gate, up and down with `kept` channels (None: all of them)."""
        return 3 * self.d_model * (self.d_ff if kept is None else kept)


@dataclass(frozen=True)
class ModelShapes:
    """What plans need to know about a model: its decoder linears and parameter totals."""

    model_id: str
    fingerprint: str
    model_type: str
    num_layers: int
    linears: tuple[LinearShape, ...]
    total_params: int  # all parameters, embeddings included, tied ones once

    @classmethod
    def of(cls, loaded: LoadedModel) -> "ModelShapes":
        linears = tuple(LinearShape(r.path, r.layer, r.linear_type, *r.shape) for r in loaded.linears())
        return cls(loaded.model_id, loaded.fingerprint, loaded.model_type, loaded.num_layers, linears,
                   parameter_summary(loaded).total)

    @property
    def by_path(self) -> dict[str, LinearShape]:
        return {s.path: s for s in self.linears}

    @property
    def decoder_linear_params(self) -> int:
        return sum(s.d_in * s.d_out for s in self.linears)

    @property
    def mlps(self) -> tuple[MlpShape, ...]:
        """Each layer's gated MLP (layers without all of gate, up and down have none)."""
        by_layer: dict[int, dict[str, LinearShape]] = {}
        for s in self.linears:
            by_layer.setdefault(s.layer, {})[s.linear_type] = s
        out = []
        for layer, types in sorted(by_layer.items()):
            if {"gate", "up", "down"} <= set(types):
                gate, up, down = types["gate"], types["up"], types["down"]
                out.append(MlpShape(gate.path.rpartition(".")[0], layer, gate.path, up.path, down.path,
                                    gate.d_in, gate.d_out))
        return tuple(out)

    def units(self, method: str) -> list[RankUnit]:
        """Rank units in layer order; joint pairs for joint methods, single linears otherwise."""
        pairs = JOINT_METHODS.get(method, ())
        by_key = {(s.layer, s.linear_type): s for s in self.linears}
        paired = {t for pair in pairs for t in pair}
        units = []
        for s in self.linears:
            if s.linear_type not in paired:
                units.append(RankUnit((s.path,), s.layer, (s.linear_type,), s.d_in, s.d_out))
            elif any(s.linear_type == pair[0] for pair in pairs):
                second = by_key[(s.layer, next(p[1] for p in pairs if p[0] == s.linear_type))]
                units.append(RankUnit((s.path, second.path), s.layer, (s.linear_type, second.linear_type),
                                      s.d_in, s.d_out + second.d_out))
        return units


@dataclass(frozen=True)
class ParameterCounts:
    """Compression reported both ways: over decoder linears and over all parameters."""

    decoder_dense: int
    decoder_compressed: int
    total_dense: int
    total_compressed: int

    @property
    def decoder_reduction(self) -> float:
        return 1.0 - self.decoder_compressed / self.decoder_dense

    @property
    def total_reduction(self) -> float:
        return 1.0 - self.total_compressed / self.total_dense

    def to_dict(self) -> dict:
        return {
            "decoder_linear": {"dense": self.decoder_dense, "compressed": self.decoder_compressed,
                               "reduction": round(self.decoder_reduction, 6)},
            "total": {"dense": self.total_dense, "compressed": self.total_compressed,
                      "reduction": round(self.total_reduction, 6)},
            "macs_per_token_decoder_linear": {"dense": self.decoder_dense, "compressed": self.decoder_compressed},
        }


def count_parameters(shapes: ModelShapes, method: str, ranks: Mapping[str, Optional[int]],
                     channels: Optional[Mapping[str, Optional[int]]] = None) -> ParameterCounts:
    """Parameter counts of a rank map (paths missing from it are dense) and of pruned MLPs (`channels`: MLP path
    -> kept channels, None or missing = not pruned; a pruned MLP's gate, up and down count as its kept slices)."""
    compressed = 0
    pruned: set[str] = set()
    for mlp in shapes.mlps:
        kept = (channels or {}).get(mlp.path)
        if kept is not None:
            compressed += mlp.params(kept)
            pruned.update(mlp.paths)
    for unit in shapes.units(method):
        if pruned.intersection(unit.paths):
            continue
        compressed += unit.params(ranks.get(unit.paths[0]))
    dense = shapes.decoder_linear_params
    return ParameterCounts(dense, compressed, shapes.total_params, shapes.total_params - dense + compressed)
