"""The quality metrics' names, UI labels and definition texts, stated once as data.

Torch-free on purpose: the plan document (`engine.compression.plan`, which records the definitions in
every plan it writes) and the display views (`engine.analysis`, which label columns with them) read
it without loading a model stack. The computations these texts describe live in `engine.metrics`,
one function per metric (`token_nll`/`perplexity`, `exact_kl`).

The definition strings are part of saved plans (`metrics.definitions`), so changing one changes
what new plans say; the labels are what every page shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class MetricDefinition:
    """One quality metric: its key in results and plans, its UI label, and what it measures."""

    key: str
    label: str
    definition: str


METRICS: Mapping[str, MetricDefinition] = MappingProxyType({
    m.key: m
    for m in (
        MetricDefinition(
            "perplexity",
            "Perplexity",
            "exp(mean next-token negative log-likelihood) over all predicted tokens of the evaluation windows",
        ),
        MetricDefinition(
            "kl_forward",
            "KL(P_orig‖P_comp)",
            "KL(P_orig || P_comp) per predicted token, averaged (nats)",
        ),
        MetricDefinition(
            "kl_reverse",
            "KL(P_comp‖P_orig)",
            "KL(P_comp || P_orig) per predicted token, averaged (nats)",
        ),
    )
})


def metric_labels() -> dict[str, str]:
    """`{metric key: UI label}` in the order of `METRICS`."""
    return {key: m.label for key, m in METRICS.items()}


def metric_definitions() -> dict[str, str]:
    """`{metric key: definition text}` in the order of `METRICS`, as plans record it."""
    return {key: m.definition for key, m in METRICS.items()}
