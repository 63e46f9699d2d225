"""The GPU path against the CPU: calibration statistics and evaluations of the default model on `cuda` in float32
and bfloat16, compared with the same work on the CPU in float32. Writes bench/results/gpu.json.

Where PyTorch sees no CUDA GPU it prints "no CUDA GPU visible: nothing measured", writes nothing (an earlier GPU
measurement is kept) and exits 0.

Per placement (cpu float32, cuda float32, cuda bfloat16): the seconds of `collect_statistics` over the first
`--calibration-windows` windows of War and Peace, and of the original model's perplexity and a compressed model's
(svd, every linear at half its rank) on `--eval-windows` windows of Sherlock Holmes. Against the CPU: the largest
relative (Frobenius) difference of each site's second moment and pooled covariance, and the relative difference of
each perplexity. Expected: float32 on the GPU within about 1e-5 of the CPU (rounding only: TF32 stays off);
bfloat16 within a few percent.

Run: `.venv/bin/python bench/bench_gpu.py [--calibration-windows 16] [--eval-windows 8]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_json  # noqa: E402

NOTHING = "no CUDA GPU visible: nothing measured"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _half_ranks(loaded) -> dict:
    """Every decoder linear at half its full rank, a multiple of 8."""
    return {ref.path: max(8, min(ref.shape) // 2 // 8 * 8) for ref in loaded.linears()}


def _synchronize(placement) -> None:
    if placement.device.startswith("cuda"):
        torch.cuda.synchronize(placement.device)


def measure(placement, calibration_windows: torch.Tensor, eval_windows: torch.Tensor) -> dict:
    """Statistics and perplexities of the default model on one placement, with their seconds."""
    from engine.calibration import collect_statistics
    from engine.compression.lowrank import compress_, restore_
    from engine.methods import METHODS
    from engine.metrics import evaluate_perplexity
    from engine.models.loading import load_model
    from engine.store import open_store

    loaded = load_model("smollm2-135m", open_store(), placement=placement)
    out: dict = {"device": placement.device, "dtype": placement.dtype}
    _synchronize(placement)
    start = time.perf_counter()
    statistics = collect_statistics(loaded.model, loaded.adapter, calibration_windows, n_groups=4)
    _synchronize(placement)
    out["calibration_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    out["perplexity"] = evaluate_perplexity(loaded.model, eval_windows).perplexity
    _synchronize(placement)
    out["evaluation_s"] = round(time.perf_counter() - start, 3)
    factorization = METHODS["svd"].factorize(loaded, None)  # float64 on the CPU whatever the placement
    compress_(loaded.model, _half_ranks(loaded), factorization)
    try:
        out["compressed_perplexity"] = evaluate_perplexity(loaded.model, eval_windows).perplexity
    finally:
        restore_(loaded.model)
    del loaded
    if placement.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"summary": out, "statistics": statistics.without_stored_form()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(NOTHING)
        return 0
    from engine.models.device import resolve_placement
    from engine.texts.corpus import load_corpus
    from engine.texts.windows import Windowing, make_windows
    from engine.models.loading import load_model
    from engine.store import open_store

    tokenizer = load_model("smollm2-135m", open_store()).tokenizer
    calibration = make_windows(load_corpus("war-and-peace"), tokenizer, Windowing(512, args.calibration_windows))
    evaluation = make_windows(load_corpus("sherlock-holmes"), tokenizer, Windowing(512, args.eval_windows))
    runs = {name: measure(resolve_placement(device, dtype), calibration, evaluation)
            for name, (device, dtype) in {"cpu-float32": ("cpu", "float32"), "cuda-float32": ("cuda", "float32"),
                                          "cuda-bfloat16": ("cuda", "bfloat16")}.items()}
    cpu = runs["cpu-float32"]
    results = {}
    for name, run in runs.items():
        summary = dict(run["summary"])
        if name != "cpu-float32":
            keys = list(cpu["statistics"].sites)
            summary["second_moment_max_rel_diff"] = max(
                _relative(run["statistics"].sites[k].second_moment, cpu["statistics"].sites[k].second_moment) for k in keys)
            summary["pooled_covariance_max_rel_diff"] = max(
                _relative(run["statistics"].sites[k].pooled_covariance, cpu["statistics"].sites[k].pooled_covariance)
                for k in keys)
            for metric in ("perplexity", "compressed_perplexity"):
                summary[f"{metric}_rel_diff"] = abs(summary[metric] - cpu["summary"][metric]) / cpu["summary"][metric]
        results[name] = summary
        print(name, summary)
    path = write_json("gpu", {"gpu": torch.cuda.get_device_name(0), "calibration_windows": args.calibration_windows,
                              "eval_windows": args.eval_windows, "window_len": 512, "runs": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
