"""The validation subset a search scores trials on (Bolaco's sensitive subset).

Candidates are windows of the evaluation text that come *after* the evaluation windows, so the
final re-measurement on the evaluation windows uses text the search never saw. `sensitive`
evaluates a few random feasible plans on every candidate and keeps the windows whose perplexity
varies most across plans (they separate good plans from bad ones); `random` keeps a random
sample of the same size; `all` keeps every candidate. The choice and its reasons are stored.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from engine.progress import ProgressCallback, ProgressTracker


def choose_subset(
    kind: str,
    size: int,
    n_candidates: int,
    probe_plans: list[dict],
    evaluate_windows: Callable[[dict], list[float]],
    seed: int,
    progress: Optional[ProgressCallback] = None,
) -> dict:
    """Pick `size` of `n_candidates` windows. `evaluate_windows(ranks)` returns per-window mean NLL."""
    rng = np.random.default_rng(seed)
    if kind == "all":
        return {"kind": kind, "windows": list(range(n_candidates)), "reason": "every candidate window"}
    if kind == "random":
        chosen = sorted(int(i) for i in rng.choice(n_candidates, size=size, replace=False))
        return {"kind": kind, "windows": chosen, "reason": f"uniform random sample (seed {seed})"}
    tracker = ProgressTracker(progress, "choosing sensitive windows", total=len(probe_plans), unit="plans")
    nll = []
    for ranks in probe_plans:
        nll.append(evaluate_windows(ranks))
        tracker.advance()
    perplexity = np.exp(np.asarray(nll))  # [plans, windows]
    variance = perplexity.var(axis=0)
    order = np.argsort(-variance, kind="stable")
    chosen = sorted(int(i) for i in order[:size])
    return {
        "kind": kind,
        "windows": chosen,
        "reason": f"highest variance of perplexity across {len(probe_plans)} random feasible plans",
        "variance": [float(v) for v in variance],
        "probe_perplexity_mean": [float(v) for v in perplexity.mean(axis=0)],
    }


def objective(perplexity: float, kl: float, beta: float) -> float:
    """log PPL + β·KL (DESIGN.md §10)."""
    return math.log(perplexity) + beta * kl
