"""Benchmark of export and reload on the default model; writes bench/results/export.json.

Plan: feature-pca, every decoder linear at a uniform 20% reduction (projected onto that budget), evaluated on the
evaluation windows first, as `rankscope compress --uniform 0.2 --save-plan P.json` writes it (its metrics are then
the ones the export compares its reload with; `plan_evaluation_s` is that evaluation, not part of any export).
- export: the whole `export_compressed` call (`export_s`) and its parts (`report.timings`, seconds: writing, the
  in-memory model's check-window logits, both reloads, the transformers reload's logits, the reload's evaluation,
  the side-by-side generation with its tokens/s timing, the model card and move), for that plan;
  By default the reload is proven by comparing its tensors bit for bit with those written (no evaluation on all
  windows);
- export_evaluating_reload: the same plan with `evaluate_reload=True` (the reload evaluated on every window and
  compared with the plan's record, the default before the bit-for-bit check), with `speedup_of_default` = its time / the
  default's; skipped with --skip-evaluating-reload;
- export_without_plan_metrics: the same for the plan without metrics (the in-memory model is then evaluated once
  too); skipped with --skip-unmeasured;
- old_path: the whole call of the export as it was at --old-commit (default f8090cb: two full evaluations, logits
  on two windows, a warm-up and 3 timed runs per model after the side-by-side generation), its writer and report
  modules loaded from git history into this process and run on the same session and plan, with `speedup` = its
  time / `export_s`; skipped with --skip-old or when git cannot show them;
- files / weights_bytes / original_weights_bytes: what was written, and the original's safetensors size;
- size_saving_vs_plan: (original bytes − export bytes) / (bytes of the parameters the plan removes, net of the
  biases feature-pca adds); the issue's target is 1 ± 0.02;
- reload: the self-check results (logits max abs diff per reload path, parameter counts, perplexity) and the
  time of `load_compressed` and of `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`;
- generation: batch-1 greedy tokens/s of original and compressed (1 / median seconds per decode step over --runs
  generations per model, the first being the side-by-side one; see engine/export/report.py).
Run: `.venv/bin/python bench/bench_export.py [--cache DIR] [--calibration-windows N --groups N] [--windows N]
[--runs N] [--out DIR]` (the exports are written to a temporary folder and deleted unless --out is given). With
--cache, everything (model conversion, calibration, factors, reference) lives in that folder, so the bench does
not touch the project cache; the export's time does not depend on the calibration size.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import peak_rss_mib, timed, write_json  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.export import export_compressed, load_compressed  # noqa: E402
from engine.export.report import DEFAULT_TIMING_RUNS  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.paths import choose_cache_root  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.texts.settings import DEFAULT_CALIBRATION_WINDOWS, DEFAULT_GROUPS, TextSettings  # noqa: E402
from engine.texts.windows import Windowing  # noqa: E402

MODEL, METHOD, REDUCTION = "smollm2-135m", "feature-pca", 0.2
BYTES_PER_PARAMETER = 4  # exports and the converted original are float32
OLD_COMMIT = "f8090cb"  # the export before issue #11's item 5 (each piece of work once)


def _old_export(commit: str):
    """`export_compressed` as it was at `commit`, loaded from git history (None, with the reason, if it cannot be).

    Its writer and report modules are both taken from `commit` (the report's tokens/s measurement changed too);
    everything else is today's."""
    modules = {}
    for name in ("report", "writer"):
        try:
            source = subprocess.run(["git", "show", f"{commit}:engine/export/{name}.py"], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            return None, f"git show {commit}:engine/export/{name}.py failed: {exc}"
        source = source.replace("from engine.export.report import", "from engine.export._report_before import")
        spec = importlib.util.spec_from_loader(f"engine.export._{name}_before", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up; the writer imports the report
        exec(compile(source, f"{commit}:engine/export/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["writer"].export_compressed, None


def _timed_export(function, session, plan, out: Path, **options) -> tuple[float, object]:
    start = time.perf_counter()
    report = function(session, plan, out, progress=TerminalProgress(), **options)
    return round(time.perf_counter() - start, 3), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $RANKSCOPE_CACHE or ./cache)")
    parser.add_argument("--calibration-windows", type=int, default=DEFAULT_CALIBRATION_WINDOWS,
                        help="calibration windows of 512 tokens (the factors' calibration)")
    parser.add_argument("--groups", type=int, default=DEFAULT_GROUPS, help="groups of calibration windows")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--runs", type=int, default=DEFAULT_TIMING_RUNS, help="timed generation runs per model")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--out", type=Path, default=None, help="keep the export here (default: a deleted temp folder)")
    parser.add_argument("--skip-unmeasured", action="store_true", help="do not export the plan without metrics")
    parser.add_argument("--skip-evaluating-reload", action="store_true",
                        help="do not export again with evaluate_reload=True")
    parser.add_argument("--skip-old", action="store_true", help="do not run the old export for the ratio")
    parser.add_argument("--old-commit", default=OLD_COMMIT, help="the commit whose export is the old path")
    args = parser.parse_args()

    choose_cache_root(args.cache)
    store = open_store()
    loaded = load_model(MODEL, store, TerminalProgress())
    texts = TextSettings(calibration_windowing=Windowing(512, args.calibration_windows), n_groups=args.groups,
                         evaluation_windowing=Windowing(512, args.windows))
    session = CompressionSession.open(store, loaded, METHOD, texts, TerminalProgress())
    timings: dict = {}
    with timed(timings, "plan_evaluation_s"):  # what `rankscope compress --save-plan` does; not part of the export
        plan = session.evaluate(session.uniform_plan(REDUCTION), TerminalProgress())
    options = dict(max_new_tokens=args.new_tokens)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="rankscope-bench-export-") as scratch:
        if not args.skip_old:
            old, reason = _old_export(args.old_commit)
            if old is None:
                results["old_path"] = {"skipped": reason}
            else:
                seconds, old_report = _timed_export(old, session, plan, Path(scratch) / "old", timing_runs=3, **options)
                results["old_path"] = {"commit": args.old_commit, "export_s": seconds, "passed": old_report.passed,
                                       "timing_runs": 3, "check_windows": 2}
        out = args.out or Path(scratch) / "smollm2-fpca-20"
        seconds, report = _timed_export(export_compressed, session, plan, out, timing_runs=args.runs,
                                        overwrite=args.out is not None, **options)  # --out: a rerun replaces
        timings["export_s"] = seconds
        results["export"] = {"export_s": seconds, "parts": report.timings, "compressed_quality_from":
                             report.compressed_quality_from, "reload_evaluated": report.reload_evaluated,
                             "timing_runs": args.runs, "check_windows": 1}
        if not args.skip_evaluating_reload:
            seconds, evaluating = _timed_export(export_compressed, session, plan, Path(scratch) / "evaluating",
                                                timing_runs=args.runs, evaluate_reload=True, **options)
            results["export_evaluating_reload"] = {
                "export_s": seconds, "parts": evaluating.timings, "reload_evaluated": evaluating.reload_evaluated,
                "speedup_of_default": round(seconds / timings["export_s"], 3)}
        if not args.skip_unmeasured:
            bare = type(plan).from_dict({**plan.to_dict(), "metrics": None})
            seconds, unmeasured = _timed_export(export_compressed, session, bare, Path(scratch) / "unmeasured",
                                                timing_runs=args.runs, **options)
            results["export_without_plan_metrics"] = {
                "export_s": seconds, "parts": unmeasured.timings,
                "compressed_quality_from": unmeasured.compressed_quality_from}
        if "export_s" in results.get("old_path", {}):
            results["old_path"]["speedup"] = round(results["old_path"]["export_s"] / timings["export_s"], 3)
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
        "texts": session.texts.to_dict(),
        "timings": timings, **results, "files": report.files, "weights_bytes": report.weights_bytes,
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
