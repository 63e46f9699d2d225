"""Where a study with the `trust` strategy looks next: GP expected improvement, local around the incumbent.

A `trust` study tells its Gaussian process every plan it knows before it searches (the warm start, LoRD,
greedy from the sensitivity curves, the global allocation, LoRAP when it prunes), then spends a short random
phase, then alternates two proposals, both chosen by expected improvement (scikit-optimize's GP and
`gaussian_ei`) among random candidates:
- local (two trials in three): candidates in a trust region around the incumbent (TuRBO's box: each
  coordinate moved with probability min(1, 20/d) by up to ±L); L doubles after 2 improvements in a row,
  halves after 3 misses in a row, and starts again at its initial size once it falls below its minimum;
- global (every third): candidates anywhere in the box.
The GP learns from the coordinates of the plans actually evaluated (after projection onto the budget), so
every point it knows lies on the budget surface; candidates are moved onto that surface with a linear budget
model (`Grouping.dim_params`) before scoring, and the exact projection follows when the trial is evaluated.

Every proposal is a pure function of the told history, the study's seed and the trial number: a resumed
study proposes exactly what an uninterrupted one would, without replaying an optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

LOCAL, GLOBAL, RANDOM = "local", "global", "random"
INITIAL_RADIUS, MIN_RADIUS, MAX_RADIUS = 0.2, 0.02, 0.5  # in coordinates scaled to [0, 1] by max_ratio
SUCCESSES_TO_GROW, FAILURES_TO_SHRINK = 2, 3
LOCAL_CANDIDATES, GLOBAL_CANDIDATES = 1024, 2048
IMPROVEMENT = 1e-3  # relative decrease of the objective that counts as a success


@dataclass(frozen=True)
class Told:
    """One point the GP knows: scaled coordinates, the objective told, and how the point was proposed."""

    coordinates: tuple[float, ...]
    objective: float
    proposal: str  # prior, warm-start, random, local, global


def phase_of(history: Sequence[Told], n_random: int) -> str:
    """The proposal kind of the next search trial: random first, then local, local, global, ..."""
    searched = [t for t in history if t.proposal in (RANDOM, LOCAL, GLOBAL)]
    randoms = sum(t.proposal == RANDOM for t in searched)
    if randoms < n_random:
        return RANDOM
    model_trials = len(searched) - randoms
    return GLOBAL if model_trials % 3 == 2 else LOCAL


def trust_radius(history: Sequence[Told]) -> float:
    """The trust region's size after the history's model-phase trials (TuRBO's success/failure counters)."""
    radius, successes, failures = INITIAL_RADIUS, 0, 0
    best = np.inf
    for told in history:
        improved = told.objective < best - IMPROVEMENT * abs(best) if np.isfinite(best) else True
        if told.proposal in (LOCAL, GLOBAL):
            successes, failures = (successes + 1, 0) if improved else (0, failures + 1)
            if successes >= SUCCESSES_TO_GROW:
                radius, successes = min(2 * radius, MAX_RADIUS), 0
            if failures >= FAILURES_TO_SHRINK:
                radius, failures = radius / 2, 0
            if radius < MIN_RADIUS:
                radius = INITIAL_RADIUS
        best = min(best, told.objective)
    return radius


def onto_budget_plane(points: np.ndarray, weights: np.ndarray, level: float, upper: float) -> np.ndarray:
    """Points (rows, scaled coordinates) moved to `weights · x = level` within [0, upper], a few alternating steps."""
    norm = float(weights @ weights)
    for _ in range(6):
        points = points + np.outer(level - points @ weights, weights) / norm
        points = np.clip(points, 0.0, upper)
    return points


def fit_gp(history: Sequence[Told], length_scales: Sequence[float], seed: int):
    """Bolaco's GP (constant x Matern 5/2 with per-coordinate length scales, plus white noise) fitted to the history."""
    from skopt.learning import GaussianProcessRegressor
    from skopt.learning.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    kernel = ConstantKernel(1.0, (0.01, 1000.0)) * Matern(length_scale=list(length_scales),
                                                          length_scale_bounds=(0.01, 100.0), nu=2.5) \
        + WhiteKernel(noise_level=1e-3, noise_level_bounds=(1e-8, 1.0))
    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed)
    gp.fit(np.array([t.coordinates for t in history]), np.array([t.objective for t in history]))
    return gp


def propose(history: Sequence[Told], kind: str, weights: Sequence[float], length_scales: Sequence[float],
            seed: int, index: int, upper: float = 1.0) -> np.ndarray:
    """Scaled coordinates of the study's `index`-th told trial (`kind` from `phase_of`; baselines not counted, so
    adding a baseline does not move the search); `weights` are the linear budget model's parameters per scaled
    coordinate, `upper` the largest scaled coordinate a candidate may take."""
    rng = np.random.default_rng([seed, index, 7])
    dims = len(weights)
    if kind == RANDOM:
        return rng.uniform(0.0, upper, dims)
    weights = np.asarray(weights, dtype=float)
    incumbent = min(history, key=lambda t: t.objective)
    centre = np.array(incumbent.coordinates)
    level = float(centre @ weights)  # the incumbent lies on the budget surface: stay at its linear-model level
    if kind == LOCAL:
        radius = trust_radius(history)
        mask = rng.uniform(size=(LOCAL_CANDIDATES, dims)) < min(1.0, 20.0 / dims)
        mask[np.arange(LOCAL_CANDIDATES), rng.integers(0, dims, LOCAL_CANDIDATES)] = True  # move at least one
        steps = rng.uniform(-radius, radius, (LOCAL_CANDIDATES, dims)) * mask
        candidates = centre + steps
    else:
        candidates = rng.uniform(0.0, upper, (GLOBAL_CANDIDATES, dims))
    candidates = onto_budget_plane(candidates, weights, level, upper)
    from skopt.acquisition import gaussian_ei

    gp = fit_gp(history, length_scales, seed)
    best = min(t.objective for t in history)
    scores = gaussian_ei(candidates, gp, y_opt=best, xi=0.01)
    return candidates[int(np.argmax(scores))]
