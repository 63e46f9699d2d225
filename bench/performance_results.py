"""docs/performance.md: each speed, size and memory target of the engine against what its bench measured.

Reads the benches' JSON under bench/results/ (nothing is measured here) and writes one table: the target, the
measured value, whether it is met, when it was measured and the command that measures it again. A bench that has not
been run is listed as such. Every ratio is against a baseline measured in the same run of its bench (this machine is
shared, so absolute times drift between days; the ratios hold).

Run: `.venv/bin/python bench/performance_results.py` (after any of the benches it reads).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS  # noqa: E402
from engine.paths import PROJECT_ROOT  # noqa: E402

DOC = PROJECT_ROOT / "docs" / "performance.md"
PY = ".venv/bin/python bench/"


def _load(name: str) -> Optional[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _calibration(d: dict) -> tuple[str, bool]:
    precision = max(d["max_relative_difference"].values())
    return (f"{d['ratio_median']:.3f}× the plain float64 loop ({d['windows']} × {d['window_len']} tokens; plain "
            f"{'/'.join(f'{s:.0f}' for s in d['plain_s'])} s, engine {'/'.join(f'{s:.0f}' for s in d['engine_s'])} s); "
            f"largest relative difference {precision:.1e}",
            d["ratio_median"] <= d["target_ratio"] and precision <= d["target_difference"])


def _factorization(method: str) -> Callable[[dict], tuple[str, bool]]:
    def row(d: dict) -> tuple[str, bool]:
        m = d["methods"][method]
        return (f"{m['ratio_median']:.3f}× the plain loop (plain {m['plain_median_s']:.1f} s, engine "
                f"{m['engine_median_s']:.1f} s, all {d['linears']} linears)", m["ratio_median"] <= m["target_ratio"])
    return row


def _first_spectra(d: dict) -> tuple[str, bool]:
    return (f"weight spectra at {d['weight_spectra_s']:.0f} s, first feature spectra at {d['first_spectra_s']:.0f} s, "
            f"final ({d['windows']} windows) at {d['final_s']:.0f} s, whole process from an empty cache",
            d["first_spectra_s"] <= d["target_first_spectra_s"])


def _cache_sizes(d: dict) -> tuple[str, bool]:
    mib = 2**20
    return (f"calibration {d['calibration']['new_bytes'] / mib:.0f} MiB (was {d['calibration']['old_bytes'] / mib:.0f}), "
            f"feature-pca factors {d['factorization']['new_bytes'] / mib:.0f} MiB (was "
            f"{d['factorization']['old_bytes'] / mib:.0f}): {d['both']['ratio']:.2f}× together; read back identical",
            d["both"]["ratio"] <= 0.5 and d["calibration"]["identical_after_loading"]
            and d["factorization"]["identical_after_loading"])


def _export(d: dict) -> tuple[str, bool]:
    parts = d["export"]["parts"]
    shown = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in parts.items() if k != "total_s")
    return f"{d['export']['export_s']:.1f} s ({shown})", d["export"]["export_s"] <= 40


def _trial(d: dict) -> tuple[str, bool]:
    return (f"{d['ratio_median']:.3f}× (median of {d['rounds']} alternating rounds, {d['windows']} windows; CPU-time "
            f"ratio {d['cpu_ratio_median']:.3f})", d["ratio_median"] <= d["target"])


def _sweep(d: dict) -> tuple[str, bool]:
    estimate, fit = d["whole_sweep_estimate"], d["fit_cpu_s"]
    return (f"{estimate['ratio']:.3f}× for all {estimate['layers']} layers (fitted from layers "
            f"{', '.join(str(p['layer']) for p in d['points'])}: a fixed {fit['fixed_share_of_full']:.0%} of a full "
            f"evaluation, the LM head and metrics, plus each layer run); numbers identical "
            f"(largest difference {d['max_metric_difference']['abs']:g})",
            estimate["ratio"] <= estimate["target"] and d["max_metric_difference"]["abs"] == 0)


def _memory(d: dict) -> tuple[str, bool]:
    runs = d["runs"]
    return (f"{runs['by-layer']['peak_rss_mib'] / 1024:.2f} GiB layer by layer against "
            f"{runs['whole-model']['peak_rss_mib'] / 1024:.2f} GiB for the whole model at once (loading the model alone: "
            f"{runs['load only']['peak_rss_mib'] / 1024:.2f} GiB; {d['model']['parameters'] / 1e6:.0f}M-parameter "
            f"0.5B-shaped Qwen2, {d['windows']} windows); statistics "
            f"{'identical' if d['statistics']['identical'] else 'DIFFERENT'}", d["meets_target"])


ROWS = [
    ("Calibration statistics", "≤ 0.5× a plain float64 loop, statistics within 1e-6", "calibration",
     _calibration, "bench_calibration.py"),
    ("feature-pca factorisation", "≤ 0.3× the plain loop", "factorization", _factorization("feature-pca"),
     "bench_factorization.py"),
    ("whiten factorisation", "≤ 0.3× the plain loop", "factorization", _factorization("whiten"),
     "bench_factorization.py"),
    ("First spectra, cold cache", "< 2 min after `prepare`", "first_spectra", _first_spectra,
     "bench_first_spectra.py"),
    ("Cache sizes", "≤ half of the earlier form", "cache_sizes", _cache_sizes, "bench_cache_sizes.py"),
    ("Export of the default model", "≤ 40 s", "export", _export, "bench_export.py --skip-old --skip-unmeasured"),
    ("A search trial", "≤ 1.05× a bare forward pass of the compressed model", "trial", _trial, "bench_trial.py"),
    ("Per-layer sweep", "≤ 0.55× full evaluations, identical numbers", "sweep", _sweep, "bench_sweep.py"),
    ("Calibration memory, 0.5B-class", "≤ 4 GiB", "calibration_memory", _memory, "bench_calibration_memory.py"),
]


def render() -> str:
    lines = ["# Performance targets and what the benches measured", "",
             "Generated by `.venv/bin/python bench/performance_results.py` from the benches' JSON in `bench/results/` "
             "(do not edit by hand; rerun the bench, then this script). Default model (SmolLM2-135M) on this project's "
             "2-core CPU machine unless the row says otherwise; every ratio is against a baseline measured in the same "
             "run of its bench.", "",
             "| what | target | measured | met | measured on | rerun |", "|---|---|---|---|---|---|"]
    for what, target, name, describe, command in ROWS:
        data = _load(name)
        if data is None:
            lines.append(f"| {what} | {target} | not measured yet | – | – | `{PY}{command}` |")
            continue
        measured, met = describe(data)
        lines.append(f"| {what} | {target} | {measured} | {'yes' if met else '**no**'} | "
                     f"{data['environment']['measured_at'][:16].replace('T', ' ')} UTC, RankScope "
                     f"{data['environment']['engine_version']} | `{PY}{command}` |")
    sweep = _load("sweep")
    if sweep:
        fit = sweep["fit_cpu_s"]
        lines += ["", "Why the per-layer sweep stops where it does: a point at layer k runs layers k..N−1, then the LM "
                  f"head and the metrics over the whole vocabulary, which no reuse can skip (the logits of every "
                  f"position change). Fitted on this run: {fit['fixed']:.2f} s fixed and {fit['per_layer']:.3f} s per "
                  f"layer for {sweep['evaluation_windows']} windows, so the fixed part alone is "
                  f"{fit['fixed_share_of_full']:.0%} of a full evaluation, and a sweep that runs on average half the "
                  "layers cannot go below about that share plus half the rest."]
    return "\n".join(lines) + "\n"


def main() -> None:
    DOC.write_text(render())
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
