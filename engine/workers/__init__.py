"""Evaluation on a pool of Ray workers: one model replica per worker, the driver alone writes the store."""

from engine.workers.ray_pool import RayEvaluator, open_evaluator

__all__ = ["RayEvaluator", "open_evaluator"]
