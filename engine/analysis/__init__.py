"""Read-only views of engine results shaped for display: spectra grids, sweep curves, rank tables.

Front ends (the app's pages, notebooks) plot these rows directly, so no page computes anything.
`METRIC_LABELS` names each quality metric exactly as the UI shows it; the labels and the definitions
plans record both come from `engine.metric_definitions`.
"""

from engine.metric_definitions import metric_labels

METRIC_LABELS: dict[str, str] = metric_labels()
