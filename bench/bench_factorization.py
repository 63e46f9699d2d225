"""Benchmark of the feature-pca, whiten and svd factorisations against plain loops; writes bench/results/factorization.json.

On the converted default model (smollm2-135m, read from the project cache, never written) with
calibration statistics computed here (16 windows of 512 tokens of war-and-peace, 16 groups, in a
temporary RANKSCOPE_CACHE), each round times, alternating which goes first, a plain per-linear
loop written below (today's code: eigh of the d_out × d_out `W C Wᵀ`; Cholesky of E[xxᵀ] + SVD
of `W S`; SVD of `W`; float64) and the engine's method, at torch's default threads. Reported per
method: wall and CPU seconds of every round, the ratio engine/plain (median over rounds; target
≤ 0.3 for feature-pca and whiten), the load average around each timing (the machine may be
shared), and the max difference of the rank-r weights `B_r A_r` (and feature-pca's bias terms)
between the two at a few fractions of full rank. svd is the control: same maths, so its ratio is
what the engine's use of the cores alone buys. A last round at one thread on a few layers gives
the algorithmic ratio, without threads.
Run: `.venv/bin/python bench/bench_factorization.py [--rounds 2] [--model DIR] [--statistics FILE]`.
"""

from __future__ import annotations

import argparse
import os
import statistics as stats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import peak_rss_mib, write_json  # noqa: E402
from engine.paths import PROJECT_ROOT  # noqa: E402

METHODS_TIMED = ("feature-pca", "whiten", "svd")
TARGET = {"feature-pca": 0.3, "whiten": 0.3}
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
SINGLE_THREAD_LAYERS = (0, 10, 20, 29)


def _default_model_dir() -> Path:
    return Path(os.environ.get("RANKSCOPE_CACHE", PROJECT_ROOT / "cache")) / "models" / "smollm2-135m"


# --- the plain loops: today's straightforward per-linear code, float64 ---------------------------

def plain_feature_pca(loaded, statistics) -> dict:
    from engine.methods.base import as_factors

    factors = {}
    for ref in loaded.linears():
        site = statistics.site(ref.layer, ref.site)
        w = ref.module.weight.detach().to(torch.float64)  # [d_out, d_in]
        _, vectors = torch.linalg.eigh(w @ site.pooled_covariance @ w.T)  # [d_out, d_out], ascending
        U = vectors.flip(1)[:, : min(w.shape)]
        w_mu = w @ site.mean
        factors[ref.path] = as_factors(U, U.T @ w, bias_shift=w_mu, bias_coeff=U.T @ w_mu)
    return factors


def _cholesky_with_ridge(matrix: torch.Tensor) -> torch.Tensor:
    """Today's `engine.methods.whiten.cholesky_with_ridge`, frozen here as the baseline."""
    scale = matrix.diagonal().mean().clamp_min(1e-30)
    ridge = 0.0
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(matrix + ridge * scale * torch.eye(matrix.shape[0], dtype=matrix.dtype))
        if int(info) == 0:
            return factor
        ridge = 1e-8 if ridge == 0.0 else ridge * 10
    raise ValueError("second moment is not positive definite even with a ridge of 1e-4")


def plain_whiten(loaded, statistics) -> dict:
    from engine.methods.base import as_factors

    factors = {}
    for ref in loaded.linears():
        S = _cholesky_with_ridge(statistics.site(ref.layer, ref.site).second_moment.to(torch.float64))
        w = ref.module.weight.detach().to(torch.float64)
        U, sigma, Vh = torch.linalg.svd(w @ S, full_matrices=False)
        factors[ref.path] = as_factors(U * sigma, torch.linalg.solve_triangular(S, Vh, upper=False, left=False))
    return factors


def plain_svd(loaded, statistics) -> dict:
    from engine.methods.base import as_factors

    factors = {}
    for ref in loaded.linears():
        U, sigma, Vh = torch.linalg.svd(ref.module.weight.detach().to(torch.float64), full_matrices=False)
        factors[ref.path] = as_factors(U * sigma, Vh)
    return factors


PLAIN = {"feature-pca": plain_feature_pca, "whiten": plain_whiten, "svd": plain_svd}


def _engine(method: str):
    from engine.methods import METHODS

    return lambda loaded, statistics: METHODS[method].factorize(loaded, statistics).factors


class _Layers:
    """The linears of some layers of a loaded model (what a method reads of `loaded`)."""

    def __init__(self, loaded, layers):
        self.refs = [ref for ref in loaded.linears() if ref.layer in layers]

    def linears(self):
        return iter(self.refs)


def _timed(fn, *args) -> dict:
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return {"result": result, "wall_s": round(time.perf_counter() - wall, 3),
            "cpu_s": round(time.process_time() - cpu, 3), "load_1min_before": round(load, 2)}


def _alternate(loaded, statistics, method: str, rounds: int) -> tuple[list, list, dict, dict]:
    """Rounds of (plain, engine), the first of each pair alternating; returns timings and last factors."""
    plain, engine, last = [], [], {}
    for index in range(rounds):
        order = ("plain", "engine") if index % 2 == 0 else ("engine", "plain")
        for who in order:
            run = _timed(PLAIN[method] if who == "plain" else _engine(method), loaded, statistics)
            last[who] = run.pop("result")
            (plain if who == "plain" else engine).append(run)
            print(f"  {method:12s} round {index} {who:6s} {run['wall_s']:8.2f} s wall {run['cpu_s']:8.2f} s cpu "
                  f"load {run['load_1min_before']}", flush=True)
    return plain, engine, last["plain"], last["engine"]


