"""Streamed float64 calibration statistics per input site, hooked on the original model.

For each decoder layer and input site (see `engine.models.adapters`), over all calibration tokens:

- mean             μ = (1/n) Σ x
- second moment    M = (1/n) Σ x xᵀ                          (uncentred)
- covariance       C = (Σ x xᵀ − n μ μᵀ) / (n − 1)           (sample; derived from μ and M)
- pooled covariance  C_pool = (1/m) Σ_g C_g, where the windows are split into m consecutive groups
                   and C_g is the sample covariance of group g (Bolaco, m = 32)
- channel L2 norm  ‖X_j‖₂ = sqrt(Σ x_j²)                    (LoRAP's activation weights)

Memory is bounded by sites × d², not by tokens: per site we keep Σ (x−s)(x−s)ᵀ split by group size, and
per-group sums of x (m × d). Groups have one of at most two sizes (windows have a fixed length and
groups differ by at most one window), so `Σ_g S_g/(n_g − 1)`, the pooled covariance's main term,
is derived from the per-size sums at the end instead of being accumulated separately.

Speed and precision: several windows run through the decoder at once (`tokens_per_batch`), and each batch's
`(X − s)ᵀ(X − s)` is one float32 product added into the float64 accumulators, with `s` a per-site shift (the
median of the site's first batch); `Σ x xᵀ` is recovered from it in float64. Shifting keeps the centred statistics
precise where channels have large offsets (without it the float32 rounding of `Σ x xᵀ` cancels into the covariance).
`bench/bench_calibration.py` measures both the time against a plain float64 loop (target: at most half) and the
largest relative (Frobenius) difference of each statistic from float64 products (target: 1e-6), and writes them to
`bench/results/calibration.json`; rerun it with `.venv/bin/python bench/bench_calibration.py`.
`product_dtype=torch.float64` gives float64 products where that matters.

Progressive: statistics are sums, so those of the windows seen so far are valid statistics too. `collect_statistics`
can hand out `CalibrationSnapshot`s at a doubling schedule of window counts (`SNAPSHOT_WINDOWS`, each moved to the
next group boundary so the pooled covariance is over whole groups) for previews; they are never stored, and the
final statistics are bit for bit those of a run without them.

Layer by layer (`by_layer`): a model whose statistics over all layers at once would take more than
`WHOLE_MODEL_MEMORY_LIMIT` (a 0.5B-class model: about 5 GB of float64 sums, three times that while they are
finished) is calibrated one decoder layer at a time, as GPTQ-style tools do. The windows' inputs of the current
layer are kept (N × L × hidden floats), each batch runs that layer alone (the model's own forward with the layers
below replaying the kept inputs, so masks and rotary embeddings are computed as always), and the layer's sums are
finished into their stored form before the next layer starts: memory holds one layer's sums, the kept inputs and
the stored form, never every layer's sums. Same batches, same inputs, same sums: the statistics are bit for bit
those of a whole-model run (tests/test_calibration_by_layer.py); no snapshots are taken.

Stored form (`CalibrationStatistics.to_tensors`): only what cannot be derived. Per site that is the
upper triangle of `Σ x xᵀ` (the matrix is symmetric: its lower half is the upper one mirrored, and
`M = Σxxᵀ/n` and `‖X_j‖₂ = sqrt((Σxxᵀ)_jj)` follow from it), the token count, and either the group sums
`Σ_{x∈g} x` (m × d; when every group has the same size, from which the mean and the pooled covariance
follow exactly as `finish` computes them) or, when groups have two sizes (the pooled covariance then
needs the two per-size sums, no cheaper than itself), the upper triangle of the pooled covariance and
the mean. The group sums are stored only while they are smaller than that triangle and the mean.
`from_tensors` derives the rest with the same operations as the collection, each site when it is first
used, so the loaded statistics equal the collected ones bit for bit; a matrix stored as a triangle is
made exactly symmetric (upper triangle mirrored) when collected, which changes nothing where the
products were already symmetric. Statistics stored in the earlier full form (mean, second moment,
pooled covariance, L2 norms) still load as they were written.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.errors import CorpusError, RankScopeError
from engine.models.adapters import CHAINED_LAYER_MODEL_TYPES, SITES, ArchitectureAdapter
from engine.models.device import input_device
from engine.models.replay import replaced_forwards
from engine.progress import ProgressCallback, ProgressTracker


@dataclass(frozen=True)
class SiteStatistics:
    """Statistics of one input site; all tensors float64."""

    mean: torch.Tensor  # [d]
    second_moment: torch.Tensor  # [d, d], E[x xᵀ]
    pooled_covariance: torch.Tensor  # [d, d]
    l2_norm: torch.Tensor  # [d]
    n_tokens: int

    @property
    def covariance(self) -> torch.Tensor:
        """Sample covariance (n − 1 denominator), derived from the mean and second moment."""
        n = self.n_tokens
        return (self.second_moment - torch.outer(self.mean, self.mean)) * (n / (n - 1))


# names of the stored tensors of one site (`{layer}.{site}.{name}`); LEGACY_* is the full form written before
SUM_XXT = "sum_xxT_upper"  # upper triangle of Σ x xᵀ, row by row: d(d+1)/2 values
GROUP_SUMS = "group_sum_x"  # [m, d]: Σ_{x∈g} x, when every group has the same size
POOLED_UPPER = "pooled_covariance_upper"  # upper triangle of the pooled covariance, when groups have two sizes
MEAN = "mean"  # [d], stored with POOLED_UPPER (otherwise derived from the group sums)
N_TOKENS = "n_tokens"  # [1] int64
LEGACY_NAMES = ("mean", "second_moment", "pooled_covariance", "l2_norm", "n_tokens")


@functools.lru_cache(maxsize=8)
def _upper(d: int) -> torch.Tensor:
    """`[d, d]` boolean mask of the upper triangle, diagonal included."""
    return torch.ones(d, d, dtype=torch.bool).triu_()


def pack_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a `[d, d]` matrix, row by row: `d(d+1)/2` values."""
    return matrix.masked_select(_upper(matrix.shape[0]))


