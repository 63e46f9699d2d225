"""LoRAP's gradient-free FFN channel pruning (§3.3): scores, kept channels, and pruning a model in place.

Channel `i` of a gated MLP is a group: row `i` of gate, row `i` of up and column `i` of down. Each weight's
importance is `I(W_ij) = |W_ij| · ‖X_j‖₂` (Eq. 1), with `‖X_j‖₂` the calibration L2 norm of the linear's
input channel `j` (`mlp_in` for gate and up, `down_in` for down); a row's score aggregates its importances
(`l2`, the paper's choice, or `l1`/`max`, its Table 7); the group's score is
`Φ(gate_i) + Φ(up_i) + Φ(down_:,i)` (Eq. 10). Keeping `k` of `n` channels with retention `ρ` keeps the top
`k − m` groups and the bottom `m = round(ρ n)` (Eq. 11: the least important 1% matter), inside the same budget.

A pruned MLP is three smaller dense linears (`nn.Linear` slices of the originals); `prune_mlps_` swaps them in
after `compress_` and records the originals with the low-rank ones, so `restore_` puts everything back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from engine.compression.lowrank import _ORIGINALS, _set_submodule
from engine.errors import RankScopeError

AGGREGATIONS = ("l2", "l1", "max")
DEFAULT_RETENTION = 0.01  # LoRAP keeps the least important 1% of groups
MAX_RETENTION = 0.5


class PruningError(RankScopeError):
    """A pruning setting or kept-channel count that is not allowed."""


@dataclass(frozen=True)
class PruningSettings:
    """How channels are scored and chosen: the row aggregation and the share of least important groups kept."""

    aggregation: str = "l2"
    retention: float = DEFAULT_RETENTION

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise PruningError(f"Unknown channel-score aggregation '{self.aggregation}'. Aggregations: "
                               f"{', '.join(AGGREGATIONS)} (LoRAP uses l2).")
        if isinstance(self.retention, bool) or not isinstance(self.retention, (int, float)) \
                or not 0.0 <= self.retention <= MAX_RETENTION:
            raise PruningError(f"The retained share of least important channels must be between 0 and "
                               f"{MAX_RETENTION:.0%} (LoRAP keeps 1%), got {self.retention!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "PruningSettings":
        data = dict(data or {})
        unknown = set(data) - {"aggregation", "retention"}
        if unknown:
            raise PruningError(f"Unknown pruning setting(s): {', '.join(sorted(unknown))}; allowed: aggregation, "
                               "retention.")
        return cls(**data)


def row_scores(weight: torch.Tensor, input_norm: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Φ of each row of `weight` ([out, in]) with importances |W_ij| ‖X_j‖₂ -> [out]."""
    importance = weight.abs().double() * input_norm.double()[None, :]
    if aggregation == "l2":
        return importance.norm(dim=1)
    if aggregation == "l1":
        return importance.sum(dim=1)
    return importance.amax(dim=1)


def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, mlp_in_norm: torch.Tensor,
                   down_in_norm: torch.Tensor, aggregation: str = "l2") -> torch.Tensor:
    """Group scores `Φ(gate_i) + Φ(up_i) + Φ(down_:,i)` of every intermediate channel -> [d_ff]."""
    # down's column i: importances |down_ki| ‖X_i‖₂ over outputs k, i.e. rows of (down * norm)ᵀ
    down_columns = row_scores(down.t(), torch.ones(down.shape[0], dtype=torch.float64), aggregation)
    return (row_scores(gate, mlp_in_norm, aggregation) + row_scores(up, mlp_in_norm, aggregation)
            + down_columns * down_in_norm.double())


def kept_channels(order: torch.Tensor, keep: int, retention: float) -> torch.Tensor:
    """The channels kept (sorted) from `order` (channel ids by descending score): the top `keep − m` and the
    bottom `m = round(retention · n)` (at most `keep`)."""
    n = int(order.numel())
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise PruningError(f"A pruned MLP keeps from 1 to {n} channels (its intermediate width), got {keep!r}.")
    m = min(keep, int(round(retention * n)))
    chosen = torch.cat([order[: keep - m], order[n - m:] if m else order[:0]])
    return torch.sort(chosen).values


def pruned_linears(gate: nn.Linear, up: nn.Linear, down: nn.Linear, kept: torch.Tensor) -> tuple[nn.Linear, ...]:
    """Gate and up with only the kept rows, down with only the kept columns (copies; the originals stay)."""
    def sliced(linear: nn.Linear, rows: Optional[torch.Tensor], columns: Optional[torch.Tensor]) -> nn.Linear:
        weight = linear.weight.detach()
        weight = weight[rows] if rows is not None else weight
        weight = weight[:, columns] if columns is not None else weight
        bias = None if linear.bias is None else linear.bias.detach()
        if bias is not None and rows is not None:
            bias = bias[rows]
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        module.requires_grad_(False)
        return module

    return sliced(gate, kept, None), sliced(up, kept, None), sliced(down, None, kept)


def prune_mlps_(model: nn.Module, kept: Mapping[str, tuple[str, str, str, torch.Tensor]]) -> None:
    """Swap in pruned gate/up/down for each MLP: `kept[mlp] = (gate path, up path, down path, kept channels)`.

    Call after `compress_` (which restores first); the originals join the ones `restore_` puts back.
    """
    originals: dict[str, nn.Module] = getattr(model, _ORIGINALS, None)
    if originals is None:
        originals = {}
        setattr(model, _ORIGINALS, originals)
    for gate_path, up_path, down_path, channels in kept.values():
        modules = [model.get_submodule(p) for p in (gate_path, up_path, down_path)]
        for path, module in zip((gate_path, up_path, down_path), modules):
            if path in originals or not isinstance(module, nn.Linear):
                raise PruningError(f"'{path}' is already compressed; a pruned MLP keeps gate, up and down dense.")
        for path, original, module in zip((gate_path, up_path, down_path), modules, pruned_linears(*modules, channels)):
            _set_submodule(model, path, module)
            originals[path] = original
