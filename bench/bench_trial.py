"""What a search trial costs against a bare forward pass of the compressed model. Writes bench/results/trial.json.

On the default model, a uniform 20% plan (svd factors: data-free, so no calibration is needed to time
it) is evaluated the way a study evaluates a trial (`CompressionSession.evaluate_ranks` on the
validation windows: slice the factors in, run the model, perplexity and exact KL in both directions
against the stored reference, restore), and, alternating in the same run, the same compressed model
only runs its forward pass over the same windows (`model(input_ids).logits`, nothing else). The
ratio trial / bare forward is the cost of the metrics (target: at most 1.05). The first trial is a
warm-up: it also turns the reference's hidden states into log-probabilities, which are then kept.

Run: `.venv/bin/python bench/bench_trial.py [--windows 8] [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_json  # noqa: E402
from engine.compression.lowrank import compress_, restore_  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="windows per trial (a study's validation subset: 8)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    store = open_store()
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    texts = TextSettings.of(evaluation_windows=args.windows)
    session = CompressionSession.open(store, loaded, "svd", texts, TerminalProgress())
    ranks, model, windows = session.uniform_plan(0.2).ranks, loaded.model, session.windows

    def trial() -> float:
        start = time.perf_counter()
        session.evaluate_ranks(ranks)
        return time.perf_counter() - start

    @torch.no_grad()
    def bare() -> float:
        compress_(model, ranks, session.factorization)
        try:
            start = time.perf_counter()
            for index in range(windows.shape[0]):
                model(input_ids=windows[index : index + 1], use_cache=False).logits
            return time.perf_counter() - start
        finally:
            restore_(model)

    trial()  # warm-up: the reference's log-probabilities are computed once and kept
    bare()
    pairs = [(trial(), bare()) for _ in range(args.rounds)]
    ratios = [t / b for t, b in pairs]
    path = write_json("trial", {
        "model": "smollm2-135m", "method": "svd", "plan": "uniform 20%", "windows": args.windows,
        "window_len": windows.shape[1], "rounds": args.rounds,
        "trial_s": [round(t, 3) for t, _ in pairs], "bare_forward_s": [round(b, 3) for _, b in pairs],
        "ratio_median": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4), "target": 1.05,
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
