"""How low a 5x1 plan can go when the search sees the evaluation text itself: the ceiling of issue #15's 5x1 goal.

The studies of bench/search_goals.py never see the evaluation windows (they score plans on validation windows and
are judged on the evaluation windows). This bench does the opposite on purpose: it scores 5x1 plans (v dense) by
their perplexity on the evaluation windows themselves and minimises it with scikit-optimize's `gp_minimize`
(expected improvement), started from the plans the goals studies chose, greedy and the global allocation's
nearest 5x1 point. Its best is therefore not a result of the search (it has seen the answer) but an estimate of the
best any 5x1 plan can do on those windows: if it stays above the goal (2% below greedy), no held-out 5x1 search can
meet the goal either, and what is left is the search space, not the optimiser.

Needs the cache of `bench/search_goals.py` (the per-type sweep and its 5x1 studies). Run:
`.venv/bin/python bench/search_ceiling.py [--calls 30] [--local-calls 30]` (about 12 s a plan here);
writes bench/results/search_ceiling.json and docs/search-ceiling.md (`--render-only` rewrites the doc).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import rendered_from_stored, write_json  # noqa: E402
from bench.search_goals import COMMON, GREEDY_MARGIN, SEEDS, SWEEP_RATIOS, study_name  # noqa: E402
from engine.compression.grouping import MAX_RATIO, budget_target, project_to_budget  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.compression.sweep import sweep_id  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.search.baselines import global_allocation, greedy_ratios  # noqa: E402
from engine.search.duckdb_storage import DuckDBStudyStorage  # noqa: E402
from engine.search.runner import factor_energies  # noqa: E402
from engine.search.settings import StudySettings  # noqa: E402
from engine.search.summary import best_trial, trial_values  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "search-ceiling.md"
NAME = "search_ceiling"
INITIAL_STEP, MIN_STEP = 0.04, 0.01  # the pattern search's moves, in group ratio


def main(calls: int, local_calls: int) -> None:
    from skopt import gp_minimize
    from skopt.space import Real

    store = open_store()
    storage = DuckDBStudyStorage(store)
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    session = CompressionSession.open(store, loaded, COMMON["method"], TextSettings(), TerminalProgress())
    shapes, method = session.shapes, session.method
    grouping = StudySettings(**COMMON, grouping="5x1").parsed_grouping()
    groups = grouping.search_dims(shapes, method)
    target = budget_target(shapes, COMMON["budget"])
    points = store.sensitivity_points(sweep_id(session))
    reference = session.reference.perplexity
    starts = {}
    greedy = greedy_ratios(shapes, method, grouping, COMMON["budget"], points, reference)
    if greedy is not None:
        starts["greedy"] = greedy
    ranks = global_allocation(shapes, method, COMMON["budget"], points, reference, factor_energies(session.factorization))
    if ranks is not None:
        starts["global (nearest 5x1 point)"] = trial_values(shapes, method, grouping, ranks, None)
    for seed in SEEDS:
        name = study_name("5x1", seed)
        if storage.get_study(name) is not None and best_trial(storage, name) is not None:
            starts[f"{name}'s choice"] = dict(best_trial(storage, name).projected)
    if not starts:
        sys.exit("No starting plans: run bench/search_goals.py first (it runs the sweep and the 5x1 studies).")

    evaluations: list[dict] = []
    seen: dict[str, float] = {}

    def perplexity_of(x) -> float:
        values = {g: float(min(MAX_RATIO, max(0.0, v))) for g, v in zip(groups, x)}
        ranks, projected = project_to_budget(shapes, method, grouping, values, target)
        key = json.dumps(ranks, sort_keys=True)
        if key not in seen:
            start = time.perf_counter()
            result = session.evaluate_ranks(ranks)
            seen[key] = result.perplexity
            evaluations.append({"projected": projected, "perplexity": result.perplexity, "kl_forward": result.kl_forward,
                                "kl_reverse": result.kl_reverse, "seconds": time.perf_counter() - start})
            print(f"{len(evaluations):>3}: perplexity {result.perplexity:.3f}  "
                  + ", ".join(f"{g} {v:.3f}" for g, v in projected.items()), flush=True)
        return math.log(seen[key])

    x0 = [[float(values.get(g, 0.0)) for g in groups] for values in starts.values()]
    gp_minimize(perplexity_of, [Real(0.0, MAX_RATIO, name=g) for g in groups], x0=x0, n_calls=calls + len(x0),
                n_initial_points=0, acq_func="EI", random_state=0)
    global_calls = len(evaluations)
    # then a pattern search around the best: each coordinate moved by ±step (the projection keeps the budget), a move
    # kept when it lowers the perplexity, the step halved when no move does, until it falls below MIN_STEP
    step = INITIAL_STEP
    while step >= MIN_STEP and len(evaluations) < global_calls + local_calls:
        centre = [float(min(evaluations, key=lambda e: e["perplexity"])["projected"][g]) for g in groups]
        base = perplexity_of(centre)
        moved = False
        for i in range(len(groups)):
            for sign in (1, -1):
                x = list(centre)
                x[i] = min(MAX_RATIO, max(0.0, x[i] + sign * step))
                if perplexity_of(x) < base - 1e-9:
                    moved = True
                    break
            if moved:
                break
        step = step if moved else step / 2
    start_perplexity = {label: math.exp(perplexity_of([float(v.get(g, 0.0)) for g in groups]))
                        for label, v in starts.items()}
    best = min(evaluations, key=lambda e: e["perplexity"])
    path = write_json(NAME, {"calls": calls, "global_calls": global_calls, "local_calls": len(evaluations) - global_calls,
                             "initial_step": INITIAL_STEP, "min_step": MIN_STEP,
                             "sweep_ratios": list(SWEEP_RATIOS), "starts": start_perplexity,
                             "best": best, "evaluations": evaluations,
                             "original_perplexity": session.original_quality()["perplexity"]})
    DOC.write_text(render(json.loads(path.read_text())))
    print(f"wrote {path} and {DOC}")


def render(p: dict) -> str:
    env, best = p["environment"], p["best"]
    greedy = p["starts"].get("greedy")
    goal = None if greedy is None else greedy * (1 - GREEDY_MARGIN)
    lines = [
        "# How low 5x1 can go on the evaluation text itself",
        "",
        "Generated by `.venv/bin/python bench/search_ceiling.py` (do not edit by hand; rerun it).",
        f"Measured {env['measured_at'][:16]} UTC, RankScope {env['engine_version']}, {env['threads']} torch threads.",
        "",
        "SmolLM2-135M, feature-pca, 20% of decoder-linear parameters removed, 5x1 grouping (v dense), as in "
        "[search-goals.md](search-goals.md). Unlike those studies, this search scores plans by their perplexity on "
        "the evaluation windows themselves: scikit-optimize's `gp_minimize` (expected improvement, "
        f"{p['calls']} calls after its starting plans), then a pattern search around the best plan (each group's "
        f"ratio moved by ±{p['initial_step']} onto the budget, a move kept when it lowers the perplexity, the step "
        f"halved when none does, down to {p['min_step']}; {p['local_calls']} new plans). Its best is not a search "
        "result but an estimate of the best 5x1 plan on those windows: a held-out search cannot be expected to beat "
        "it.",
        "",
        "| plan | perplexity on the evaluation windows |",
        "|---|---|",
    ]
    for label, perplexity in p["starts"].items():
        lines.append(f"| start: {label} | {perplexity:.3f} |")
    lines.append(f"| best of {len(p['evaluations'])} plans evaluated | {best['perplexity']:.3f} |")
    if goal is not None:
        lines.append(f"| the 5x1 goal: {GREEDY_MARGIN:.0%} below greedy | {goal:.3f} |")
    lines += ["", "Best plan's group ratios: " + ", ".join(f"{g} {v:.3f}" for g, v in best["projected"].items()) + ".",
              ""]
    if goal is not None:
        verdict = ("reaches the goal: a held-out search could too" if best["perplexity"] <= goal else
                   f"stays {best['perplexity'] / goal - 1:.1%} above the goal: even with the answer in view, no 5x1 "
                   "plan (v dense) at this budget was found that meets it, so a search scored on held-out windows "
                   "should not be expected to")
        lines += [f"The best 5x1 plan found with the evaluation text in view {verdict}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if "--render-only" in sys.argv:
        rendered_from_stored(NAME, render, DOC)
    else:
        main(int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 30,
             int(sys.argv[sys.argv.index("--local-calls") + 1]) if "--local-calls" in sys.argv else 30)
