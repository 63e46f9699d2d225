"""Quality metrics of a causal LM on token windows: perplexity, forward and reverse KL.

One loop runs a model over windows: `next_token_logprobs` yields, per window, the float32
log-softmax of the model's next-token distribution at every predicted position, and reports
progress. Each metric is one function on those log-probabilities (`token_nll` and `perplexity`,
`exact_kl`); `evaluate_perplexity`, `compute_reference` and `evaluate_quality` only combine them.
The metrics' keys, UI labels and definition texts live in `engine.metric_definitions`.

KL is exact in both directions and costs a trial almost nothing beyond its own forward pass. The
embedding and the LM head are never compressed, so the original model's full next-token
distribution is its LM head applied to its final hidden states: `compute_reference` keeps those
hidden states (`[N, L−1, D]`, smaller than any top-k of a 49k vocabulary), and
`ReferenceDistribution.logprobs` turns them back into log-probabilities, keeping as many windows
in memory as its budget allows, so the trials of a search reuse them.

`evaluate_quality` takes each window's logits straight into `window_quality`, which computes the
log-softmax, the NLL and both KLs a few positions at a time, so each chunk is read while it is in
cache, and P comes kept with the reference's log-probabilities instead of being exponentiated again
for every window of every trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from engine.models.device import input_device, model_device
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
    for index, targets, logits in next_token_logits(model, windows, window_indices, progress, stage):
        with torch.no_grad():
            logp = F.log_softmax(logits, dim=-1)  # [L-1, V]
        yield WindowLogProbs(index, targets, logp)


def next_token_logits(
    model: torch.nn.Module,
    windows: torch.Tensor,
    window_indices: Optional[Sequence[int]] = None,
    progress: Optional[ProgressCallback] = None,
    stage: str = "evaluation",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """`next_token_logprobs` before the log-softmax: per window `(index, targets [L-1], logits [L-1, V] float32)`."""
    chosen = range(windows.shape[0]) if window_indices is None else list(window_indices)
    tracker = ProgressTracker(progress, stage, total=len(chosen), unit="windows")
    for index in chosen:
        ids = windows[index : index + 1].to(input_device(model))  # [1, L], where the model computes
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()  # [L-1, V]
        yield index, ids[0, 1:], logits
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


_KL_ROWS = 8  # positions per chunk of exact_kl: 8 × a 49k vocabulary is 1.5 MB a tensor, so a chunk stays in cache


def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> tuple[float, float]:
    """Exact (forward, reverse) KL between full log-distributions, summed over positions.

    `logp`: [T, V] of the original model P, `logq`: [T, V] of the other model Q. Forward is
    `Σ_t Σ_v P·(log P − log Q)` = Σ_t KL(P_orig ‖ P_comp); reverse is Σ_t KL(P_comp ‖ P_orig).
    Both come from one difference `d = log P − log Q`: forward `Σ P·d`, reverse `−Σ Q·d` (the terms
    `F.kl_div(..., log_target=True)` sums), taken a few positions at a time so that each chunk is read
    from memory once instead of six full `[T, V]` passes and temporaries (about 5× faster on CPU).
    """
    sums = torch.zeros(2, dtype=torch.float64, device=logq.device)  # (forward, reverse): one sync at the end
    for start in range(0, logp.shape[0], _KL_ROWS):
        p_log, q_log = logp[start : start + _KL_ROWS], logq[start : start + _KL_ROWS]  # [rows, V]
        _add_kl_terms(sums, p_log - q_log, p_log.exp(), q_log.exp())
    forward, reverse = sums.tolist()
    return forward, reverse


def _add_kl_terms(sums: torch.Tensor, difference: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> None:
    """Add one chunk's forward `Σ P·d` and reverse `−Σ Q·d` (`d = log P − log Q`) to `sums`, in place: `difference`
    and `q` are overwritten (no temporaries, one pass each)."""
    sums[1] -= q.mul_(difference).sum()
    sums[0] += difference.mul_(p).sum()


def window_quality(logits: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor,
                   ref_p: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """One window's per-token NLL `[T]` and its summed (forward, reverse) KL, from the evaluated model's `logits`
    `[T, V]` (float32) and the reference's log-probabilities and probabilities `[T, V]`.

    The same quantities as `token_nll(log_softmax(logits))` and `exact_kl(ref_logp, log_softmax(logits))` (the
    log-softmax is row by row, so taking it a chunk at a time gives the same numbers), a few positions at a time
    while each chunk is in cache, with P kept by the reference rather than exponentiated again per window."""
    sums = torch.zeros(2, dtype=torch.float64, device=logits.device)  # (forward, reverse)
    nll = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
    for start in range(0, logits.shape[0], _KL_ROWS):
        rows = slice(start, start + _KL_ROWS)
        log_q = F.log_softmax(logits[rows], dim=1)  # [rows, V]
        q = log_q.exp()
        nll[rows] = -log_q.gather(1, targets[rows, None]).squeeze(1)
        _add_kl_terms(sums, torch.sub(ref_logp[rows], log_q, out=log_q), ref_p[rows], q)  # d in log Q's place
    forward, reverse = sums.tolist()
    return nll, forward, reverse


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


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final hidden states (`[..., D]` -> `[..., V]`), as its forward computes them:
    the output embedding, then the final logit soft-capping of models that have one (Gemma 2)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


REFERENCE_MEMORY_BYTES = 2 << 30  # log-probabilities and probabilities kept per reference (10 windows of 512 at 49k)


@dataclass
class ReferenceDistribution:
    """The original model's exact next-token distribution on evaluation windows, kept as final hidden states.

    `hidden`: `[N, L−1, D]` float32, the LM head's input at every predicted position of every window.
    `logprobs(model, i)` gives window i's `[L−1, V]` log-probabilities through the (never compressed)
    head, `distribution(model, i)` them and the probabilities; the first windows whose pair fits
    `memory_bytes` are kept after their first use.
    """

    hidden: torch.Tensor  # [N, L-1, D] float32
    perplexity: float
    memory_bytes: int = REFERENCE_MEMORY_BYTES
    _kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def logprobs(self, model: torch.nn.Module, index: int) -> torch.Tensor:
        """log P_orig for window `index`: `[L−1, V]` float32."""
        return self.distribution(model, index)[0]

    def distribution(self, model: torch.nn.Module, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P_orig, P_orig) for window `index`: `[L−1, V]` float32 each."""
        kept = self._kept.get(index)
        if kept is not None:
            return kept
        with torch.no_grad():
            head = model.get_output_embeddings()
            hidden = self.hidden[index].to(model_device(head), head.weight.dtype)  # [L-1, D] on the head's device
            logp = F.log_softmax(head_logits(model, hidden).float(), dim=-1)  # [L-1, V]
            pair = (logp, logp.exp())
        if (len(self._kept) + 1) * 2 * logp.numel() * logp.element_size() <= self.memory_bytes:
            self._kept[index] = pair
        return pair


