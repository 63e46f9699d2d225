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


@dataclass(frozen=True)
class ReferenceDistribution:
    """The original model's next-token distribution on evaluation windows, stored as top-k + tail.

    `top_logprobs`/`top_indices`: `[N, L−1, k]` log-probabilities and token ids of the k most likely
    tokens at each predicted position; `tail_logmass`: `[N, L−1]` log of the remaining mass.
    """

    top_logprobs: torch.Tensor  # [N, L-1, k] float32
    top_indices: torch.Tensor  # [N, L-1, k] int64
    tail_logmass: torch.Tensor  # [N, L-1] float32
    perplexity: float

    @property
    def top_k(self) -> int:
        return self.top_logprobs.shape[-1]


@torch.no_grad()
def compute_reference(
    model: torch.nn.Module, windows: torch.Tensor, top_k: int = 1024, progress: Optional[ProgressCallback] = None
) -> ReferenceDistribution:
    """Run the original model once over `windows` and keep its top-k next-token distribution."""
    tracker = ProgressTracker(progress, "reference distribution", total=windows.shape[0], unit="windows")
    tops, indices, tails, nll = [], [], [], 0.0
    for index in range(windows.shape[0]):
        ids = windows[index : index + 1]
        logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)  # [L-1, V]
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        top, idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        tops.append(top)
        indices.append(idx)
        tails.append(_tail_logmass(logp, idx))
        tracker.advance()
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    return ReferenceDistribution(torch.stack(tops), torch.stack(indices), torch.stack(tails), math.exp(nll / n_tokens))


@dataclass(frozen=True)
class QualityResult:
    """Perplexity and KL of a (compressed) model against the original model's distribution."""

    perplexity: float
    mean_nll: float
    kl_forward: float
    kl_reverse: float
    n_tokens: int
    window_nll: list[float]

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "kl_forward": self.kl_forward, "kl_reverse": self.kl_reverse,
                "tokens": self.n_tokens}


@torch.no_grad()
def evaluate_quality(
    model: torch.nn.Module,
    windows: torch.Tensor,
    reference: ReferenceDistribution,
    progress: Optional[ProgressCallback] = None,
    window_indices: Optional[list[int]] = None,
) -> QualityResult:
    """Perplexity, forward KL(P_orig ‖ P_comp) and reverse KL(P_comp ‖ P_orig) per predicted token.

    KL is computed over the original's top-k tokens plus one bucket for the rest of the vocabulary
    (the tail), which is exact for the top-k terms and a lower bound overall; `bench/` measures the
    gap to the exact KL on the default model. Only the evaluated model runs: the original's
    distribution comes from `reference`. `window_indices` restricts evaluation to some windows.
    """
    chosen = list(range(windows.shape[0])) if window_indices is None else list(window_indices)
    tracker = ProgressTracker(progress, "evaluation", total=len(chosen), unit="windows")
    nll_sum = fwd_sum = rev_sum = 0.0
    window_nll = []
    for index in chosen:
        ids = windows[index : index + 1]
        logq = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)  # [L-1, V]
        nll = -logq.gather(1, ids[0, 1:, None]).sum().item()
        forward, reverse = _topk_kl(
            reference.top_logprobs[index], reference.top_indices[index], reference.tail_logmass[index], logq
        )
        nll_sum += nll
        fwd_sum += forward
        rev_sum += reverse
        window_nll.append(nll / (ids.shape[1] - 1))
        tracker.advance()
    n_tokens = len(chosen) * (windows.shape[1] - 1)
    mean_nll = nll_sum / n_tokens
    return QualityResult(math.exp(mean_nll), mean_nll, fwd_sum / n_tokens, rev_sum / n_tokens, n_tokens, window_nll)


def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> tuple[float, float]:
    """Summed exact (forward, reverse) KL between full log-distributions `[T, V]` (P original, Q other)."""
    p, q = logp.exp(), logq.exp()
    return float((p * (logp - logq)).sum()), float((q * (logq - logp)).sum())


def _topk_kl(top_logp, top_idx, tail_logp, logq) -> tuple[float, float]:
    # top_logp, top_idx: [T, k]; tail_logp: [T]; logq: [T, V]
    logq_top = logq.gather(1, top_idx)  # [T, k]
    tail_logq = _tail_logmass(logq, top_idx)  # [T]
    p_top, q_top = top_logp.exp(), logq_top.exp()
    p_tail, q_tail = tail_logp.exp(), tail_logq.exp()
    forward = (p_top * (top_logp - logq_top)).sum() + (p_tail * (tail_logp - tail_logq)).sum()
    reverse = (q_top * (logq_top - top_logp)).sum() + (q_tail * (tail_logq - tail_logp)).sum()
    return float(forward), float(reverse)


def _tail_logmass(logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """log of the mass outside `top_idx` ([T, V], [T, k] -> [T]), floored so an empty tail stays finite.

    Summed over the tail itself, not as 1 − (top mass): in float32 that difference is rounding
    noise (~1e-7) when the tail is nearly empty, and the noise would add spurious KL.
    """
    rest = logp.scatter(1, top_idx, float("-inf"))  # [T, V]
    return torch.logsumexp(rest, dim=-1).clamp_min(math.log(1e-30))
