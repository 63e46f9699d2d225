"""The Allocate page's live quality on the default model: how fast the instant estimate is, how wrong it is, and what
the quick measurement costs against Apply's full one. Writes bench/results/live_estimate.json.

1. Latency: `app.tasks.stored_estimator` (the function the page calls on every rerun: it reads the sweep, the
   studies and the saved plans from the store, fits the correction and its leave-one-out error) plus `estimate`
   for the page's default allocation (5x1, every group at 0.2, v dense), timed over `--rounds` runs.
2. Quick against full, in the same run and session: `evaluate_ranks(ranks, window_indices=[0..q-1])` (the quick
   measurement; its first run also turns those windows' reference hidden states into log-probabilities, as the
   page's first quick measurement does) and `session.evaluate(plan)` (what Apply runs) on all evaluation windows,
   each timed cold (first) and warm (again); the ratio is quick / full, warm. Also timed: the original model on
   the quick windows, which the page measures once only when the Model page's baseline evaluation is not stored.
3. Error: the estimator's leave-one-out error on the stored full-window evaluations (study results, saved plans)
   with and without the correction; and, with `--plans N`, N random multi-type allocations (5x1 ratios drawn
   uniformly in 0..0.5, v included) measured on all evaluation windows here: each is predicted by the estimator
   built from the store alone (out of sample), and the leave-one-out error is measured again with them added as
   evaluated plans (what the page would show after N Applies). They are kept in the JSON only, not in the store.

The per-type sweep must be stored for the method (`rankscope sweep --by type`, or `--sweep` here). DuckDB allows one
writing process per database: point `--cache` at a copy while another process holds the project's cache.

Run: `.venv/bin/python bench/bench_live_estimate.py [--cache DIR] [--method feature-pca] [--plans 6] [--sweep]`.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_rss_mib, write_json  # noqa: E402
from engine.analysis.quality_estimate import NoEstimate, QualityEstimator  # noqa: E402
from engine.compression.grouping import Grouping, ranks_from_ratios  # noqa: E402
from engine.compression.plan_shelf import PlanShelf  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.compression.sweep import sweep_by_type, sweep_id  # noqa: E402
from engine.compression.units import count_parameters  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.paths import choose_cache_root  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402


def _errors(error) -> dict | None:
    if error is None:
        return None
    return {"n": error.n, "perplexity": round(error.perplexity, 4), "kl_forward": round(error.kl_forward, 4),
            "kl_reverse": round(error.kl_reverse, 4)}


def _timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def main() -> None:
    from app.tasks import stored_estimator  # no Streamlit call is made: it reads the store it is given

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="cache folder (default: $RANKSCOPE_CACHE or ./cache)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="feature-pca")
    parser.add_argument("--quick-windows", type=int, default=2, help="windows of the quick measurement (the page's)")
    parser.add_argument("--rounds", type=int, default=20, help="timed runs of the estimator")
    parser.add_argument("--plans", type=int, default=6, help="random allocations to measure for the held-out error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true", help="run the per-type sweep (0.2, 0.4, 0.6) if missing")
    args = parser.parse_args()
    if args.cache:
        choose_cache_root(args.cache)
    store = open_store()
    loaded = load_model(args.model, store, TerminalProgress())
    texts = TextSettings()  # the app's defaults: the evaluation set the page measures on
    session = CompressionSession.open(store, loaded, args.method, texts, TerminalProgress())
    shapes = session.shapes
    if not any(p.layer == -1 for p in store.sensitivity_points(sweep_id(session))):
        if not args.sweep:
            sys.exit(f"No per-type sweep of {args.method} is stored in {store.cache_dir}: run `rankscope sweep "
                     f"--by type --method {args.method}` (or this script with --sweep) first.")
        sweep_by_type(session, [0.2, 0.4, 0.6], progress=TerminalProgress())

    saved = [(name, plan.to_dict()) for name, plan in PlanShelf(store.cache_dir).load().items()]
    grouping = Grouping("5x1")
    groups = grouping.groups(shapes, args.method)
    ranks = ranks_from_ratios(groups, {name: 0.2 for name in groups})  # the page's default allocation

    # 1. the estimate's latency, as the page computes it
    latencies = []
    for _ in range(args.rounds):
        seconds, estimate = _timed(lambda: stored_estimator(store, shapes, args.method, texts, None, saved)
                                   .estimate(ranks))
        latencies.append(seconds)
    if isinstance(estimate, NoEstimate):
        sys.exit(estimate.message)

    # 2. quick against full, both cold then warm, in this session
    indices = list(range(min(args.quick_windows, texts.evaluation_windowing.n_windows)))
    plan = session.plan(ranks)
    quick_cold, quick = _timed(lambda: session.evaluate_ranks(ranks, window_indices=indices))
    original_quick_s, original_quick = _timed(lambda: session.evaluate_ranks({}, window_indices=indices))
    full_cold, full = _timed(lambda: session.evaluate(plan))
    quick_warm, _ = _timed(lambda: session.evaluate_ranks(ranks, window_indices=indices))
    full_warm, _ = _timed(lambda: session.evaluate(plan))

    # 3. the error: leave-one-out on the store, then out of sample on freshly measured random allocations
    estimator = stored_estimator(store, shapes, args.method, texts, None, saved)
    rng = random.Random(args.seed)
    uniform = Grouping("5x1", search_v=True)
    measured, held_out, measured_plans = [], [], []
    for index in range(args.plans):
        ratios = {name: round(rng.uniform(0.0, 0.5), 3) for name in uniform.groups(shapes, args.method)}
        sample = session.plan(ranks_from_ratios(uniform.groups(shapes, args.method), ratios),
                              grouping={**uniform.to_dict(), "values": ratios, "budget": None})
        seconds, evaluated = _timed(lambda: session.evaluate(sample))
        predicted = estimator.estimate(sample.ranks)
        row = {"ratios": ratios, "decoder_reduction": round(count_parameters(shapes, args.method,
                                                                             sample.ranks).decoder_reduction, 4),
               "measured": {k: evaluated.metrics[k] for k in ("perplexity", "kl_forward", "kl_reverse")},
               "evaluate_s": round(seconds, 2)}
        if not isinstance(predicted, NoEstimate):
            row["predicted"] = {"perplexity": predicted.perplexity, "kl_forward": predicted.kl_forward,
                                "kl_reverse": predicted.kl_reverse,
                                "plain_perplexity": predicted.additive["perplexity"]}
            held_out.append(predicted.perplexity / evaluated.metrics["perplexity"] - 1)
        measured.append(row)
        measured_plans.append((f"bench plan {index}", evaluated.to_dict()))
    with_plans = stored_estimator(store, shapes, args.method, texts, None, saved + measured_plans)
    assert isinstance(with_plans, QualityEstimator)

    path = write_json("live_estimate", {
        "model": args.model, "method": args.method, "texts": texts.to_dict(), "cache": str(store.cache_dir),
        "allocation": "5x1, every group at 0.2, v dense (the Allocate page's default)",
        "stored": {"sweep_points": len(store.sensitivity_points(sweep_id(session))),
                   "evaluations_in_fit": estimate.n_fit, "saved_plans": len(saved)},
        "estimate": {"perplexity": estimate.perplexity, "kl_forward": estimate.kl_forward,
                     "kl_reverse": estimate.kl_reverse, "plain_perplexity": estimate.additive["perplexity"],
                     "measured_perplexity": full.metrics["perplexity"]},
        "estimate_latency_s": {"median": round(statistics.median(latencies), 4), "max": round(max(latencies), 4),
                               "rounds": args.rounds},
        "quick": {"windows": len(indices), "of_windows": texts.evaluation_windowing.n_windows,
                  "cold_s": round(quick_cold, 3), "warm_s": round(quick_warm, 3),
                  "original_measured_s": round(original_quick_s, 3), "perplexity": quick.perplexity,
                  "original_perplexity_same_windows": original_quick.perplexity},
        "full": {"cold_s": round(full_cold, 3), "warm_s": round(full_warm, 3),
                 "perplexity": full.metrics["perplexity"]},
        "quick_over_full_warm": round(quick_warm / full_warm, 4),
        "leave_one_out_stored": {"corrected": _errors(estimator.leave_one_out()),
                                 "plain_sum": _errors(estimator.leave_one_out(corrected=False))},
        "random_plans": measured,
        "held_out_rms_perplexity_error": round(math.sqrt(sum(e * e for e in held_out) / len(held_out)), 4)
        if held_out else None,
        "leave_one_out_with_random_plans": {"corrected": _errors(with_plans.leave_one_out()),
                                            "plain_sum": _errors(with_plans.leave_one_out(corrected=False))},
        "peak_rss_mib": round(peak_rss_mib(), 1),
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
