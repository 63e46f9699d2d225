"""Benchmark of export and reload on the default model; writes bench/results/export.json.

Plan: feature-pca, every decoder linear at a uniform 20% reduction (projected onto that budget).
- export_s: the whole `export_compressed` call (writing, both reloads, re-evaluation, generation timing);
- files / weights_bytes / original_weights_bytes: what was written, and the original's safetensors size;
- size_saving_vs_plan: (original bytes − export bytes) / (bytes of the parameters the plan removes, net of the
  biases feature-pca adds); the issue's target is 1 ± 0.02;
- reload: the self-check results (logits max abs diff per reload path, parameter counts, perplexity) and the
  time of `load_compressed` and of `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`;
- generation: batch-1 greedy tokens/s of original and compressed (median of --runs after a warm-up).
Run: `.venv/bin/python bench/bench_export.py [--windows N] [--runs N] [--out DIR]` (the export is written to a
temporary folder and deleted unless --out is given).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import peak_rss_mib, timed, write_json  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402
from engine.export import export_compressed, load_compressed  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.windows import Windowing  # noqa: E402

MODEL, METHOD, REDUCTION = "smollm2-135m", "feature-pca", 0.2
BYTES_PER_PARAMETER = 4  # exports and the converted original are float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--runs", type=int, default=5, help="timed generation runs per model (median reported)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--out", type=Path, default=None, help="keep the export here (default: a deleted temp folder)")
    args = parser.parse_args()

    store = open_store()
    loaded = load_model(MODEL, store, TerminalProgress())
    session = CompressionSession.open(store, loaded, METHOD, TextSettings(evaluation_windowing=Windowing(512, args.windows)),
                                      TerminalProgress())
    plan = session.uniform_plan(REDUCTION)
    with tempfile.TemporaryDirectory(prefix="rankscope-bench-export-") as scratch:
        out = args.out or Path(scratch) / "smollm2-fpca-20"
        timings: dict = {}
        with timed(timings, "export_s"):
            report = export_compressed(session, plan, out, progress=TerminalProgress(), max_new_tokens=args.new_tokens,
                                       timing_runs=args.runs, overwrite=args.out is not None)  # --out: a rerun replaces
        with timed(timings, "load_compressed_s"):
            load_compressed(out)
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
        timings["transformers_from_pretrained_s"] = round(time.perf_counter() - start, 4)

    p = report.parameters
    removed = p["total"]["dense"] - (p["total"]["compressed"] + p["added_bias"])  # net of feature-pca's new biases
    saving = None
    if report.original_weights_bytes:
        saving = (report.original_weights_bytes - report.weights_bytes) / (BYTES_PER_PARAMETER * removed)
    speed = {k: asdict(v) for k, v in report.speed.items()}
    path = write_json("export", {
        "model": MODEL, "method": METHOD, "plan": f"uniform {REDUCTION:.0%} decoder-linear reduction",
        "timings": timings, "files": report.files, "weights_bytes": report.weights_bytes,
        "original_weights_bytes": report.original_weights_bytes,
        "size_ratio": round(report.weights_bytes / report.original_weights_bytes, 5) if report.original_weights_bytes else None,
        "size_saving_vs_plan": None if saving is None else round(saving, 5),
        "size_saving_within_2_percent": None if saving is None else abs(saving - 1) <= 0.02,
        "parameters": p, "quality": report.quality, "evaluation": report.evaluation,
        "reload": {"passed": report.passed, "logits_max_abs_diff": report.logits_max_abs_diff,
                   "checks": [asdict(c) for c in report.checks]},
        "generation": {"speed": speed,
                       "speedup": round(speed["compressed"]["tokens_per_second"] / speed["original"]["tokens_per_second"], 4),
                       "side_by_side": asdict(report.generation)},
        "peak_rss_mib": round(peak_rss_mib()),
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
