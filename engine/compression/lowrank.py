"""`LowRankLinear` and the in-place pair `compress_(model, ranks, factorization)` / `restore_(model)`.

Compute, then swap (STYLE.md): factorising happens once in `engine.methods`; applying a plan only
slices the cached factors (views, no copies) and replaces `nn.Linear` modules in place. The
original modules are kept on the model so `restore_` puts them back exactly; nothing is deep-copied.
Factors are cached on the CPU in float32; a low-rank module is made on its original weight's device and
in its dtype (the model's forward dtype), which on a float32 CPU model is the cached tensors themselves.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import RankScopeError
from engine.methods.base import Factorization

_ORIGINALS = "_rankscope_originals"


class LowRankLinear(nn.Module):
    """`y = B (A x) + bias` with `A: [r, d_in]`, `B: [d_out, r]`; a drop-in for `nn.Linear`."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features, self.rank = A.shape[1], B.shape[0], A.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent `B @ A` (materialised on demand, for inspection only)."""
        return self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., d_in] -> [..., r] -> [..., d_out]
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def compress_(model: nn.Module, ranks: Mapping[str, Optional[int]], factorization: Factorization) -> nn.Module:
    """Swap every module with a rank in `ranks` for a `LowRankLinear` sliced from `factorization`.

    `ranks` maps module paths to a rank, or None to keep the module dense. A model that is already
    compressed is restored first, so applying plan after plan never stacks approximations.
    """
    restore_(model)
    originals: dict[str, nn.Module] = {}
    shared_A: dict[tuple[int, int, torch.device], nn.Parameter] = {}
    try:
        for path, rank in ranks.items():
            if rank is None:
                continue
            factors = factorization.factors.get(path)
            if factors is None:
                raise RankScopeError(f"The {factorization.method} factorisation has no factors for module '{path}'.")
            if not 1 <= rank <= factors.max_rank:
                raise RankScopeError(f"Rank {rank} for '{path}' is outside 1..{factors.max_rank}.")
            original = model.get_submodule(path)
            place = {"device": original.weight.device, "dtype": original.weight.dtype}  # no-ops on a float32 CPU model
            bias = original.bias.detach() if original.bias is not None else None
            delta = factors.bias_delta(rank)
            if delta is not None:  # summed in float32 on the CPU, as the factors are, then placed
                bias = delta if bias is None else bias.to(delta) + delta
            module = LowRankLinear(factors.A[:rank].to(**place), factors.B[:, :rank].to(**place),
                                   None if bias is None else bias.to(**place))
            # linears sharing one A (joint-svd) share one Parameter, so it is counted and stored once
            key = (id(factors.A), rank, place["device"])
            if key in shared_A:
                module.A = shared_A[key]
            else:
                shared_A[key] = module.A
            _set_submodule(model, path, module)
            originals[path] = original
    except Exception:
        for path, original in originals.items():
            _set_submodule(model, path, original)
        raise
    setattr(model, _ORIGINALS, originals)
    return model


def restore_(model: nn.Module) -> nn.Module:
    """Put back the original modules replaced by `compress_` (a no-op on an uncompressed model)."""
    originals: dict[str, nn.Module] = getattr(model, _ORIGINALS, {}) or {}
    for path, original in originals.items():
        _set_submodule(model, path, original)
    if hasattr(model, _ORIGINALS):
        delattr(model, _ORIGINALS)
    return model


def compressed_paths(model: nn.Module) -> list[str]:
    """Module paths currently replaced by low-rank modules."""
    return list((getattr(model, _ORIGINALS, {}) or {}).keys())


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)
