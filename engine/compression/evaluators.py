"""Evaluating many allocations: in this process one after another, or on a pool of workers (`engine.workers`).

Evaluation is a pure function of (model, factors, allocation, windows) (DESIGN.md §15), so sweeps and searches
hand their allocations to an `Evaluator` as `EvaluationTask`s and get each result back as it finishes, in any
order; the caller (the driver) alone writes the store. `SerialEvaluator` runs them here, in order, on the
session's model; `engine.workers.RayEvaluator` runs them on Ray workers that each hold one model replica.
Window sets other than the session's evaluation windows (a search's validation windows) are registered once by
name, so a pool ships them to each worker once, not with every task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Protocol, Sequence

import torch

from engine.compression.session import CompressionSession
from engine.metrics import QualityResult, ReferenceDistribution

EVALUATION = "evaluation"  # the session's own evaluation windows and reference


@dataclass(frozen=True)
class EvaluationTask:
    """One allocation to measure: ranks (and kept channels of pruned MLPs), on which windows."""

    key: object  # what the caller finds the result by
    ranks: Mapping[str, Optional[int]]
    channels: Optional[Mapping[str, Optional[int]]] = None
    pruning: Optional[Mapping] = None
    windows: str = EVALUATION  # a registered window set
    window_indices: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class Evaluated:
    """A task's result and how long the measurement took where it ran."""

    task: EvaluationTask
    result: QualityResult
    seconds: float


class Evaluator(Protocol):
    workers: int

    def register_windows(self, name: str, windows: torch.Tensor, reference: ReferenceDistribution) -> None: ...

    def map_unordered(self, tasks: Sequence[EvaluationTask]) -> Iterator[Evaluated]: ...

    def close(self) -> None: ...


def evaluate_task(session: CompressionSession, task: EvaluationTask,
                  window_sets: Mapping[str, tuple[torch.Tensor, ReferenceDistribution]]) -> Evaluated:
    """Measure one task on `session` (the same call a serial sweep or study makes)."""
    start = time.perf_counter()
    options = {}
    if task.windows != EVALUATION:
        options["windows"], options["reference"] = window_sets[task.windows]
    if task.window_indices is not None:
        options["window_indices"] = list(task.window_indices)
    if task.channels and any(k is not None for k in task.channels.values()):
        options["channels"], options["pruning"] = task.channels, task.pruning
    result = session.evaluate_ranks(task.ranks, **options)
    return Evaluated(task, result, time.perf_counter() - start)


class SerialEvaluator:
    """Tasks measured here, in the order given, on the session's model."""

    workers = 1

    def __init__(self, session: CompressionSession):
        self.session = session
        self._window_sets: dict[str, tuple[torch.Tensor, ReferenceDistribution]] = {}

    def register_windows(self, name: str, windows: torch.Tensor, reference: ReferenceDistribution) -> None:
        self._window_sets[name] = (windows, reference)

    def map_unordered(self, tasks: Sequence[EvaluationTask]) -> Iterator[Evaluated]:
        for task in tasks:
            yield evaluate_task(self.session, task, self._window_sets)

    def close(self) -> None:
        pass