@torch.no_grad()
def compute_reference(
    model: torch.nn.Module, windows: torch.Tensor, progress: Optional[ProgressCallback] = None
) -> ReferenceDistribution:
    """Run the original model once over `windows` and keep its final hidden states (and its perplexity)."""
    captured: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    hidden = []
    tally = _NllTally()
    try:
        for window in next_token_logprobs(model, windows, progress=progress, stage="reference distribution"):
            tally.add(token_nll(window.logp, window.targets))  # [L-1]
            hidden.append(captured.pop()[0, :-1].float().cpu())  # [L-1, D]: the head's input, last position unused
    finally:
        hook.remove()
    return ReferenceDistribution(torch.stack(hidden), perplexity(tally.mean_nll))  # [N, L-1, D]


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

    Both KLs are exact (`exact_kl` over the full vocabulary). Only the evaluated model runs its
    layers: the original's distribution comes from `reference` through the shared LM head, which
    compression never changes. `window_indices` restricts evaluation to some windows.
    """
    tally = _NllTally()
    fwd_sum = rev_sum = 0.0
    for index, targets, logits in next_token_logits(model, windows, window_indices, progress, stage="evaluation"):
        nll, forward, reverse = window_quality(logits, targets, *reference.distribution(model, index))
        tally.add(nll)  # [L-1]
        fwd_sum += forward
        rev_sum += reverse
    n_tokens = tally.n_tokens
    return QualityResult(perplexity(tally.mean_nll), tally.mean_nll, fwd_sum / n_tokens, rev_sum / n_tokens,
                         n_tokens, tally.window_nll)
