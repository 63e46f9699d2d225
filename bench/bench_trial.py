"""What a search trial costs against a bare forward pass of the compressed model. Writes bench/results/trial.json.

On the default model, a uniform 20% plan (svd factors: data-free, so no calibration is needed to time
it) is evaluated the way a study evaluates a trial (`CompressionSession.evaluate_ranks` on the
validation windows: slice the factors in, run the model, perplexity and exact KL in both directions
against the stored reference, restore), and, alternating in the same run, the same compressed model
only runs its forward pass over the same windows (`model(input_ids).logits`, nothing else). The
ratio trial / bare forward is the cost of the metrics (target: at most 1.05). The first trial is a
warm-up: it also turns the reference's hidden states into log-probabilities, which are then kept.
The machine may be shared, so each round times both, in alternating order (trial first in even
rounds), in wall and in process CPU seconds; the ratio reported is the median over rounds of each
round's own ratio (a burst of load hits both halves of a round alike), for wall and for CPU time.

Run: `.venv/bin/python bench/bench_trial.py [--windows 8] [--rounds 11]`.
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
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    store = open_store()
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    texts = TextSettings.of(evaluation_windows=args.windows)
    session = CompressionSession.open(store, loaded, "svd", texts, TerminalProgress())
    ranks, model, windows = session.uniform_plan(0.2).ranks, loaded.model, session.windows

    def trial() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        session.evaluate_ranks(ranks)
        return time.perf_counter() - start, time.process_time() - cpu

    @torch.no_grad()
    def bare() -> tuple[float, float]:
        compress_(model, ranks, session.factorization)
        try:
            start, cpu = time.perf_counter(), time.process_time()  # the forward passes only
            for index in range(windows.shape[0]):
                model(input_ids=windows[index : index + 1], use_cache=False).logits
            return time.perf_counter() - start, time.process_time() - cpu
        finally:
            restore_(model)

    trial()  # warm-up: the reference's log-probabilities are computed once and kept
    bare()
    pairs = []
    for round_index in range(args.rounds):
        if round_index % 2 == 0:
            t = trial()
            b = bare()
        else:
            b = bare()
            t = trial()
        pairs.append((t, b))
        print(f"round {round_index}: trial {t[0]:.3f} s ({t[1]:.3f} cpu), bare {b[0]:.3f} s ({b[1]:.3f} cpu)", flush=True)
    ratios = [t[0] / b[0] for t, b in pairs]
    cpu_ratios = [t[1] / b[1] for t, b in pairs]
    path = write_json("trial", {
        "model": "smollm2-135m", "method": "svd", "plan": "uniform 20%", "windows": args.windows,
        "window_len": windows.shape[1], "rounds": args.rounds, "order": "alternating, trial first in even rounds",
        "trial_s": [round(t[0], 3) for t, _ in pairs], "bare_forward_s": [round(b[0], 3) for _, b in pairs],
        "trial_cpu_s": [round(t[1], 3) for t, _ in pairs], "bare_forward_cpu_s": [round(b[1], 3) for _, b in pairs],
        "ratio_per_round": [round(r, 4) for r in ratios], "cpu_ratio_per_round": [round(r, 4) for r in cpu_ratios],
        "ratio_median": round(statistics.median(ratios), 4), "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4), "cpu_ratio_median": round(statistics.median(cpu_ratios), 4),
        "target": 1.05, "meets_target": statistics.median(ratios) <= 1.05,
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
