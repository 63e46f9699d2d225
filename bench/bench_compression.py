"""Benchmark of the compression engine on the default model; writes bench/results/compression.json.

- factorise_s: time to factorise every decoder linear, per method (computed afresh, not read back);
- apply_s: time of `compress_` + `restore_` for a uniform 20% plan (median of 20);
- evaluate_s: one evaluation pass of the compressed model over the evaluation windows;
- trial_overhead: (apply + evaluate) / evaluate of the same compressed model (target <= 1.10);
- peak_rss_mib: peak resident memory of the process.
Run: `.venv/bin/python bench/bench_compression.py [--windows N]` (default 16 windows of 512).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_rss_mib, write_json  # noqa: E402
from engine.compression.lowrank import compress_, restore_  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402
from engine.methods import METHODS  # noqa: E402
from engine.metrics import evaluate_quality  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.windows import Windowing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--methods", default="svd,joint-svd,awsvd,feature-pca,whiten")
    args = parser.parse_args()
    store = open_store()
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    texts = TextSettings(evaluation_windowing=Windowing(512, args.windows))
    factorise = {}
    overhead = None
    for method in args.methods.split(","):
        session = CompressionSession.open(store, loaded, method, texts, TerminalProgress())
        spec = METHODS[method]
        start = time.perf_counter()
        spec.factorize(loaded, session.calibration.statistics if spec.needs else None)
        factorise[method] = round(time.perf_counter() - start, 2)
        if method == "feature-pca":
            plan = session.uniform_plan(0.2)
            applies = []
            for _ in range(20):
                start = time.perf_counter()
                compress_(loaded.model, plan.ranks, session.factorization)
                restore_(loaded.model)
                applies.append(time.perf_counter() - start)
            apply_s = statistics.median(applies)
            compress_(loaded.model, plan.ranks, session.factorization)
            start = time.perf_counter()
            evaluate_quality(loaded.model, session.windows, session.reference)
            evaluate_s = time.perf_counter() - start
            restore_(loaded.model)
            start = time.perf_counter()
            session.evaluate_ranks(plan.ranks)  # a whole trial: apply, evaluate, restore
            trial_s = time.perf_counter() - start
            overhead = {"plan": "feature-pca uniform 20%", "apply_s": round(apply_s, 5),
                        "evaluate_s": round(evaluate_s, 3), "trial_s": round(trial_s, 3),
                        "trial_overhead": round((apply_s + evaluate_s) / evaluate_s, 4),
                        "evaluation_windows": args.windows}
    path = write_json("compression", {"model": "smollm2-135m", "factorise_s": factorise, "trial": overhead,
                                      "peak_rss_mib": round(peak_rss_mib())})
    print(path.read_text())


if __name__ == "__main__":
    main()
