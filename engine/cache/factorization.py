"""A method's factorisation of every decoder linear, cached on disk and in the store.

A rank plan only slices these factors, so trying a plan costs almost nothing beyond evaluation.

Only the columns a plan can use are kept: a unit (one linear, or a joint pair sharing `A`) with input
`d_in` and total output `d_out` costs `r·(d_in + d_out)` parameters at rank `r`, more than its
`d_in·d_out` dense ones above the break-even rank `⌊d_in·d_out / (d_in + d_out)⌋`, and plans refuse
such ranks (`engine.compression.plan`), so the factors are stored and kept up to that rank
(`break_even_rank`) and no further: the first `r` columns are the same numbers either way, so every
rank a plan can use gives the same compressed model (`CutFactors.bias_delta` keeps feature-pca's bias
product rounding as it did on the full factors). What the global allocation needs of the
dropped components (the energy `‖B_i‖²·‖A_i‖²` of every component, which shares of a matrix's energy
are taken of) is kept as one float64 vector per linear (`component_energies`); the kept components'
energies too, since computed again from the cut factors they can differ in the last bit. A factorisation
stored at full rank by an earlier RankScope is read, cut the same way when loaded, and stored again
in the cut form (the same numbers, so nothing is recomputed and later loads read the smaller file).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from engine.cache.artifacts import Computed, get_or_compute
from engine.cache.calibration import Calibration
from engine.cache.keys import factorization_key
from engine.methods import Factorization, Factors, get_method
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback, ProgressTracker
from engine.records import FactorizationRecord
from engine.store.arrays import save_arrays
from engine.store.duckdb_store import Store

ENERGIES = "energies"  # `{path}::energies`: float64 [full rank], the energy of every component


def break_even_rank(d_in: int, d_out: int) -> int:
    """The largest rank whose factors `r·(d_in + d_out)` are not larger than the dense `d_in·d_out` matrix.

    The same bound as `engine.compression.units.RankUnit.break_even_rank` (tests check they agree)."""
    return d_in * d_out // (d_in + d_out)


@dataclass(frozen=True)
class CutFactors(Factors):
    """Factors kept up to a rank below their full rank `full_rank` (what the cache stores)."""

    full_rank: int = 0

    def bias_delta(self, rank: int) -> Optional[torch.Tensor]:
        """As `Factors.bias_delta`, with the product taken through a view of the full factors' row stride: a
        matrix-vector product rounds differently for another stride, and this keeps the full factors' numbers."""
        if self.bias_shift is None:
            return None
        strided = torch.empty(self.B.shape[0], self.full_rank, dtype=self.B.dtype)[:, :rank]
        strided.copy_(self.B[:, :rank])
        return self.bias_shift - strided @ self.bias_coeff[:rank]


@dataclass
class StoredFactorization(Factorization):
    """A factorisation as the cache keeps it: each unit's factors up to its break-even rank, and the
    energy of every component, kept ones and dropped ones (path -> float64 [full rank])."""

    energies: dict[str, torch.Tensor] = field(default_factory=dict)


def _energies(f: Factors) -> torch.Tensor:
    """`‖B_i‖²·‖A_i‖²` of each component, in float64 (σ_i² for an SVD)."""
    return (f.B.double() ** 2).sum(0) * (f.A.double() ** 2).sum(1)


def component_energies(factorization: Factorization) -> dict[str, np.ndarray]:
    """Module path -> the energy of each of its factor components (`‖B_i‖²·‖A_i‖²`), over the full rank.

    For a stored (cut) factorisation these are the energies kept when it was cut, the same numbers as those of
    the full factors; for any other factorisation they are computed from its factors."""
    stored = getattr(factorization, "energies", None) or {}
    return {path: (stored[path] if path in stored else _energies(f)).numpy()
            for path, f in factorization.factors.items()}


def stored_ranks(factorization: Factorization) -> dict[str, int]:
    """Module path -> the rank its factors are kept to: its unit's break-even rank, at most its full rank."""
    units = [tuple(group) for group in factorization.joint_groups]
    grouped = {path for group in units for path in group}
    units += [(path,) for path in factorization.factors if path not in grouped]
    ranks = {}
    for unit in units:
        first = factorization.factors[unit[0]]
        d_in, d_out = first.A.shape[1], sum(factorization.factors[p].B.shape[0] for p in unit)
        rank = min(first.max_rank, break_even_rank(d_in, d_out))
        ranks.update({path: rank for path in unit})
    return ranks


