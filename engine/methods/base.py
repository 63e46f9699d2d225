"""The common protocol of decomposition methods, their factors, and the method registry.

A method factorises every decoder linear once, at full rank `R`, into `W ≈ B A` with
`B: [d_out, R]`, `A: [R, d_in]`, ordered so that the first `r` columns of `B` and rows of `A` are
the best rank-`r` approximation under the method's criterion. A rank-`r` plan then only slices:

    W_r = B[:, :r] @ A[:r]        bias_r = bias + bias_shift − B[:, :r] @ bias_coeff[:r]

(`bias_shift`/`bias_coeff` are used by feature-pca's mean compensation, None otherwise). Methods
that share `A` between linears (joint-svd: q‖k, gate‖up) give those linears the same `A` tensor
and list them in `Factorization.joint_groups`; their ranks must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from engine.calibration import CalibrationStatistics
from engine.models.loading import LoadedModel
from engine.parallel import parallel_map


@dataclass(frozen=True)
class Factors:
    """Full-rank factors of one linear (float32): `W ≈ B @ A`."""

    B: torch.Tensor  # [d_out, R]
    A: torch.Tensor  # [R, d_in]
    bias_shift: Optional[torch.Tensor] = None  # [d_out]
    bias_coeff: Optional[torch.Tensor] = None  # [R]

    @property
    def max_rank(self) -> int:
        return self.A.shape[0]

    def weight(self, rank: int) -> torch.Tensor:
        """The rank-`rank` approximation of W (for checks; compression never materialises it)."""
        return self.B[:, :rank] @ self.A[:rank]

    def bias_delta(self, rank: int) -> Optional[torch.Tensor]:
        """What the rank-`rank` approximation adds to the original bias, or None."""
        if self.bias_shift is None:
            return None
        return self.bias_shift - self.B[:, :rank] @ self.bias_coeff[:rank]


@dataclass
class Factorization:
    """Factors of every decoder linear of one model for one method (and calibration, if any)."""

    method: str
    factors: dict[str, Factors]  # module path -> factors
    joint_groups: list[tuple[str, ...]] = field(default_factory=list)  # paths sharing one A

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flatten to safetensors form; a shared `A` is written once (under its group's first path)."""
        tensors, shared = {}, {}
        owner = {path: group[0] for group in self.joint_groups for path in group}
        for path, f in self.factors.items():
            tensors[f"{path}::B"] = f.B
            if owner.get(path, path) == path:
                tensors[f"{path}::A"] = f.A
            else:
                shared[path] = owner[path]
            if f.bias_shift is not None:
                tensors[f"{path}::bias_shift"] = f.bias_shift
                tensors[f"{path}::bias_coeff"] = f.bias_coeff
        import json

        return tensors, {"method": self.method, "joint_groups": json.dumps(self.joint_groups), "shared_A": json.dumps(shared)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "Factorization":
        import json

        shared = json.loads(metadata["shared_A"])
        paths = sorted({name.split("::")[0] for name in tensors})
        factors = {}
        for path in paths:
            a_key = f"{shared.get(path, path)}::A"
            factors[path] = Factors(
                B=tensors[f"{path}::B"],
                A=tensors[a_key],
                bias_shift=tensors.get(f"{path}::bias_shift"),
                bias_coeff=tensors.get(f"{path}::bias_coeff"),
            )
        # tensors loaded separately: make the joint groups really share one A object
        for path, owner in shared.items():
            f = factors[path]
            factors[path] = Factors(f.B, factors[owner].A, f.bias_shift, f.bias_coeff)
        groups = [tuple(g) for g in json.loads(metadata["joint_groups"])]
        return cls(metadata["method"], factors, groups)


class FactorizationMethod(Protocol):
    """A decomposition method. `needs` names the calibration statistic it uses, or None."""

    name: str
    needs: Optional[str]
    description: str

    def factorize(self, loaded: LoadedModel, statistics: Optional[CalibrationStatistics]) -> Factorization: ...


METHODS: dict[str, FactorizationMethod] = {}


def register_method(method: FactorizationMethod) -> FactorizationMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> FactorizationMethod:
    from engine.errors import RankScopeError

    if name not in METHODS:
        raise RankScopeError(f"Unknown method '{name}'. Methods: {', '.join(METHODS)}.")
    return METHODS[name]


def svd_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64: `U [m, R]`, `S [R]`, `Vh [R, n]`, R = min(m, n), descending."""
    return torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)


def per_linear(
    loaded: LoadedModel, method: str, factorize_one: Callable[[object], Factors]
) -> Factorization:
    """Apply `factorize_one(LinearRef)` to every decoder linear (in parallel, see `parallel_map`)."""
    refs = list(loaded.linears())
    return Factorization(method, dict(zip((ref.path for ref in refs), parallel_map(factorize_one, refs))))


def per_site(
    loaded: LoadedModel, method: str, factorize_site: Callable[[list], dict[str, Factors]]
) -> Factorization:
    """Apply `factorize_site([LinearRef, ...]) -> {path: Factors}` to the linears of each input site.

    Linears that read one site (q, k, v; gate, up) come together, so what depends only on the
    site's statistics (a covariance, a Cholesky factor) is computed once for all of them. Sites
    run in parallel (`parallel_map`); factors keep the order of `loaded.linears()`.
    """
    refs = list(loaded.linears())
    by_site: dict[tuple[int, str], list] = {}
    for ref in refs:
        by_site.setdefault((ref.layer, ref.site), []).append(ref)
    factors = {path: f for part in parallel_map(factorize_site, list(by_site.values())) for path, f in part.items()}
    return Factorization(method, {ref.path: factors[ref.path] for ref in refs})


def weight64(ref) -> torch.Tensor:
    return ref.module.weight.detach().to("cpu", torch.float64)  # [d_out, d_in]: factorised on the CPU


def as_factors(B: torch.Tensor, A: torch.Tensor, bias_shift=None, bias_coeff=None) -> Factors:
    """Store factors in float32, contiguous."""
    cast = lambda t: None if t is None else t.to(torch.float32).contiguous()  # noqa: E731
    return Factors(cast(B), cast(A), cast(bias_shift), cast(bias_coeff))