def unpack_symmetric(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric `[d, d]` matrix whose upper triangle is `packed` (the lower one is its mirror image)."""
    d = int(round(((8 * packed.numel() + 1) ** 0.5 - 1) / 2))
    if d * (d + 1) // 2 != packed.numel():
        raise ValueError(f"{packed.numel()} values are not the upper triangle of a square matrix")
    upper = _upper(d)
    matrix = torch.empty(d, d, dtype=packed.dtype)
    matrix.masked_scatter_(upper, packed)  # the upper triangle, row by row
    matrix.T.masked_scatter_(upper, packed)  # the same values down the columns: the lower triangle, mirrored
    return matrix


def _mirrored(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` with its lower triangle replaced by the mirror image of its upper one (exactly symmetric)."""
    return torch.where(_upper(matrix.shape[0]), matrix, matrix.T)


def _pooled_covariance(sum_by_size: dict[int, torch.Tensor], group_sum_x: torch.Tensor,
                       group_tokens: list[int]) -> torch.Tensor:
    """`(1/m) Σ_g [S_g/(n_g − 1) − s_g s_gᵀ/(n_g (n_g − 1))]` from the per-size sums of `x xᵀ` and the group sums.

    In place where it can be (these are d² float64 matrices, derived again on every load); each operation
    rounds as its out-of-place form does."""
    m = len(group_tokens)
    sizes = torch.tensor(group_tokens, dtype=torch.float64)
    pooled = None
    for size, total in sum_by_size.items():  # Σ_g S_g / (n_g − 1)
        term = total / (size - 1)
        pooled = term if pooled is None else pooled.add_(term)
    # Σ_g sum_g sum_gᵀ / (n_g (n_g − 1)): the group-mean correction of the pooled covariance
    scaled = group_sum_x / torch.sqrt(sizes * (sizes - 1)).unsqueeze(1)
    return pooled.sub_(scaled.T @ scaled).div_(m)


def _site(sum_xxT: torch.Tensor, n: int, mean: torch.Tensor, pooled: torch.Tensor) -> SiteStatistics:
    """The statistics that follow from `Σ x xᵀ` (exactly symmetric), the token count, the mean and the pooled covariance."""
    return SiteStatistics(mean=mean, second_moment=sum_xxT / n, pooled_covariance=pooled,
                          l2_norm=torch.sqrt(torch.diagonal(sum_xxT).clone()), n_tokens=n)


def _stores_group_sums(one_size: bool, n_groups: int, dim: int) -> bool:
    """Group sums (m × d) instead of the pooled covariance's triangle and the mean, when they derive it and are smaller."""
    return one_size and n_groups * dim < dim * (dim + 1) // 2 + dim


@dataclass(frozen=True)
class CalibrationStatistics:
    """Statistics of every (layer, site) of a model over one calibration text.

    `stored_form` is what `to_tensors` writes (module docstring): collected statistics carry it until they
    are stored (`without_stored_form` drops it, so a long-lived value holds only the statistics)."""

    sites: Mapping[tuple[int, str], SiteStatistics]  # a dict, or sites derived on first use (`from_tensors`)
    n_groups: int
    stored_form: Optional[dict[str, torch.Tensor]] = field(default=None, compare=False, repr=False)

    def site(self, layer: int, site: str) -> SiteStatistics:
        return self.sites[(layer, site)]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to store: the compact form for collected statistics, else the legacy full form."""
        return dict(self.stored_form) if self.stored_form is not None else self.legacy_tensors()

    def legacy_tensors(self) -> dict[str, torch.Tensor]:
        """The full form RankScope wrote before the compact one (every statistic, both triangles); still readable."""
        tensors = {}
        for (layer, site), stats in self.sites.items():
            prefix = f"{layer}.{site}"
            tensors[f"{prefix}.mean"] = stats.mean
            tensors[f"{prefix}.second_moment"] = stats.second_moment
            tensors[f"{prefix}.pooled_covariance"] = stats.pooled_covariance
            tensors[f"{prefix}.l2_norm"] = stats.l2_norm
            tensors[f"{prefix}.n_tokens"] = torch.tensor([stats.n_tokens], dtype=torch.int64)
        return tensors

    def without_stored_form(self) -> "CalibrationStatistics":
        return replace(self, stored_form=None)

    @classmethod
    def from_file(cls, path: str | Path, n_groups: int) -> "CalibrationStatistics":
        """Statistics in the compact stored form in a safetensors file, each site read from the file and derived when
        it is first used (a large model's calibration need never be in memory at once). The file must stay in place
        while the statistics are used."""
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
        if any(name.endswith(".second_moment") for name in names):  # the legacy full form: nothing to derive
            return cls.from_tensors(load_file(str(path)), n_groups)
        by_site: dict[tuple[int, str], list[str]] = {}
        for name in names:
            layer, site, short = name.split(".", 2)
            by_site.setdefault((int(layer), site), []).append(short)
        return cls(_DerivedSites({key: _FileTensors(str(path), f"{key[0]}.{key[1]}.", shorts)
                                  for key, shorts in sorted(by_site.items())}), n_groups)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n_groups: int) -> "CalibrationStatistics":
        """Statistics from either stored form. A site of the compact form is derived, exactly as
        `collect_statistics` derived it, when it is first used (a session whose factors are already stored
        may never need it), and kept."""
        keys = sorted({(int(name.split(".")[0]), name.split(".")[1]) for name in tensors})
        if keys and f"{keys[0][0]}.{keys[0][1]}.second_moment" in tensors:  # the legacy full form
            sites = {(layer, site): SiteStatistics(
                mean=tensors[f"{layer}.{site}.mean"],
                second_moment=tensors[f"{layer}.{site}.second_moment"],
                pooled_covariance=tensors[f"{layer}.{site}.pooled_covariance"],
                l2_norm=tensors[f"{layer}.{site}.l2_norm"],
                n_tokens=int(tensors[f"{layer}.{site}.{N_TOKENS}"][0]),
            ) for layer, site in keys}
            return cls(sites, n_groups)
        return cls(_DerivedSites(_by_site(tensors)), n_groups)


class _FileTensors(Mapping):
    """One site's stored tensors in a safetensors file, each read from the file when it is asked for."""

    def __init__(self, path: str, prefix: str, names: list[str]):
        self._path, self._prefix, self._names = path, prefix, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        with safe_open(self._path, framework="pt") as handle:
            return handle.get_tensor(self._prefix + name)

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _derive_site(stored: Mapping[str, torch.Tensor]) -> SiteStatistics:
    """One site's statistics from its compact stored form (module docstring)."""
    n = int(stored[N_TOKENS][0])
    sum_xxT = unpack_symmetric(stored[SUM_XXT])
    if GROUP_SUMS in stored:  # one group size: mean and pooled covariance derived
        group_sum_x = stored[GROUP_SUMS]
        m = group_sum_x.shape[0]
        group_tokens = [n // m] * m
        mean = group_sum_x.sum(dim=0) / n
        pooled = _pooled_covariance({group_tokens[0]: sum_xxT}, group_sum_x, group_tokens)
    else:
        mean = stored[MEAN]
        pooled = unpack_symmetric(stored[POOLED_UPPER])
    return _site(sum_xxT, n, mean, pooled)


DERIVED_SITES_MEMORY_BYTES = 2 << 30  # derived sites kept at once (the default model's 120 sites: about 1.6 GB)


class _DerivedSites(Mapping):
    """(layer, site) -> `SiteStatistics`, each derived from its stored form on first use and then kept while the
    sites kept take at most `memory_bytes` (the least recently used ones are let go first; the newest is always
    kept), so a large model's factorisation, which goes site by site, holds a few layers' statistics, never all.

    Safe to read from several threads (the factorisation's workers): two that derive one site at once get
    the same numbers, and the first one kept is returned to both."""

    def __init__(self, stored: dict[tuple[int, str], Mapping[str, torch.Tensor]], memory_bytes: Optional[int] = None):
        self._stored = stored
        self._memory_bytes = DERIVED_SITES_MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._derived: OrderedDict[tuple[int, str], SiteStatistics] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, key: tuple[int, str]) -> SiteStatistics:
        with self._lock:
            site = self._derived.get(key)
            if site is not None:
                self._derived.move_to_end(key)
                return site
        site = _derive_site(self._stored[key])  # outside the lock: workers derive different sites at once
        with self._lock:
            site = self._derived.setdefault(key, site)
            self._derived.move_to_end(key)
            while len(self._derived) > 1 and sum(map(_site_bytes, self._derived.values())) > self._memory_bytes:
                self._derived.popitem(last=False)
        return site

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


def _site_bytes(site: SiteStatistics) -> int:
    return sum(t.numel() * t.element_size() for t in (site.mean, site.second_moment, site.pooled_covariance,
                                                        site.l2_norm))


def group_assignment(n_windows: int, n_groups: int) -> list[int]:
    """Group index of each window: `n_groups` runs of consecutive windows, sizes differing by at most one."""
    if not 1 <= n_groups <= n_windows:
        raise CorpusError(
            f"Pooled covariance over {n_groups} groups needs at least {n_groups} calibration windows, "
            f"got {n_windows}. Use between 1 and {n_windows} groups, or more windows."
        )
    return [int(g) for g, part in enumerate(np.array_split(np.arange(n_windows), n_groups)) for _ in part]


_GRAM_BLOCK = 144  # rows of Xᵀ X per product: small enough to skip most of the lower triangle, large for fast GEMMs


def _add_upper_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """`total += x.T @ x` on the upper triangle and the diagonal blocks only (the rest of `total` is never read: the
    sums are mirrored from their upper triangle before use), in row blocks: about 5/8 of a full product at d = 576 and
    under 3/5 at d = 1536. `x`: [tokens, d] in the product dtype; `total`: [d, d] float64 on the CPU."""
    dim = x.shape[1]
    for start in range(0, dim, _GRAM_BLOCK):
        stop = min(start + _GRAM_BLOCK, dim)
        total[start:stop, start:] += (x[:, start:stop].T @ x[:, start:]).to("cpu", torch.float64)


class _SiteAccumulator:
    """Running sums for one site: Σ (x − s)(x − s)ᵀ per group size and Σ x per group, in float64.

    The shift `s` (the per-channel median of the site's first batch, fixed from then on) is subtracted before each
    float32 product: activations have large offsets in some channels, and the product's rounding is relative to the
    size of what it sums, so summing the shifted data keeps the error relative to the covariance, not to `Σ x xᵀ`.
    The median, not the mean: a channel with a few massive activations (thousands, on a token or two) has a mean
    far from its typical value, and shifting by it would put that offset on every other token. `Σ x xᵀ` is
    recovered in float64 (`_sums_of_squares`). Only the upper triangle (and the diagonal blocks) of each sum is
    accumulated (`_add_upper_gram`): every statistic is derived from the mirrored upper triangle."""

    def __init__(self, dim: int, group_tokens: list[int], product_dtype: torch.dtype):
        self.group_tokens, self.product_dtype = group_tokens, product_dtype
        # one sum per group size, in the order the sizes first occur (the order `finish` adds them in)
        self.shifted_sum = {size: torch.zeros(dim, dim, dtype=torch.float64) for size in dict.fromkeys(group_tokens)}
        self.group_sum_x = torch.zeros(len(group_tokens), dim, dtype=torch.float64)
        self.shift: Optional[torch.Tensor] = None  # [d] in product_dtype: the first batch's median
        self.n_tokens = 0

    def add(self, x: torch.Tensor, groups: list[int]) -> None:
        # x: [B, S, d], one row of windows per entry of `groups` (the windows' group indices)
        flat = x.reshape(-1, x.shape[-1]).to(self.product_dtype)  # [B*S, d]
        if self.shift is None:
            self.shift = flat[::8].median(dim=0).values  # [d]; every 8th token is plenty for a median, and 8x cheaper
        shifted = flat - self.shift  # [B*S, d]
        by_size: dict[int, list[int]] = {}
        for row, group in enumerate(groups):
            by_size.setdefault(self.group_tokens[group], []).append(row)
        for size, rows in by_size.items():
            part = shifted if len(rows) == len(groups) else shifted.view(x.shape)[rows].reshape(-1, x.shape[-1])
            _add_upper_gram(self.shifted_sum[size], part)  # on the model's device, into float64 sums on the CPU
        window_sums = x.double().sum(dim=1).cpu()  # [B, d]
        self.group_sum_x.index_add_(0, torch.tensor(groups), window_sums)
        self.n_tokens += flat.shape[0]

    def _sums_of_squares(self, n_groups: int, in_place: bool = False) -> dict[int, torch.Tensor]:
        """`Σ x xᵀ` per group size over the first `n_groups` groups: `Σ (x−s)(x−s)ᵀ + s (Σx)ᵀ + (Σx) sᵀ − n s sᵀ`,
        each size with its own `Σ x` and token count. New tensors, the running sums untouched; or, `in_place`, the
        running sums themselves turned into them (the same operations, so the same numbers, in less memory; the
        accumulator is spent)."""
        shift = self.shift.to("cpu", torch.float64)
        sums = {}
        for size in dict.fromkeys(self.group_tokens[:n_groups]):
            members = [g for g in range(n_groups) if self.group_tokens[g] == size]
            cross = torch.outer(shift, self.group_sum_x[members].sum(dim=0))  # s (Σx)ᵀ
            total = self.shifted_sum[size] if in_place else self.shifted_sum[size].clone()
            sums[size] = total.add_(cross).add_(cross.T).sub_(torch.outer(shift, shift).mul_(size * len(members)))
        return sums

    def statistics(self, n_groups: int) -> SiteStatistics:
        """The site's statistics over its first `n_groups` groups, all of whose windows have been added (a
        snapshot when fewer than all; with all of them, exactly what `finish` returns)."""
        return self._derive(n_groups)[0]

    def finish(self) -> tuple[SiteStatistics, dict[str, torch.Tensor]]:
        """The site's statistics, and its stored form (module docstring) from which they are derived again."""
        site, sum_xxT, one_size, mean, pooled = self._derive(len(self.group_tokens))
        return site, self._stored(sum_xxT, one_size, mean, pooled)

    def stored_form(self) -> dict[str, torch.Tensor]:
        """`finish`'s stored form alone, bit for bit, in less memory: the running sums become `Σ x xᵀ` in place (the
        accumulator is spent), and the statistics are not derived unless the form holds them (groups of two sizes)."""
        _site_unused, sum_xxT, one_size, mean, pooled = self._derive(len(self.group_tokens), spend=True)
        return self._stored(sum_xxT, one_size, mean, pooled)

    def _stored(self, sum_xxT: torch.Tensor, one_size: bool, mean: Optional[torch.Tensor],
                pooled: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        stored = {SUM_XXT: pack_symmetric(sum_xxT), N_TOKENS: torch.tensor([sum(self.group_tokens)], dtype=torch.int64)}
        if _stores_group_sums(one_size, len(self.group_tokens), sum_xxT.shape[0]):
            stored[GROUP_SUMS] = self.group_sum_x  # the pooled covariance is derived again from these, as here
        else:
            stored[POOLED_UPPER], stored[MEAN] = pack_symmetric(pooled), mean
        return stored

    def _derive(self, n_groups: int, spend: bool = False) -> tuple[
            Optional[SiteStatistics], torch.Tensor, bool, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Statistics over the first `n_groups` groups, with `Σ x xᵀ`, whether the groups have one size, the mean
        and the pooled covariance (what the stored form is made of). `spend`: for the stored form only (the running
        sums are used up, and no statistics are returned; nor the mean and pooled covariance, if it does not hold them)."""
        group_tokens = self.group_tokens[:n_groups]
        group_sum_x = self.group_sum_x[:n_groups]
        n = sum(group_tokens)
        by_size = self._sums_of_squares(n_groups, in_place=spend)
        one_size = len(by_size) == 1
        sum_xxT = _mirrored(sum(by_size.values()))
        stores_group_sums = _stores_group_sums(one_size, n_groups, sum_xxT.shape[0])
        if spend:
            self.shifted_sum = {}
            if stores_group_sums:
                return None, sum_xxT, one_size, None, None
        if one_size:
            by_size = {group_tokens[0]: sum_xxT}
        mean = group_sum_x.sum(dim=0) / n
        pooled = _pooled_covariance(by_size, group_sum_x, group_tokens)
        if not stores_group_sums:
            pooled = _mirrored(pooled)  # stored as its upper triangle: read back exactly symmetric
        return (None if spend else _site(sum_xxT, n, mean, pooled)), sum_xxT, one_size, mean, pooled


TOKENS_PER_BATCH = 2048  # windows run through the decoder together: 4 of 512 tokens
SNAPSHOT_WINDOWS: tuple[int, ...] = (8, 16, 32, 64)  # doubling: early snapshots come fast, later ones change less


@dataclass(frozen=True)
class CalibrationSnapshot:
    """Statistics of the first `windows_done` of `windows_total` calibration windows: whole groups only, so the
    pooled covariance is over the `statistics.n_groups` groups finished so far. A preview: never stored, and no
    cached result is keyed by it (only the final statistics are)."""

    statistics: CalibrationStatistics
    windows_done: int
    windows_total: int


SnapshotCallback = Callable[[CalibrationSnapshot], None]


def snapshot_points(groups: list[int], wanted: Sequence[int] = SNAPSHOT_WINDOWS) -> list[int]:
    """Window counts after which `collect_statistics` can hand out a snapshot: for each wanted count, the first group
    boundary at or after it, short of the last window (the final statistics are no snapshot).

    Example: `snapshot_points(group_assignment(128, 32))` is `[8, 16, 32, 64]`."""
    boundaries = [stop for stop in range(1, len(groups)) if groups[stop] != groups[stop - 1]]
    return sorted({next(b for b in boundaries if b >= count) for count in wanted if boundaries and boundaries[-1] >= count})


def _batches(n_windows: int, per_batch: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """`(start, stop)` of each batch: `per_batch` windows, also cut at `cuts`. The cuts are the snapshot points, taken
    or not, so the batches, and so the final statistics, are the same whether or not snapshots are asked for."""
    stops = sorted({*range(per_batch, n_windows, per_batch), *cuts, n_windows})
    return list(zip([0, *stops[:-1]], stops))


WHOLE_MODEL_MEMORY_LIMIT = 4 * 2**30  # bytes of float64 sums (and their finishing) above which calibration goes by layer


def whole_model_memory(model: torch.nn.Module, adapter: ArchitectureAdapter) -> int:
    """Bytes a whole-model calibration holds at its peak, about: every site's float64 `d × d` sums, and while they are
    finished, about three more `d × d` matrices per site (`Σ x xᵀ`, the pooled covariance, the second moment)."""
    dims = [adapter.site_module(model, layer, site).in_features
            for layer in range(adapter.num_layers(model)) for site in SITES]
    return sum(4 * d * d * 8 for d in dims)


def calibrates_by_layer(model: torch.nn.Module, adapter: ArchitectureAdapter, by_layer: Optional[bool] = None) -> bool:
    """Whether `collect_statistics` goes layer by layer: as asked, or (None) when a whole-model run would hold more than
    `WHOLE_MODEL_MEMORY_LIMIT` and the model's forward can replay a layer's inputs. Asking for it on a model whose
    forward cannot is refused, naming the model types that can."""
    model_type = getattr(model.config, "model_type", "")
    if by_layer is None:
        return model_type in CHAINED_LAYER_MODEL_TYPES and whole_model_memory(model, adapter) > WHOLE_MODEL_MEMORY_LIMIT
    if by_layer and model_type not in CHAINED_LAYER_MODEL_TYPES:
        raise RankScopeError(f"Calibrating layer by layer needs a decoder whose forward chains its layers; model type "
                             f"'{model_type}' is not one of {', '.join(CHAINED_LAYER_MODEL_TYPES)}. Calibrate the "
                             "whole model at once.")
    return by_layer


class _LayerOutput(Exception):
    """Stops a forward at the layer above the one being calibrated, carrying that layer's output."""

    def __init__(self, state: torch.Tensor):
        super().__init__()
        self.state = state


@torch.no_grad()
def collect_statistics(
    model: torch.nn.Module,
    adapter: ArchitectureAdapter,
    windows: torch.Tensor,
    n_groups: int = 32,
    progress: Optional[ProgressCallback] = None,
    tokens_per_batch: int = TOKENS_PER_BATCH,
    product_dtype: torch.dtype = torch.float32,
    snapshot: Optional[SnapshotCallback] = None,
    snapshot_windows: Sequence[int] = SNAPSHOT_WINDOWS,
    by_layer: Optional[bool] = None,
) -> CalibrationStatistics:
    """Run `windows` ([N, L] token ids) through `model` once and stream statistics of every site.

    Only the decoder runs (no LM head): the statistics need no logits. Windows go through in
    batches of `tokens_per_batch` tokens (at least one window). `product_dtype` is the precision of
    each batch's `XᵀX` (float32: about twice as fast; float64: exact to rounding); the sums are
    float64 either way.

    `snapshot`, if given, is called with a `CalibrationSnapshot` at the window counts `snapshot_points` picks from
    `snapshot_windows` (statistics are sums, so the windows seen so far give valid statistics). Batches end at those
    counts whether or not snapshots are asked for, and a snapshot leaves the running sums untouched, so the result is
    bit for bit the one without snapshots. The callback must not run the model
    (the hooks are still in place).

    `by_layer` (None: `calibrates_by_layer` decides from the model's size) runs one decoder layer at a time (module
    docstring): same statistics, bounded memory, no snapshots; the result's sites are then derived from their stored
    form when first used.
    """
    n_windows = windows.shape[0]
    groups, group_tokens, points, batches = _windows_plan(windows, n_groups, tokens_per_batch, snapshot_windows)
    if calibrates_by_layer(model, adapter, by_layer):
        stored: dict[str, torch.Tensor] = {}
        _collect_by_layer(model, adapter, windows, groups, group_tokens, batches, product_dtype, progress, stored.update)
        return CalibrationStatistics(_DerivedSites(_by_site(stored)), n_groups, stored)
    accumulators: dict[tuple[int, str], _SiteAccumulator] = {}
    batch_groups: list[int] = []
    handles = [_hook_sites(model, adapter, layer, accumulators, group_tokens, product_dtype, batch_groups)
               for layer in range(adapter.num_layers(model))]
    decoder = model.get_decoder()
    tracker = ProgressTracker(progress, "calibration", total=n_windows, unit="windows")
    try:
        for start, stop in batches:
            batch_groups[:] = groups[start:stop]
            ids = windows[start:stop].to(input_device(model))  # [B, L] of equal length: no padding
            decoder(input_ids=ids, use_cache=False)
            tracker.advance(stop - start)
            if snapshot is not None and stop in points:
                done_groups = groups[stop - 1] + 1
                sites = {key: accumulator.statistics(done_groups) for key, accumulator in accumulators.items()}
                snapshot(CalibrationSnapshot(CalibrationStatistics(sites, done_groups), stop, n_windows))
    finally:
        for layer_handles in handles:
            for handle in layer_handles:
                handle.remove()
    sites, stored = {}, {}
    for (layer, site), accumulator in accumulators.items():
        sites[(layer, site)], site_stored = accumulator.finish()
        stored.update({f"{layer}.{site}.{name}": tensor for name, tensor in site_stored.items()})
    return CalibrationStatistics(sites, n_groups, stored)


def _hook_sites(model: torch.nn.Module, adapter: ArchitectureAdapter, layer: int,
                accumulators: dict[tuple[int, str], _SiteAccumulator], group_tokens: list[int],
                product_dtype: torch.dtype, batch_groups: list[int]) -> list:
    """Pre-hooks adding each input of `layer`'s sites to its accumulator (made on first use); returns their handles.
    `batch_groups` holds the group of each window of the batch being run."""

    def make_hook(key: tuple[int, str]):
        def hook(_module, args):
            x = args[0]  # [B, S, d]
            if key not in accumulators:
                accumulators[key] = _SiteAccumulator(x.shape[-1], group_tokens, product_dtype)
            accumulators[key].add(x, batch_groups)

        return hook

    return [adapter.site_module(model, layer, site).register_forward_pre_hook(make_hook((layer, site)))
            for site in SITES]


@torch.no_grad()
def write_statistics_by_layer(
    model: torch.nn.Module,
    adapter: ArchitectureAdapter,
    windows: torch.Tensor,
    n_groups: int,
    sink: Callable[[dict[str, torch.Tensor]], None],
    progress: Optional[ProgressCallback] = None,
    tokens_per_batch: int = TOKENS_PER_BATCH,
    product_dtype: torch.dtype = torch.float32,
) -> None:
    """`collect_statistics(by_layer=True)` without keeping anything: each finished layer's stored form
    (`{layer}.{site}.{name}` tensors, as `to_tensors` names them) goes to `sink` and is dropped, so memory holds one
    layer's sums whatever the model's size (a file written part by part, `engine.store.arrays.PartWriter`, is the
    sink that makes that so; `CalibrationStatistics.from_file` reads it back)."""
    calibrates_by_layer(model, adapter, True)  # refuses a forward that does not chain its layers
    groups, group_tokens, _points, batches = _windows_plan(windows, n_groups, tokens_per_batch, SNAPSHOT_WINDOWS)
    _collect_by_layer(model, adapter, windows, groups, group_tokens, batches, product_dtype, progress, sink)


def _windows_plan(windows: torch.Tensor, n_groups: int, tokens_per_batch: int, snapshot_windows: Sequence[int]
                  ) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
    """How a calibration goes through `windows` ([N, L]): each window's group, each group's token count, the snapshot
    points and the batches (cut at those points whether or not snapshots are taken, so every way of collecting adds
    the same products)."""
    n_windows, window_len = windows.shape
    groups = group_assignment(n_windows, n_groups)
    group_tokens = [groups.count(g) * window_len for g in range(n_groups)]
    if min(group_tokens) < 2:
        raise CorpusError("Each calibration group needs at least 2 tokens; use longer windows or fewer groups.")
    points = snapshot_points(groups, snapshot_windows)
    return groups, group_tokens, points, _batches(n_windows, max(1, tokens_per_batch // window_len), points)


def _by_site(stored: Mapping[str, torch.Tensor]) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """`{layer}.{site}.{name}` tensors grouped by (layer, site), named by `name`."""
    sites: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in stored.items():
        layer, site, short = name.split(".", 2)
        sites.setdefault((int(layer), site), {})[short] = tensor
    return dict(sorted(sites.items()))


def _collect_by_layer(model: torch.nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor, groups: list[int],
                      group_tokens: list[int], batches: list[tuple[int, int]], product_dtype: torch.dtype,
                      progress: Optional[ProgressCallback], sink: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """The statistics one decoder layer at a time (module docstring), over the same batches as a whole-model run;
    each layer's stored form goes to `sink` when the layer is done."""
    decoder = model.get_decoder()
    layers = model.get_submodule(adapter.layers_path)
    n_windows = windows.shape[0]
    tracker = ProgressTracker(progress, f"calibration by layer ({n_windows} windows)", total=len(layers), unit="layers")
    inputs: list[torch.Tensor] = []  # per batch: the input of the current layer, [B, L, hidden]
    replayed: dict[str, torch.Tensor] = {}

    def replay(*_args, **_kwargs) -> torch.Tensor:  # a layer below the current one: its output is the kept input
        return replayed["input"]

    def stop(_module, args, kwargs):
        raise _LayerOutput(args[0] if args else kwargs["hidden_states"])

    for layer in range(len(layers)):
        accumulators: dict[tuple[int, str], _SiteAccumulator] = {}
        batch_groups: list[int] = []
        handles = _hook_sites(model, adapter, layer, accumulators, group_tokens, product_dtype, batch_groups)
        if layer + 1 < len(layers):
            handles.append(layers[layer + 1].register_forward_pre_hook(stop, with_kwargs=True))
        outputs: list[torch.Tensor] = []
        try:
            with replaced_forwards(list(layers)[:layer], replay):
                for index, (start, stop_window) in enumerate(batches):
                    batch_groups[:] = groups[start:stop_window]
                    if layer:
                        replayed["input"] = inputs[index]
                    try:
                        decoder(input_ids=windows[start:stop_window].to(input_device(model)), use_cache=False)
                    except _LayerOutput as output:
                        outputs.append(output.state)
        finally:
            for handle in handles:
                handle.remove()
            replayed.clear()
        inputs = outputs  # the next layer's inputs (empty after the last layer)
        layer_stored = {}
        for (site_layer, site), accumulator in accumulators.items():
            layer_stored.update({f"{site_layer}.{site}.{name}": t for name, t in accumulator.stored_form().items()})
        del accumulators
        sink(layer_stored)
        tracker.advance()
