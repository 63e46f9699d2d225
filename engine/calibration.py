"""Streamed float64 calibration statistics per input site, hooked on the original model.

For each decoder layer and input site (see `engine.models.adapters`), over all calibration tokens:

- mean             μ = (1/n) Σ x
- second moment    M = (1/n) Σ x xᵀ                          (uncentred)
- covariance       C = (Σ x xᵀ − n μ μᵀ) / (n − 1)           (sample; derived from μ and M)
- pooled covariance  C_pool = (1/m) Σ_g C_g, where the windows are split into m consecutive groups
                   and C_g is the sample covariance of group g (Bolaco, m = 32)
- channel L2 norm  ‖X_j‖₂ = sqrt(Σ x_j²)                    (LoRAP's activation weights)

Memory is bounded by sites × d², not by tokens: per site we keep Σ xxᵀ, the group-weighted
Σ_g S_g/(n_g − 1), and per-group sums of x (m × d). Group sizes are known in advance (windows have a
fixed length), which is what lets the pooled covariance stream without a per-group d² buffer.
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
    """Running float64 sums for one site."""

    def __init__(self, dim: int, n_groups: int):
        self.sum_x = torch.zeros(dim, dtype=torch.float64)
        self.sum_xxT = torch.zeros(dim, dim, dtype=torch.float64)
        self.pooled_sum = torch.zeros(dim, dim, dtype=torch.float64)  # Σ_g S_g / (n_g − 1)
        self.group_sum_x = torch.zeros(n_groups, dim, dtype=torch.float64)
        self.n_tokens = 0

    def add(self, x: torch.Tensor, group: int, group_tokens: int) -> None:
        # x: [T, d] float64
        xxT = x.T @ x
        self.sum_xxT += xxT
        self.pooled_sum.add_(xxT, alpha=1.0 / (group_tokens - 1))
        row_sum = x.sum(dim=0)
        self.sum_x += row_sum
        self.group_sum_x[group] += row_sum
        self.n_tokens += x.shape[0]

    def finish(self, group_tokens: list[int]) -> SiteStatistics:
        n, m = self.n_tokens, len(group_tokens)
        sizes = torch.tensor(group_tokens, dtype=torch.float64)
        # Σ_g sum_g sum_gᵀ / (n_g (n_g − 1)): the group-mean correction of the pooled covariance
        scaled = self.group_sum_x / torch.sqrt(sizes * (sizes - 1)).unsqueeze(1)
        pooled = (self.pooled_sum - scaled.T @ scaled) / m
        return SiteStatistics(
            mean=self.sum_x / n,
            second_moment=self.sum_xxT / n,
            pooled_covariance=pooled,
            l2_norm=torch.sqrt(torch.diagonal(self.sum_xxT).clone()),
            n_tokens=n,
        )


@torch.no_grad()
def collect_statistics(
    model: torch.nn.Module,
    adapter: ArchitectureAdapter,
    windows: torch.Tensor,
    n_groups: int = 32,
    progress: Optional[ProgressCallback] = None,
) -> CalibrationStatistics:
    """Run `windows` ([N, L] token ids) through `model` once and stream statistics of every site.

    Only the decoder runs (no LM head): the statistics need no logits.
    """
    n_windows, window_len = windows.shape
    groups = group_assignment(n_windows, n_groups)
    group_tokens = [groups.count(g) * window_len for g in range(n_groups)]
    if min(group_tokens) < 2:
        raise CorpusError("Each calibration group needs at least 2 tokens; use longer windows or fewer groups.")
    accumulators: dict[tuple[int, str], _SiteAccumulator] = {}
    current = {"group": 0}
    handles = []

    def make_hook(key: tuple[int, str]):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)  # [B*S, d]
            if key not in accumulators:
                accumulators[key] = _SiteAccumulator(x.shape[1], n_groups)
            group = current["group"]
            accumulators[key].add(x, group, group_tokens[group])

        return hook

    for layer in range(adapter.num_layers(model)):
        for site in SITES:
            module = adapter.site_module(model, layer, site)
            handles.append(module.register_forward_pre_hook(make_hook((layer, site))))
    decoder = model.get_decoder()
    tracker = ProgressTracker(progress, "calibration", total=n_windows, unit="windows")
    try:
        for index in range(n_windows):
            current["group"] = groups[index]
            decoder(input_ids=windows[index : index + 1], use_cache=False)
            tracker.advance()
    finally:
        for handle in handles:
            handle.remove()
    return CalibrationStatistics({key: acc.finish(group_tokens) for key, acc in accumulators.items()}, n_groups)
