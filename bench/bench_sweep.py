"""Benchmark of per-layer sweeps reusing the original layers below the compressed one; writes bench/results/sweep.json.

On the default model with svd factors (data-free: no calibration), one layer of type q at ratio 0.5
is evaluated for a few layers spread over depth (default 0, 10, 20, 29) on 4 windows of 512 tokens,
both ways in the same run, alternating which goes first: a full evaluation (`evaluate_ranks`) and
the prefix-cached path (`LayerPrefixCache.replaying`). Reported per layer: the best and median
wall and CPU seconds of each path, and the largest difference of perplexity and both KLs between
the two (expected 0: the paths are bit for bit the same computation above the compressed layer).

The machine's 2 cores are shared, so wall time swings by tens of percent; the bench runs one torch
thread and estimates from CPU time (process time), which measures the work. One cost model
`a + b × (layers run)` is fitted to both paths' best CPU times (a full evaluation runs every layer);
a whole 30-layer sweep is then Σ_k (a + b × (30 − k)) plus one original layer step per layer to
advance the cache (measured), against 30 × (a + 30 b) for full evaluations (target: ratio <= 0.55).
Run: `.venv/bin/python bench/bench_sweep.py [--model DIR] [--windows N] [--layers 0,10,20,29] [--reps R]`.
The cache is a temporary folder (RANKSCOPE_CACHE); the model directory is only read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["RANKSCOPE_CACHE"] = tempfile.mkdtemp(prefix="rankscope-bench-sweep-")

from bench.common import peak_rss_mib, write_json  # noqa: E402
from engine.compression.layer_prefix import LayerPrefixCache  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.paths import PROJECT_ROOT  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402
from engine.texts.windows import Windowing  # noqa: E402

METRICS = ("perplexity", "kl_forward", "kl_reverse")


def _timed(call):
    """(wall seconds, CPU seconds of this process, result) of `call()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(PROJECT_ROOT / "cache" / "models" / "smollm2-135m"),
                        help="the converted default model's directory (read only)")
    parser.add_argument("--method", default="svd")
    parser.add_argument("--type", default="q")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens")
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--reps", type=int, default=2, help="evaluations of each point by each path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time measures the work)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    store = open_store()
    loaded = load_model(args.model, store, TerminalProgress())
    texts = TextSettings(evaluation_windowing=Windowing(512, args.windows))
    session = CompressionSession.open(store, loaded, args.method, texts, TerminalProgress())
    n_layers = session.shapes.num_layers
    layers = [int(x) for x in args.layers.split(",")]

    cache = LayerPrefixCache(loaded, session.windows)
    initial, advance, steps = (0.0, 0.0), (0.0, 0.0), 0
    rows, max_abs, max_rel = [], 0.0, 0.0
    for layer in sorted(layers):
        ranks = {p: u.rank_for_ratio(args.ratio) for u in session.shapes.units(args.method)
                 if "+".join(u.types) == args.type and u.layer == layer for p in u.paths}
        if cache.layer is None:  # the embeddings: the inputs of layer 0
            *initial, _ = _timed(lambda: cache.advance_to(0))
        step_from = cache.layer
        wall, cpu, _ = _timed(lambda: cache.advance_to(layer))  # one original layer per step and window
        advance, steps = (advance[0] + wall, advance[1] + cpu), steps + (layer - step_from)
        times, results = {"full": [], "prefix": []}, {"full": [], "prefix": []}

        def run(path):
            with cache.replaying() if path == "prefix" else nullcontext():
                wall, cpu, result = _timed(lambda: session.evaluate_ranks(ranks))
            times[path].append((wall, cpu))
            results[path].append(result)

        for rep in range(args.reps):
            for path in (("full", "prefix") if rep % 2 == 0 else ("prefix", "full")):
                run(path)
        reference = results["full"][0]
        for result in results["full"] + results["prefix"]:
            for key in METRICS:
                a, b = getattr(reference, key), getattr(result, key)
                max_abs = max(max_abs, abs(a - b))
                max_rel = max(max_rel, abs(a - b) / max(abs(a), 1e-30))
        row = {"layer": layer, "layers_run": n_layers - layer}
        for path in ("full", "prefix"):
            for i, clock in enumerate(("wall", "cpu")):
                values = [t[i] for t in times[path]]
                row[f"{path}_{clock}_s"] = {"best": round(min(values), 3), "median": round(statistics.median(values), 3)}
        row["ratio_cpu_best"] = round(row["prefix_cpu_s"]["best"] / row["full_cpu_s"]["best"], 3)
        row["metrics"] = {key: getattr(reference, key) for key in METRICS}
        rows.append(row)
        print(row, flush=True)

    # one cost model for both paths: seconds ~ a + b * (layers run), a full evaluation running every layer
    xs = [r["layers_run"] for r in rows] + [n_layers] * len(rows)
    ys = [r["prefix_cpu_s"]["best"] for r in rows] + [r["full_cpu_s"]["best"] for r in rows]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    a = mean_y - b * mean_x
    step = advance[1] / max(steps, 1)
    layers_part = sum(a + b * (n_layers - k) for k in range(n_layers))
    prefix_sweep = layers_part + initial[1] + (n_layers - 1) * step
    full_sweep = n_layers * (a + b * n_layers)
    path = write_json("sweep", {
        "model": loaded.model_id, "method": args.method, "type": args.type, "ratio": args.ratio,
        "evaluation_windows": args.windows, "window_len": 512, "reps": args.reps, "clock": "cpu (process time)",
        "points": rows,
        "advance": {"initial_cpu_s": round(initial[1], 3), "cpu_s": round(advance[1], 3), "wall_s": round(advance[0], 3),
                    "layer_steps": steps, "cpu_s_per_step": round(step, 3)},
        "fit_cpu_s": {"fixed": round(a, 4), "per_layer": round(b, 4),
                      "fixed_share_of_full": round(a / (a + b * n_layers), 3)},
        "whole_sweep_estimate": {"layers": n_layers, "full_cpu_s": round(full_sweep, 1),
                                 "prefix_cpu_s": round(prefix_sweep, 1), "ratio": round(prefix_sweep / full_sweep, 3),
                                 "ratio_without_advancing": round(layers_part / full_sweep, 3), "target": 0.55},
        "measured_cpu_ratio_these_layers": round(sum(r["prefix_cpu_s"]["best"] for r in rows)
                                                 / sum(r["full_cpu_s"]["best"] for r in rows), 3),
        "max_metric_difference": {"abs": max_abs, "rel": max_rel},
        "cache_mib_per_layer": round(cache.nbytes / 2**20, 1),
        "peak_rss_mib": round(peak_rss_mib()),
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
