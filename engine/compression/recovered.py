"""Trainable vectors on compressed linears, and folding them back into the factors.

A recovery learns a few vectors on top of a compressed model and then folds them into the factors,
so the recovered model has the same `LowRankLinear` form, format and parameter count as any other:

- `subspace` (Bolaco §3.3, Eq. 9): `y = (B A + Λ_b B_S Λ_d A_S) x` for the leading `r'` directions
  `S` of each factor pair, with diagonal `Λ_b` (one entry per output, starting at 0) and `Λ_d` (one
  per direction, starting at 0.1), so training starts exactly at the compressed model. `A_S` are
  rows of `A`, so the update folds into `B`: `B[:, S] += λ_b ⊙ B[:, S] ⊙ λ_d`.
- `basis` (Basis Selection): `y = B diag(s) A x` with the bases `A`, `B` fixed and one scale per
  direction, starting at 1 (the product is then today's factors). A direction's importance is its
  relearned singular value `|s_i| ‖B[:, i]‖ ‖A[i, :]‖`; pruning drops the least important ones, and
  folding keeps the survivors: `A' = A[kept]`, `B' = B[:, kept] · s[kept]`.

Linears that share one `A` (joint-svd) keep sharing it: the subspace fold only changes `B`, and basis
pruning keeps one set of directions per shared `A` (importances summed over its linears).

`attach_` wraps a compressed model's `LowRankLinear`s for training, `vectors_of`/`load_vectors_`
move the learned vectors to and from stored arrays, and `fold_` puts plain `LowRankLinear`s back.
The vectors live on the factors' device and train in float32 even when the model runs in bfloat16 or
float16 (AdamW steps of 1e-3 vanish in a half-precision number); they are cast to the forward dtype in use.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from engine.compression.lowrank import LowRankLinear, _set_submodule, compressed_paths
from engine.errors import RankScopeError

RECOVERY_KINDS: dict[str, str] = {
    "subspace": "Bolaco's subspace post-training: two diagonal vectors on the leading r' directions (Eq. 9)",
    "basis": "Basis Selection: relearned per-direction scales, optionally pruning the least important directions",
}
DEFAULT_SUBSET = 64  # Bolaco's r' (256 on LLaMA-2-7B); capped at each linear's rank
SUBSPACE_D_INIT = 0.1  # Λ_d's start, as in ELoRA and the issue; Λ_b starts at 0


class RecoveryError(RankScopeError):
    """A recovery that cannot be attached, loaded or folded as asked."""


class SubspaceLinear(nn.Module):
    """A `LowRankLinear` plus Bolaco's trainable subspace update on its leading `subset` directions."""

    def __init__(self, base: LowRankLinear, subset: int = DEFAULT_SUBSET):
        super().__init__()
        if subset < 1:
            raise RecoveryError(f"The subspace size r' must be at least 1, got {subset}.")
        self.base = base
        self.subset = min(subset, base.rank)
        place = _vector_place(base)
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features, **place))
        self.lambda_d = nn.Parameter(torch.full((self.subset,), SUBSPACE_D_INIT, **place))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.base.A)  # [..., r]
        y = F.linear(z, self.base.B, self.base.bias)  # [..., d_out]
        # the update reuses A's output: A_S x is z's first `subset` entries
        update = F.linear(z[..., : self.subset] * self.lambda_d.to(z.dtype), self.base.B[:, : self.subset])
        return y + update * self.lambda_b.to(update.dtype)

    def folded_B(self) -> torch.Tensor:
        """`B` with the learned update added to its leading columns."""
        B = self.base.B.detach().clone()
        k = self.subset
        B[:, :k] += self.lambda_b.detach()[:, None] * B[:, :k] * self.lambda_d.detach()[None, :]
        return B

    def vectors(self) -> dict[str, torch.Tensor]:
        return {"lambda_b": self.lambda_b.detach(), "lambda_d": self.lambda_d.detach()}


class ScaledBasisLinear(nn.Module):
    """A `LowRankLinear` as `B diag(s) A` with trainable scales `s` and a mask of kept directions."""

    def __init__(self, base: LowRankLinear):
        super().__init__()
        self.base = base
        self.scales = nn.Parameter(torch.ones(base.rank, **_vector_place(base)))
        self.register_buffer("kept", torch.ones(base.rank, dtype=torch.bool, device=base.B.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.base.A)
        z = z * (self.scales * self.kept).to(z.dtype)
        return F.linear(z, self.base.B, self.base.bias)

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """Each direction's relearned singular value `|s_i| ‖B[:, i]‖ ‖A[i, :]‖` (0 where pruned)."""
        value = self.scales.abs() * self.base.B.norm(dim=0) * self.base.A.norm(dim=1)
        return value * self.kept

    @property
    def kept_rank(self) -> int:
        return int(self.kept.sum())

    def vectors(self) -> dict[str, torch.Tensor]:
        return {"scales": self.scales.detach(), "kept": self.kept.to(torch.uint8)}


Trainable = Union[SubspaceLinear, ScaledBasisLinear]


def _vector_place(base: LowRankLinear) -> dict:
    """Device and dtype of trained vectors: the factors' device, float32 at least (module docstring)."""
    return {"device": base.B.device, "dtype": torch.promote_types(base.B.dtype, torch.float32)}


def attach_(model: nn.Module, kind: str, subset: int = DEFAULT_SUBSET) -> dict[str, Trainable]:
    """Wrap every compressed linear of `model` for training `kind`; returns the wrappers by module path.

    The model must have been compressed with `compress_`; `restore_` still puts the dense originals back.
    """
    if kind not in RECOVERY_KINDS:
        raise RecoveryError(f"Unknown recovery '{kind}'. Recoveries: {', '.join(RECOVERY_KINDS)}.")
    paths = compressed_paths(model)
    if not any(isinstance(model.get_submodule(p), LowRankLinear) for p in paths):
        raise RecoveryError("The model has no low-rank linears to recover; apply a plan that factorises some first.")
    wrappers: dict[str, Trainable] = {}
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, (SubspaceLinear, ScaledBasisLinear)):
            raise RecoveryError(f"'{path}' is already wrapped for recovery; it cannot be wrapped twice.")
        if not isinstance(base, LowRankLinear):
            continue  # a pruned MLP's smaller dense linear: recovery trains the low-rank factors only
        wrapper = SubspaceLinear(base, subset) if kind == "subspace" else ScaledBasisLinear(base)
        _set_submodule(model, path, wrapper)
        wrappers[path] = wrapper
    return wrappers


