"""Quality metrics of a causal LM on token windows: perplexity, forward and reverse KL.

One loop runs a model over windows: `next_token_logprobs` yields, per window, the float32
log-softmax of the model's next-token distribution at every predicted position, and reports
progress. Each metric is one function on those log-probabilities (`token_nll` and `perplexity`,
`topk_kl`, `exact_kl`); `evaluate_perplexity`, `compute_reference` and `evaluate_quality` only
combine them. The metrics' keys, UI labels and definition texts live in `engine.metric_definitions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from engine.progress import ProgressCallback, ProgressTracker


# -- the one forward pass -----------------------------------------------------------------------------

@dataclass(frozen=True)
class WindowLogProbs:
    """A model's next-token log-probabilities on one window of L tokens.

    Row t of `logp` is the distribution predicted from tokens 0..t, for the token `targets[t]`
    (= window token t + 1), so a window contributes L − 1 predictions.
    """

    index: int  # the window's row in `windows`
    targets: torch.Tensor  # [L-1] int64: the predicted tokens
    logp: torch.Tensor  # [L-1, V] float32: log-softmax of the model's logits


def next_token_logprobs(
    model: torch.nn.Module,
    windows: torch.Tensor,
    window_indices: Optional[Sequence[int]] = None,
    progress: Optional[ProgressCallback] = None,
    stage: str = "evaluation",
) -> Iterator[WindowLogProbs]:
    """Run `model` over each window of `windows` ([N, L] token ids), one window at a time, in order.

    Yields one `WindowLogProbs` per window of `window_indices` (default: all N), in the order given.
    Progress is reported to `progress` as stage `stage`, counted in windows: a window counts as done
    once the consumer has finished with it (asked for the next one).
    """
    chosen = range(windows.shape[0]) if window_indices is None else list(window_indices)
    tracker = ProgressTracker(progress, stage, total=len(chosen), unit="windows")
    for index in chosen:
        ids = windows[index : index + 1]  # [1, L]
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits  # [1, L, V]
            logp = F.log_softmax(logits[0, :-1].float(), dim=-1)  # [L-1, V]
        yield WindowLogProbs(index, ids[0, 1:], logp)
        tracker.advance()


# -- the metrics ----------------------------------------------------------------------------------------

def token_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target: `−log P(targets[t] | context t)`.

    `logp`: [T, V] log-probabilities, `targets`: [T] token ids -> [T]. Summed over every predicted
    token of the evaluation windows and divided by their count, it is the mean NLL of `perplexity`.
    """
    return -logp.gather(1, targets[:, None]).squeeze(1)  # [T]


def perplexity(mean_nll: float) -> float:
    """Perplexity: `exp(mean next-token NLL)` over all predicted tokens of the evaluation windows."""
    return math.exp(mean_nll)


def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> tuple[float, float]:
    """Exact (forward, reverse) KL between full log-distributions, summed over positions.

    `logp`: [T, V] of the original model P, `logq`: [T, V] of the other model Q. Forward is
    `Σ_t Σ_v P·(log P − log Q)` = Σ_t KL(P_orig ‖ P_comp); reverse is Σ_t KL(P_comp ‖ P_orig).
    """
    p, q = logp.exp(), logq.exp()  # [T, V]
    return float((p * (logp - logq)).sum()), float((q * (logq - logp)).sum())


def topk_kl(
    top_logp: torch.Tensor, top_idx: torch.Tensor, tail_logp: torch.Tensor, logq: torch.Tensor
) -> tuple[float, float]:
    """(forward, reverse) KL over the original's top-k tokens plus one tail bucket, summed over positions.

    P (the original) is given as `top_logp`/`top_idx` ([T, k]) and `tail_logp` ([T], log of the mass
    outside the top k); Q as full log-probabilities `logq` ([T, V]). Both distributions are reduced
    to k + 1 outcomes (the top-k tokens and "any other token"), and forward = Σ_t KL(P ‖ Q),
    reverse = Σ_t KL(Q ‖ P) over those outcomes. Exact for the top-k terms; by coarse-graining,
    a lower bound of the exact KL that reaches it when k = V.
    """
    logq_top = logq.gather(1, top_idx)  # [T, k]
    tail_logq = _tail_logmass(logq, top_idx)  # [T]
    p_top, q_top = top_logp.exp(), logq_top.exp()  # [T, k]
    p_tail, q_tail = tail_logp.exp(), tail_logq.exp()  # [T]
    forward = (p_top * (top_logp - logq_top)).sum() + (p_tail * (tail_logp - tail_logq)).sum()
    reverse = (q_top * (logq_top - top_logp)).sum() + (q_tail * (tail_logq - tail_logp)).sum()
    return float(forward), float(reverse)


