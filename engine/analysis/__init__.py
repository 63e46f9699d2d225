"""Read-only views of engine results shaped for display: spectra grids, sweep curves, rank tables.

Front ends (the app's pages, notebooks) plot these rows directly, so no page computes anything.
`METRIC_LABELS` names each quality metric exactly as the UI and the plan JSON must show it.
"""

METRIC_LABELS: dict[str, str] = {
    "perplexity": "Perplexity",
    "kl_forward": "KL(P_orig‖P_comp)",
    "kl_reverse": "KL(P_comp‖P_orig)",
}
