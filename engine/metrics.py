"""Quality metrics of a causal LM on token windows. Each metric is defined once, here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from engine.progress import ProgressCallback, ProgressTracker


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    n_tokens: int
    window_nll: list[float]  # mean NLL of each window, for sensitive-subset selection


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module, windows: torch.Tensor, progress: Optional[ProgressCallback] = None
) -> PerplexityResult:
    """Perplexity `exp(mean NLL)` over all predicted tokens of `windows` ([N, L] token ids).

    Every position but the first of a window is predicted from the tokens before it in the same
    window, so a window of L tokens contributes L − 1 predictions.
    """
    tracker = ProgressTracker(progress, "evaluation", total=windows.shape[0], unit="windows")
    total_nll, total_tokens, window_nll = 0.0, 0, []
    for index in range(windows.shape[0]):
        ids = windows[index : index + 1]  # [1, L]
        logits = model(input_ids=ids, use_cache=False).logits  # [1, L, V]
        nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
        count = ids.shape[1] - 1
        total_nll += nll
        total_tokens += count
        window_nll.append(nll / count)
        tracker.advance()
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, total_tokens, window_nll)