def trainable_parameters(wrappers: Mapping[str, Trainable]) -> list[nn.Parameter]:
    return [p for w in wrappers.values() for p in w.parameters() if p.requires_grad]


def vectors_of(wrappers: Mapping[str, Trainable]) -> dict[str, torch.Tensor]:
    """The learned vectors as flat arrays named `<module path>.<vector>` (what a run stores)."""
    return {f"{path}.{name}": value.cpu().clone()
            for path, w in wrappers.items() for name, value in w.vectors().items()}


@torch.no_grad()
def load_vectors_(wrappers: Mapping[str, Trainable], tensors: Mapping[str, torch.Tensor]) -> None:
    """Set the wrappers' vectors from `vectors_of`'s arrays; raises `RecoveryError` when they do not match."""
    for path, w in wrappers.items():
        for name, current in w.vectors().items():
            stored = tensors.get(f"{path}.{name}")
            if stored is None or stored.shape != current.shape:
                raise RecoveryError(
                    f"The stored recovery vectors do not fit '{path}' ({name}: stored "
                    f"{None if stored is None else tuple(stored.shape)}, needed {tuple(current.shape)}); "
                    "they were trained for another plan.")
            if name == "kept":
                w.kept.copy_(stored.bool())
            else:
                getattr(w, name).copy_(stored.to(current.dtype))


def fold_(model: nn.Module, wrappers: Mapping[str, Trainable]) -> dict[str, int]:
    """Replace each wrapper by a plain `LowRankLinear` holding the folded factors; returns the ranks."""
    shared_A: dict[tuple, nn.Parameter] = {}
    ranks: dict[str, int] = {}
    for path, w in wrappers.items():
        base = w.base
        bias = None if base.bias is None else base.bias.detach()
        if isinstance(w, SubspaceLinear):
            A, B, key = base.A.detach(), w.folded_B(), (id(base.A), None)
        else:
            kept = torch.nonzero(w.kept).flatten()
            A = base.A.detach()[kept].clone()
            B = (base.B.detach() * w.scales.detach()[None, :])[:, kept].to(base.B.dtype)  # a copy
            key = (id(base.A), tuple(kept.tolist()))
        module = LowRankLinear(A, B, bias)
        if key in shared_A:  # linears that shared A before folding share the folded A
            module.A = shared_A[key]
        else:
            shared_A[key] = module.A
        _set_submodule(model, path, module)
        ranks[path] = module.rank
    return ranks


@torch.no_grad()
def prune_to_ranks_(wrappers: Mapping[str, ScaledBasisLinear], ranks: Mapping[str, int]) -> None:
    """Keep, in each linear, its `ranks[path]` most important directions (one set per shared `A`)."""
    for members in shared_groups(wrappers).values():
        target = ranks[members[0]]
        if any(ranks[p] != target for p in members):
            raise RecoveryError(f"{' and '.join(members)} share one factor and need one rank.")
        importance = sum(wrappers[p].importance() for p in members)
        keep = torch.zeros_like(wrappers[members[0]].kept)
        if target > int(wrappers[members[0]].kept.sum()):
            raise RecoveryError(f"'{members[0]}' keeps {int(wrappers[members[0]].kept.sum())} directions and cannot grow "
                                f"back to {target}: pruning only removes directions.")
        keep[torch.topk(importance, k=target).indices] = True  # pruned directions have importance 0
        for p in members:
            wrappers[p].kept.copy_(keep)


def shared_groups(wrappers: Mapping[str, Trainable]) -> dict[int, list[str]]:
    """Module paths grouped by the `A` they share (one entry per linear for methods without sharing)."""
    groups: dict[int, list[str]] = {}
    for path, w in wrappers.items():
        groups.setdefault(id(w.base.A), []).append(path)
    return groups


def apply_recovery_(model: nn.Module, kind: str, tensors: Mapping[str, torch.Tensor],
                    subset: Optional[int] = None) -> dict[str, int]:
    """Fold stored recovery vectors into a model compressed at the run's starting ranks; returns the new ranks."""
    wrappers = attach_(model, kind, subset or DEFAULT_SUBSET)
    load_vectors_(wrappers, tensors)
    return fold_(model, wrappers)