def cut_factorization(factorization: Factorization) -> StoredFactorization:
    """`factorization` with each unit's factors cut to its break-even rank (contiguous copies; a joint pair's
    `A` stays one shared tensor), and the energy of every component of the full factors kept."""
    if isinstance(factorization, StoredFactorization):
        return factorization
    ranks = stored_ranks(factorization)
    energies = {path: _energies(f) for path, f in factorization.factors.items()}
    cut_A: dict[int, torch.Tensor] = {}  # id of a full A -> its cut copy, so joint pairs keep sharing one
    factors = {}
    for path, f in factorization.factors.items():
        r = ranks[path]
        if id(f.A) not in cut_A:
            cut_A[id(f.A)] = f.A[:r].contiguous()
        A = cut_A[id(f.A)]
        factors[path] = CutFactors(
            B=f.B[:, :r].contiguous(), A=A, bias_shift=f.bias_shift,
            bias_coeff=None if f.bias_coeff is None else f.bias_coeff[:r].contiguous(), full_rank=f.max_rank,
        )
    return StoredFactorization(factorization.method, factors, list(factorization.joint_groups), energies)


def stored_tensors(factorization: StoredFactorization) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The safetensors form of a cut factorisation: the factors (`Factorization.to_tensors`) and the energies."""
    tensors, metadata = factorization.to_tensors()
    tensors.update({f"{path}::{ENERGIES}": e for path, e in factorization.energies.items()})
    return tensors, {**metadata, "stored_rank": "break-even"}


def load_stored(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> StoredFactorization:
    """A cut factorisation from its stored form, or from the full-rank form earlier versions stored (cut here)."""
    suffix = f"::{ENERGIES}"
    energies = {name[: -len(suffix)]: t for name, t in tensors.items() if name.endswith(suffix)}
    factors = Factorization.from_tensors({k: v for k, v in tensors.items() if not k.endswith(suffix)}, metadata)
    if not energies:  # stored at full rank (RankScope 0.3.0 and earlier)
        return cut_factorization(factors)
    cut = {path: CutFactors(f.B, f.A, f.bias_shift, f.bias_coeff, full_rank=energies[path].numel())
           for path, f in factors.factors.items()}  # the same tensors: joint pairs still share one A
    return StoredFactorization(factors.method, cut, factors.joint_groups, energies)


def ensure_factorization(
    store: Store,
    loaded: LoadedModel,
    method: str,
    calibration: Optional[Calibration],
    progress: Optional[ProgressCallback] = None,
) -> tuple[FactorizationRecord, StoredFactorization]:
    """The factorisation for `method` (with `calibration` where the method uses data), cut at each unit's
    break-even rank: computed, stored and returned in the same form as it is later read back."""
    spec = get_method(method)
    calibration_id = calibration.record.calibration_id if spec.needs else ""
    key = factorization_key(loaded.fingerprint, method, calibration_id, loaded.dtype)

    def compute() -> Computed:
        tracker = ProgressTracker(progress, f"factorising ({method})", total=1, unit="models")
        start = time.perf_counter()
        factorization = cut_factorization(spec.factorize(loaded, calibration.statistics if spec.needs else None))
        seconds = time.perf_counter() - start
        tracker.advance()
        tensors, metadata = stored_tensors(factorization)
        record = FactorizationRecord(key, loaded.fingerprint, method, calibration_id, key, seconds)
        return Computed(factorization, record, tensors, metadata)

    earlier: list[bool] = []

    def load(_record, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> StoredFactorization:
        earlier.append(not any(name.endswith(f"::{ENERGIES}") for name in tensors))
        return load_stored(tensors, metadata)

    cached = get_or_compute(store, "factorization", key, compute, load, record_type=FactorizationRecord)
    if earlier and earlier[0]:  # read from the full-rank form: stored again as it is now, the same numbers
        tensors, metadata = stored_tensors(cached.value)
        save_arrays(store, cached.record.array_id, "factorization", tensors, metadata)
    return cached.record, cached.value
