"""Standing in for a model's own modules during a forward: what layer-by-layer calibration and per-layer sweeps use
to replay stored inputs of a decoder layer in place of running the layers below it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from torch import nn


@contextmanager
def replaced_forwards(modules: Sequence[nn.Module], forward: Callable) -> Iterator[None]:
    """Within the block, calling any of `modules` calls `forward` instead. Afterwards each module has its own forward
    again, including one set on the instance by another library (accelerate's device hooks wrap `forward` that way)."""
    saved = [module.__dict__.get("forward") for module in modules]
    try:
        for module in modules:
            module.forward = forward  # an instance attribute: found before the class's forward
        yield
    finally:
        for module, own in zip(modules, saved):
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
