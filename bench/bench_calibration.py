"""Calibration statistics: the engine against a plain float64 loop, in the same run. Writes bench/results/calibration.json.

On the default model and the first `--windows` windows of 512 tokens of War and Peace, alternating:
- plain: one window per forward pass, forward pre-hooks on the four input sites of every layer, each
  window's `XᵀX` in float64 added to float64 sums (with a second sum for the pooled covariance), as
  RankScope 0.1.0 did;
- engine: `engine.calibration.collect_statistics` (several windows per forward pass, one float32
  `(X − s)ᵀ(X − s)` per batch into float64 sums, `s` a per-site shift, `Σ x xᵀ` recovered in float64, the pooled
  covariance derived from per-group-size sums).
Reports the time ratio engine / plain (target: at most 0.5) and the largest relative (Frobenius)
difference of every statistic between the two (target: at most 1e-6).

Run: `.venv/bin/python bench/bench_calibration.py [--windows 16] [--rounds 2]` (a quick check: `--windows 4
--rounds 1`; the plain loop runs one window per forward pass, so this is slow on a busy machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_rss_mib, write_json  # noqa: E402
from engine.calibration import CalibrationStatistics, SiteStatistics, collect_statistics, group_assignment  # noqa: E402
from engine.models.adapters import SITES  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.corpus import load_corpus  # noqa: E402
from engine.texts.windows import Windowing, make_windows  # noqa: E402

GROUPS = 4
NAMES = ("mean", "second_moment", "covariance", "pooled_covariance", "l2_norm")


@torch.no_grad()
def plain_statistics(loaded, windows: torch.Tensor, n_groups: int) -> CalibrationStatistics:
    """The straightforward loop: float64 products window by window, every sum kept separately."""
    model, adapter = loaded.model, loaded.adapter
    n_windows, window_len = windows.shape
    groups = group_assignment(n_windows, n_groups)
    sizes = [groups.count(g) * window_len for g in range(n_groups)]
    sums: dict = {}
    current = {"group": 0}

    def hook_for(key):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # [T, d]
            d = x.shape[1]
            acc = sums.setdefault(key, {"x": torch.zeros(d, dtype=torch.float64),
                                        "xxT": torch.zeros(d, d, dtype=torch.float64),
                                        "pooled": torch.zeros(d, d, dtype=torch.float64),
                                        "group_x": torch.zeros(n_groups, d, dtype=torch.float64), "n": 0})
            xxT = x.T @ x
            g = current["group"]
            acc["xxT"] += xxT
            acc["pooled"] += xxT / (sizes[g] - 1)
            acc["x"] += x.sum(0)
            acc["group_x"][g] += x.sum(0)
            acc["n"] += x.shape[0]
        return hook

    handles = [adapter.site_module(model, layer, site).register_forward_pre_hook(hook_for((layer, site)))
               for layer in range(adapter.num_layers(model)) for site in SITES]
    try:
        for index in range(n_windows):
            current["group"] = groups[index]
            model.get_decoder()(input_ids=windows[index : index + 1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    sites = {}
    size_t = torch.tensor(sizes, dtype=torch.float64)
    for key, acc in sums.items():
        scaled = acc["group_x"] / torch.sqrt(size_t * (size_t - 1)).unsqueeze(1)
        sites[key] = SiteStatistics(mean=acc["x"] / acc["n"], second_moment=acc["xxT"] / acc["n"],
                                    pooled_covariance=(acc["pooled"] - scaled.T @ scaled) / n_groups,
                                    l2_norm=torch.sqrt(torch.diagonal(acc["xxT"]).clone()), n_tokens=acc["n"])
    return CalibrationStatistics(sites, n_groups)


def worst_difference(a: CalibrationStatistics, b: CalibrationStatistics) -> dict[str, float]:
    return {name: max(float(torch.linalg.norm(getattr(a.site(*k), name) - getattr(s, name))
                            / torch.linalg.norm(getattr(s, name))) for k, s in b.sites.items()) for name in NAMES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    store = open_store()
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    windows = make_windows(load_corpus("war-and-peace"), loaded.tokenizer, Windowing(512, args.windows))
    times: dict[str, list[float]] = {"plain": [], "engine": []}
    results = {}
    for _ in range(args.rounds):
        for name, run in (("plain", lambda: plain_statistics(loaded, windows, GROUPS)),
                          ("engine", lambda: collect_statistics(loaded.model, loaded.adapter, windows, GROUPS))):
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    ratios = [e / p for e, p in zip(times["engine"], times["plain"])]
    path = write_json("calibration", {
        "model": "smollm2-135m", "windows": args.windows, "window_len": 512, "groups": GROUPS,
        "plain_s": [round(t, 2) for t in times["plain"]], "engine_s": [round(t, 2) for t in times["engine"]],
        "ratio_median": round(statistics.median(ratios), 3), "target_ratio": 0.5,
        "max_relative_difference": worst_difference(results["engine"], results["plain"]), "target_difference": 1e-6,
        "peak_rss_mib": round(peak_rss_mib()),
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