@torch.no_grad()
def _differences(loaded, plain: dict, engine: dict) -> dict:
    """Max over linears of max |W_r(engine) − W_r(plain)| (absolute and / max|W|) at fractions of full rank."""
    out = {f"{fraction:g}": {"abs": 0.0, "rel": 0.0} for fraction in FRACTIONS}
    bias = {f"{fraction:g}": 0.0 for fraction in FRACTIONS}
    for ref in loaded.linears():
        f, g = plain[ref.path], engine[ref.path]
        scale = ref.module.weight.detach().abs().max().item()
        total = min(ref.shape)
        w_f = torch.zeros(ref.shape, dtype=torch.float64)
        w_g = torch.zeros(ref.shape, dtype=torch.float64)
        done = 0
        for fraction in FRACTIONS:  # W_r grown block by block: one full product per linear
            r = max(1, round(fraction * total))
            w_f += f.B[:, done:r].double() @ f.A[done:r].double()
            w_g += g.B[:, done:r].double() @ g.A[done:r].double()
            done = r
            diff = (w_f - w_g).abs().max().item()
            entry = out[f"{fraction:g}"]
            entry["abs"], entry["rel"] = max(entry["abs"], diff), max(entry["rel"], diff / scale)
            if f.bias_shift is not None:
                delta = (f.bias_delta(r).double() - g.bias_delta(r).double()).abs().max().item()
                bias[f"{fraction:g}"] = max(bias[f"{fraction:g}"], delta / max(f.bias_shift.abs().max().item(), 1e-30))
    result = {"rank_weights_max_diff": {k: {"abs": float(f"{v['abs']:.3g}"), "rel_to_max_abs_w": float(f"{v['rel']:.3g}")}
                                        for k, v in out.items()}}
    if any(bias.values()):
        result["bias_delta_max_diff_rel_to_max_abs_w_mu"] = {k: float(f"{v:.3g}") for k, v in bias.items()}
    return result


def _summary(plain: list, engine: list) -> dict:
    ratios = [e["wall_s"] / p["wall_s"] for p, e in zip(plain, engine)]
    cpu_ratios = [e["cpu_s"] / p["cpu_s"] for p, e in zip(plain, engine)]
    return {"plain": plain, "engine": engine,
            "plain_median_s": round(stats.median(p["wall_s"] for p in plain), 2),
            "engine_median_s": round(stats.median(e["wall_s"] for e in engine), 2),
            "ratio_median": round(stats.median(e["wall_s"] for e in engine) / stats.median(p["wall_s"] for p in plain), 3),
            "ratio_per_round": [round(r, 3) for r in ratios], "cpu_ratio_per_round": [round(r, 3) for r in cpu_ratios]}


def _statistics(loaded, path: str | None):
    from safetensors.torch import load_file, save_file

    from engine.calibration import CalibrationStatistics, collect_statistics
    from engine.texts.corpus import load_corpus
    from engine.texts.windows import Windowing, make_windows

    if path and Path(path).is_file():
        return CalibrationStatistics.from_tensors(load_file(path), 16), None
    windows = make_windows(load_corpus("war-and-peace"), loaded.tokenizer, Windowing(512, 16))  # [16, 512]
    start = time.perf_counter()
    statistics = collect_statistics(loaded.model, loaded.adapter, windows, n_groups=16)
    seconds = round(time.perf_counter() - start, 1)
    if path:
        save_file({k: v.contiguous() for k, v in statistics.to_tensors().items()}, path)
    return statistics, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating (plain, engine) rounds per method")
    parser.add_argument("--model", default=str(_default_model_dir()), help="converted default model directory")
    parser.add_argument("--statistics", help="safetensors file of the statistics: read if present, else written")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rankscope-bench-factorization-") as cache:
        os.environ["RANKSCOPE_CACHE"] = cache  # texts, datasets and the store go here, not in the project cache
        from engine.models.loading import load_model
        from engine.store import open_store

        store = open_store(Path(cache) / "rankscope.duckdb")
        loaded = load_model(args.model, store)
        statistics, calibration_s = _statistics(loaded, args.statistics)
        store.close()
        threads = torch.get_num_threads()
        print(f"statistics ready ({calibration_s} s); timing at {threads} threads", flush=True)
        methods = {}
        for method in METHODS_TIMED:
            plain, engine, plain_factors, engine_factors = _alternate(loaded, statistics, method, args.rounds)
            methods[method] = {**_summary(plain, engine), **_differences(loaded, plain_factors, engine_factors)}
            if method in TARGET:
                methods[method]["target_ratio"] = TARGET[method]
                methods[method]["meets_target"] = methods[method]["ratio_median"] <= TARGET[method]
        torch.set_num_threads(1)
        subset = _Layers(loaded, SINGLE_THREAD_LAYERS)
        single = {}
        for method in METHODS_TIMED:
            plain, engine, _, _ = _alternate(subset, statistics, method, 1)
            single[method] = _summary(plain, engine)
        torch.set_num_threads(threads)
    path = write_json("factorization", {
        "model": args.model, "linears": sum(1 for _ in loaded.linears()),
        "calibration": {"text": "war-and-peace", "windows": 16, "window_len": 512, "groups": 16,
                        "seconds": calibration_s, "read_from": args.statistics if calibration_s is None else None},
        "precision": "float64 decompositions and products (plain and engine), factors stored float32",
        "threads": threads, "rounds": args.rounds, "methods": methods,
        "single_thread": {"layers": list(SINGLE_THREAD_LAYERS), "methods": single},
        "peak_rss_mib": round(peak_rss_mib()),
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