def _tail_logmass(logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """log of the mass outside `top_idx` ([T, V], [T, k] -> [T]), floored so an empty tail stays finite.

    Summed over the tail itself, not as 1 − (top mass): in float32 that difference is rounding
    noise (~1e-7) when the tail is nearly empty, and the noise would add spurious KL.
    """
    rest = logp.scatter(1, top_idx, float("-inf"))  # [T, V]
    return torch.logsumexp(rest, dim=-1).clamp_min(math.log(1e-30))  # [T]


class _NllTally:
    """Summed NLL and token count over windows, with each window's mean NLL."""

    def __init__(self) -> None:
        self.total, self.n_tokens, self.window_nll = 0.0, 0, []

    def add(self, nll: torch.Tensor) -> None:
        """Count one window's per-token NLL ([L-1])."""
        window_sum, count = nll.sum().item(), nll.shape[0]
        self.total += window_sum
        self.n_tokens += count
        self.window_nll.append(window_sum / count)

    @property
    def mean_nll(self) -> float:
        return self.total / self.n_tokens


# -- evaluations -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    n_tokens: int
    window_nll: list[float]  # mean NLL of each window, for sensitive-subset selection


def evaluate_perplexity(
    model: torch.nn.Module, windows: torch.Tensor, progress: Optional[ProgressCallback] = None
) -> PerplexityResult:
    """Perplexity `exp(mean NLL)` over all predicted tokens of `windows` ([N, L] token ids).

    Every position but the first of a window is predicted from the tokens before it in the same
    window, so a window of L tokens contributes L − 1 predictions.
    """
    tally = _NllTally()
    for window in next_token_logprobs(model, windows, progress=progress, stage="evaluation"):
        tally.add(token_nll(window.logp, window.targets))  # [L-1]
    return PerplexityResult(perplexity(tally.mean_nll), tally.mean_nll, tally.n_tokens, tally.window_nll)


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
    tops, indices, tails = [], [], []
    tally = _NllTally()
    for window in next_token_logprobs(model, windows, progress=progress, stage="reference distribution"):
        logp = window.logp  # [L-1, V]
        tally.add(token_nll(logp, window.targets))  # [L-1]
        top, idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # [L-1, k] each
        tops.append(top)
        indices.append(idx)
        tails.append(_tail_logmass(logp, idx))  # [L-1]
    return ReferenceDistribution(
        torch.stack(tops), torch.stack(indices), torch.stack(tails), perplexity(tally.mean_nll)
    )  # [N, L-1, k], [N, L-1, k], [N, L-1]


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

    KL is `topk_kl`: over the original's top-k tokens plus one bucket for the rest of the vocabulary
    (the tail), which is exact for the top-k terms and a lower bound overall; `bench/` measures the
    gap to the exact KL on the default model. Only the evaluated model runs: the original's
    distribution comes from `reference`. `window_indices` restricts evaluation to some windows.
    """
    tally = _NllTally()
    fwd_sum = rev_sum = 0.0
    for window in next_token_logprobs(model, windows, window_indices, progress, stage="evaluation"):
        i, logq = window.index, window.logp  # logq: [L-1, V]
        tally.add(token_nll(logq, window.targets))  # [L-1]
        forward, reverse = topk_kl(
            reference.top_logprobs[i], reference.top_indices[i], reference.tail_logmass[i], logq
        )  # [L-1, k], [L-1, k], [L-1] against [L-1, V]
        fwd_sum += forward
        rev_sum += reverse
    n_tokens = tally.n_tokens
    return QualityResult(perplexity(tally.mean_nll), tally.mean_nll, fwd_sum / n_tokens, rev_sum / n_tokens,
                         n_tokens, tally.window_nll)
