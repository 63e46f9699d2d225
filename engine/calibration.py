"""Streamed float64 calibration statistics per input site, hooked on the original model.

For each decoder layer and input site (see `engine.models.adapters`), over all calibration tokens:

- mean             μ = (1/n) Σ x
- second moment    M = (1/n) Σ x xᵀ                          (uncentred)
- covariance       C = (Σ x xᵀ − n μ μᵀ) / (n − 1)           (sample; derived from μ and M)
- pooled covariance  C_pool = (1/m) Σ_g C_g, where the windows are split into m consecutive groups
                   and C_g is the sample covariance of group g (Bolaco, m = 32)
- channel L2 norm  ‖X_j‖₂ = sqrt(Σ x_j²)                    (LoRAP's activation weights)

Memory is bounded by sites × d², not by tokens: per site we keep Σ xxᵀ split by group size, and
per-group sums of x (m × d). Groups have one of at most two sizes (windows have a fixed length and
groups differ by at most one window), so `Σ_g S_g/(n_g − 1)`, the pooled covariance's main term,
is derived from the per-size sums at the end instead of being accumulated separately.

Speed: several windows run through the decoder at once (`tokens_per_batch`), and each batch's
`XᵀX` is one float32 product added into the float64 accumulators. On the default model that keeps
the statistics within about 2e-7 (second moment) and 1.4e-6 (centred covariances; relative,
Frobenius) of float64 products: `bench/bench_calibration.py` measures it against a plain float64
loop, and `product_dtype=torch.float64` gives float64 products where that matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from engine.errors import CorpusError
from engine.models.adapters import SITES, ArchitectureAdapter
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


@dataclass(frozen=True)
class CalibrationStatistics:
    """Statistics of every (layer, site) of a model over one calibration text."""

    sites: dict[tuple[int, str], SiteStatistics]
    n_groups: int

    def site(self, layer: int, site: str) -> SiteStatistics:
        return self.sites[(layer, site)]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for (layer, site), stats in self.sites.items():
            prefix = f"{layer}.{site}"
            tensors[f"{prefix}.mean"] = stats.mean
            tensors[f"{prefix}.second_moment"] = stats.second_moment
            tensors[f"{prefix}.pooled_covariance"] = stats.pooled_covariance
            tensors[f"{prefix}.l2_norm"] = stats.l2_norm
            tensors[f"{prefix}.n_tokens"] = torch.tensor([stats.n_tokens], dtype=torch.int64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n_groups: int) -> "CalibrationStatistics":
        keys = {tuple(name.split(".")[:2]) for name in tensors}
        sites = {}
        for layer, site in keys:
            prefix = f"{layer}.{site}"
            sites[(int(layer), site)] = SiteStatistics(
                mean=tensors[f"{prefix}.mean"],
                second_moment=tensors[f"{prefix}.second_moment"],
                pooled_covariance=tensors[f"{prefix}.pooled_covariance"],
                l2_norm=tensors[f"{prefix}.l2_norm"],
                n_tokens=int(tensors[f"{prefix}.n_tokens"][0]),
            )
        return cls(sites, n_groups)


def group_assignment(n_windows: int, n_groups: int) -> list[int]:
    """Group index of each window: `n_groups` runs of consecutive windows, sizes differing by at most one."""
    if not 1 <= n_groups <= n_windows:
        raise CorpusError(
            f"Pooled covariance over {n_groups} groups needs at least {n_groups} calibration windows, "
            f"got {n_windows}. Use between 1 and {n_windows} groups, or more windows."
        )
    return [int(g) for g, part in enumerate(np.array_split(np.arange(n_windows), n_groups)) for _ in part]


class _SiteAccumulator:
    """Running sums for one site: Σ xxᵀ per group size and Σ x per group in float64."""

    def __init__(self, dim: int, group_tokens: list[int], product_dtype: torch.dtype):
        self.group_tokens, self.product_dtype = group_tokens, product_dtype
        self.sum_xxT = {size: torch.zeros(dim, dim, dtype=torch.float64) for size in set(group_tokens)}
        self.group_sum_x = torch.zeros(len(group_tokens), dim, dtype=torch.float64)
        self.n_tokens = 0

    def add(self, x: torch.Tensor, groups: list[int]) -> None:
        # x: [B, S, d], one row of windows per entry of `groups` (the windows' group indices)
        flat = x.reshape(-1, x.shape[-1]).to(self.product_dtype)  # [B*S, d]
        by_size: dict[int, list[int]] = {}
        for row, group in enumerate(groups):
            by_size.setdefault(self.group_tokens[group], []).append(row)
        for size, rows in by_size.items():
            part = flat if len(rows) == len(groups) else x[rows].reshape(-1, x.shape[-1]).to(self.product_dtype)
            self.sum_xxT[size] += (part.T @ part).double()  # one product per batch, into float64 [d, d]
        window_sums = x.double().sum(dim=1)  # [B, d]
        self.group_sum_x.index_add_(0, torch.tensor(groups), window_sums)
        self.n_tokens += flat.shape[0]

    def finish(self) -> SiteStatistics:
        n, m = self.n_tokens, len(self.group_tokens)
        sizes = torch.tensor(self.group_tokens, dtype=torch.float64)
        sum_xxT = sum(self.sum_xxT.values())
        pooled_sum = sum(total / (size - 1) for size, total in self.sum_xxT.items())  # Σ_g S_g / (n_g − 1)
        # Σ_g sum_g sum_gᵀ / (n_g (n_g − 1)): the group-mean correction of the pooled covariance
        scaled = self.group_sum_x / torch.sqrt(sizes * (sizes - 1)).unsqueeze(1)
        pooled = (pooled_sum - scaled.T @ scaled) / m
        return SiteStatistics(
            mean=self.group_sum_x.sum(dim=0) / n,
            second_moment=sum_xxT / n,
            pooled_covariance=pooled,
            l2_norm=torch.sqrt(torch.diagonal(sum_xxT).clone()),
            n_tokens=n,
        )


TOKENS_PER_BATCH = 2048  # windows run through the decoder together: 4 of 512 tokens


@torch.no_grad()
def collect_statistics(
    model: torch.nn.Module,
    adapter: ArchitectureAdapter,
    windows: torch.Tensor,
    n_groups: int = 32,
    progress: Optional[ProgressCallback] = None,
    tokens_per_batch: int = TOKENS_PER_BATCH,
    product_dtype: torch.dtype = torch.float32,
) -> CalibrationStatistics:
    """Run `windows` ([N, L] token ids) through `model` once and stream statistics of every site.

    Only the decoder runs (no LM head): the statistics need no logits. Windows go through in
    batches of `tokens_per_batch` tokens (at least one window). `product_dtype` is the precision of
    each batch's `XᵀX` (float32: about twice as fast; float64: exact to rounding); the sums are
    float64 either way.
    """
    n_windows, window_len = windows.shape
    groups = group_assignment(n_windows, n_groups)
    group_tokens = [groups.count(g) * window_len for g in range(n_groups)]
    if min(group_tokens) < 2:
        raise CorpusError("Each calibration group needs at least 2 tokens; use longer windows or fewer groups.")
    accumulators: dict[tuple[int, str], _SiteAccumulator] = {}
    batch_groups: list[int] = []
    handles = []

    def make_hook(key: tuple[int, str]):
        def hook(_module, args):
            x = args[0]  # [B, S, d]
            if key not in accumulators:
                accumulators[key] = _SiteAccumulator(x.shape[-1], group_tokens, product_dtype)
            accumulators[key].add(x, batch_groups)

        return hook

    for layer in range(adapter.num_layers(model)):
        for site in SITES:
            module = adapter.site_module(model, layer, site)
            handles.append(module.register_forward_pre_hook(make_hook((layer, site))))
    decoder = model.get_decoder()
    per_batch = max(1, tokens_per_batch // window_len)
    tracker = ProgressTracker(progress, "calibration", total=n_windows, unit="windows")
    try:
        for start in range(0, n_windows, per_batch):
            stop = min(start + per_batch, n_windows)
            batch_groups[:] = groups[start:stop]
            decoder(input_ids=windows[start:stop], use_cache=False)  # [B, L] of equal length: no padding
            tracker.advance(stop - start)
    finally:
        for handle in handles:
            handle.remove()
    return CalibrationStatistics({key: acc.finish() for key, acc in accumulators.items()}, n_groups)
