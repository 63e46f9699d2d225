"""A model end to end, step by step, from a cold cache: what each `rankscope` command costs and what it gives.
Writes bench/results/steps-<model>.json and docs/steps-<model>.md; the README's step-time table is rendered from
every stored steps-*.json by `--render-only`.

Each step is one whole `rankscope` process, run the way a user runs it, on a cache folder of its own that starts
empty (so nothing is read from an earlier run): prepare (converting the GGUF its package ships), calibrate (128 windows
of 512 tokens of War and Peace, 32 groups), spectra, factorise and evaluate a uniform 20% feature-pca plan,
evaluate the original, factorise with every other method, a per-type sensitivity sweep, a search study at 20%
(5x1 grouping, `--trials`), and the export of its best plan with the export's own reload check. Wall time and
peak memory (the command's maximum resident set, from the kernel) are recorded per step, with the load average
before it: the machine is shared, so a step that ran beside other work says so.

The run resumes: steps already in the JSON are not run again (`--cache DIR` keeps the same cache folder across
runs; without it a fresh temporary folder is used and removed at the end).

Run: `.venv/bin/python bench/model_steps.py --model gemma3-270m --trials 20 --sweep-ratios 0.4` (the default model:
`--model smollm2-135m --trials 50`); `--render-only` rewrites the docs from the stored JSON.

A 0.5B-class model: no such model ships with a PyPI package, so `--random-qwen05b` builds one into the cache folder
first (`bench/bench_calibration_memory.build_model`: Qwen2.5-0.5B's shapes and 151,936-row LM head, random weights,
the default model's tokenizer) and runs every step on that local Hugging Face directory, as a user's own
`--model DIR` would. Times and memory do not depend on the weights' values; its quality numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, run_measured, write_json  # noqa: E402
from engine.paths import PROJECT_ROOT  # noqa: E402

RANKSCOPE = str(Path(sys.executable).with_name("rankscope"))
DOCS = PROJECT_ROOT / "docs"
README = PROJECT_ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- step-times:start -->", "<!-- step-times:end -->"
OTHER_METHODS = ("svd", "awsvd", "whiten")
SWEEP_RATIOS = "0.2,0.4,0.6"


def steps(model: str, trials: int, out: Path, sweep_ratios: str = SWEEP_RATIOS,
          label: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, what it does, command arguments) in order; `label` names the study (default: the model reference)."""
    m = ["--model", model]
    plan, best, export_dir = out / "uniform-20.json", out / "best-20.json", out / "export"
    study = f"steps-{label or model}-20"
    return [
        ("prepare", "convert the model once (no-op when converted)", ["prepare", *m]),
        ("calibrate", "calibration statistics, 128 x 512 tokens", ["calibrate", *m, "--json"]),
        ("spectra", "weight and feature spectra of every decoder linear", ["spectra", *m, "--json"]),
        ("compress feature-pca 20%", "feature-pca factors, then one evaluation of a uniform 20% plan",
         ["compress", *m, "--method", "feature-pca", "--uniform", "0.2", "--save-plan", str(plan), "--json"]),
        ("evaluate original", "one evaluation: 16 x 512 tokens of Sherlock Holmes", ["evaluate", *m, "--json"]),
        *[(f"compress {method} 20%", f"{method} factors, then one evaluation",
           ["compress", *m, "--method", method, "--uniform", "0.2", "--json"]) for method in OTHER_METHODS],
        ("sweep by type", f"feature-pca, 7 types x ratios {sweep_ratios}, 16 windows each",
         ["sweep", *m, "--method", "feature-pca", "--by", "type", "--ratios", sweep_ratios, "--json"]),
        (f"study {trials} trials", f"5x1 search at 20%, {trials} trials, priors and the full-text re-measurement",
         ["search", "start", *m, "--method", "feature-pca", "--grouping", "5x1", "--budget", "0.2",
          "--trials", str(trials), "--name", study, "--json"]),
        ("export-plan", "the study's best plan as JSON", ["search", "export-plan", "--study", study,
                                                          "--out", str(best), "--json"]),
        ("export", "write the best plan's model and prove it reloads", ["export", "--plan", str(best),
                                                                       "--out", str(export_dir), "--overwrite",
                                                                       "--json"]),
    ]


RANDOM_QWEN05B = "qwen2.5-0.5b-shaped"
QWEN05B_VOCAB = 151_936
RANDOM_QWEN05B_NOTE = (
    "The model is a local Hugging Face directory built by the bench (`--random-qwen05b`): a Qwen2 with "
    "Qwen2.5-0.5B's shapes (24 layers, hidden 896, MLP width 4864, 14 query and 2 key/value heads, a tied "
    "151,936-row LM head; 494M parameters) and random weights, because no 0.5B model ships with a PyPI package "
    "here. Times and memory are what a real model of this shape costs; the quality numbers below are those of "
    "random weights and mean nothing.")


def measure(model: str, trials: int, cache: Path, out: Path, recorded: dict, sweep_ratios: str = SWEEP_RATIOS) -> dict:
    for name, what, args in steps(model, trials, out, sweep_ratios, recorded["model"]):
        if name in recorded["steps"]:
            continue
        print(f"{recorded['model']}: {name} ...", flush=True)
        result = _timed_with_memory(args, cache)
        recorded["steps"][name] = {"what": what, "command": "rankscope " + " ".join(
            a if not a.startswith(str(out)) else Path(a).name for a in args), **result}
        print(f"  {result['seconds']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB", flush=True)
        write_json(f"steps-{recorded['model']}", recorded)
    return recorded


def _timed_with_memory(args: list[str], cache: Path) -> dict:
    """One `rankscope` command as its own process on `cache` (`bench.common.run_measured`); exits when it fails."""
    return run_measured([RANKSCOPE, *args], {"RANKSCOPE_CACHE": str(cache)})


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _quality(metrics: dict) -> str:
    return f"{metrics['perplexity']:.2f} / {metrics['kl_forward']:.3f} / {metrics['kl_reverse']:.3f}"


def render(result: dict) -> str:
    """docs/steps-<model>.md from one stored steps JSON."""
    model, done = result["model"], result["steps"]
    generated_by = result.get("generated_by") or f"bench/model_steps.py --model {model} --trials {result['trials']}"
    lines = [f"# {model} end to end, step by step",
             "",
             *([result["note"], ""] if result.get("note") else []),
             f"Generated by `{generated_by}` from "
             f"`bench/results/steps-{model}.json` (RankScope {result['environment']['engine_version']}, "
             f"{result['environment']['threads']} torch threads, measured {result['environment']['measured_at'][:10]}). "
             "Each step is one whole `rankscope` process on a cache that started empty (prepare converts the "
             "model into it). CPU time is the process's user + system time over both cores, which other work on "
             "this shared machine does not stretch; wall time is what a user waits, and the load average before "
             "each step says what else ran (2: both cores already busy). Peak memory is the process's own maximum "
             "resident set.",
             "",
             "| step | what it does | wall time | CPU time | peak memory | load before |",
             "|---|---|---|---|---|---|"]
    for name, step in done.items():
        lines.append(f"| `{step['command']}` | {step['what']} | {_fmt_seconds(step['seconds'])} | "
                     f"{_fmt_seconds(step['cpu_s'])} | {step['peak_rss_mib'] / 1024:.1f} GiB | "
                     f"{step['load_before']:.1f} |")
    total = sum(step["seconds"] for step in done.values())
    lines += ["", f"All steps: {_fmt_seconds(total)}.", ""]
    compress = done.get("compress feature-pca 20%", {}).get("output")
    if compress:
        lines += ["## Quality", "",
                  "Perplexity / KL(P_orig‖P_comp) / KL(P_comp‖P_orig) on the evaluation text "
                  f"({compress['texts']['evaluation']['text']}, {compress['compressed']['tokens']} predicted tokens).",
                  "", "| model | perplexity / forward KL / reverse KL |", "|---|---|",
                  f"| original | {compress['original']['perplexity']:.2f} |"]
        for name, step in done.items():
            if name.startswith("compress ") and step.get("output"):
                lines.append(f"| {step['output']['method']}, uniform 20% | {_quality(step['output']['compressed'])} |")
        study = next((s["output"] for n, s in done.items() if n.startswith("study ") and s.get("output")), None)
        if study:
            full = study.get("full_text") or {}
            for label, entry in sorted(full.items()):
                if isinstance(entry, dict) and "perplexity" in entry:
                    lines.append(f"| study `{study['study_id']}`: {label} | {_quality(entry)} |")
        lines.append("")
    sweep = done.get("sweep by type", {}).get("output")
    if sweep:
        ratios = sorted({p["ratio"] for p in sweep["points"]})
        lines += ["## Per-type sensitivity (feature-pca)", "",
                  "Perplexity with one type compressed at a ratio in every layer, the rest original.", "",
                  "| type | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        by_type: dict = {}
        for point in sweep["points"]:
            by_type.setdefault(point["type"], {})[point["ratio"]] = point["perplexity"]
        for linear_type, row in by_type.items():
            lines.append(f"| {linear_type} | " + " | ".join(f"{row.get(r, float('nan')):.2f}" for r in ratios) + " |")
        lines.append("")
    export = done.get("export", {}).get("output")
    if export:
        lines += ["## Export", "", f"`{done['export']['command']}`: " + ", ".join(
            f"{k} {v}" for k, v in export.items() if isinstance(v, (str, int, float, bool)) and k in (
                "storage", "passed", "weights_bytes", "size_ratio", "compressed_quality_from")), ""]
    return "\n".join(lines)


def readme_table(results: list[dict]) -> str:
    """The README's table: one row per step, one column per model (every stored steps JSON)."""
    def row(name: str) -> str:  # the study's row is one row whatever its trial count (each cell says it)
        return "search study" if name.startswith("study ") else name

    names: list[str] = []
    for result in results:
        names += [row(n) for n in result["steps"] if row(n) not in names]
    header = "| step | " + " | ".join(f"{r['model']} ({r['environment']['measured_at'][:10]})" for r in results) + " |"
    lines = [TABLE_START, header, "|---|" + "---|" * len(results)]
    for name in names:
        cells = []
        for result in results:
            found = [(n, step) for n, step in result["steps"].items() if row(n) == name]
            if not found:
                cells.append("–")
                continue
            step_name, step = found[0]
            trials = f" ({step_name.split(' ', 1)[1]})" if name == "search study" else ""
            cells.append(f"{_fmt_seconds(step['seconds'])}{trials}, {step['peak_rss_mib'] / 1024:.1f} GiB")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(TABLE_END)
    return "\n".join(lines)


def _model_size(result: dict) -> tuple[int, str]:
    """Smallest model first (all its parameters, as its compress step counted them), then by name."""
    output = result["steps"].get("compress feature-pca 20%", {}).get("output") or {}
    return output.get("parameters", {}).get("total", {}).get("dense", 0), result["model"]


def render_all() -> None:
    """Every docs/steps-<model>.md and the README table, from the stored JSON."""
    results = sorted((json.loads(p.read_text()) for p in RESULTS.glob("steps-*.json")), key=_model_size)
    for result in results:
        doc = DOCS / f"steps-{result['model']}.md"
        doc.write_text(render(result) + "\n")
        print(f"wrote {doc}")
    text = README.read_text()
    if TABLE_START in text and results:
        start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END)
        README.write_text(text[:start] + readme_table(results) + text[end:])
        print(f"wrote the step-time table in {README}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-qwen05b", action="store_true",
                        help=f"build a random-weight Qwen2.5-0.5B-shaped directory and use it ({RANDOM_QWEN05B})")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--sweep-ratios", default=SWEEP_RATIOS, help="ratios of the per-type sweep")
    parser.add_argument("--cache", type=Path, help="cache folder to use and keep (resumes); default: a fresh one")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs from the stored JSON")
    args = parser.parse_args()
    if args.render_only:
        render_all()
        return
    name = RANDOM_QWEN05B if args.random_qwen05b else args.model
    stored = RESULTS / f"steps-{name}.json"
    recorded = json.loads(stored.read_text()) if stored.exists() and args.cache else {}
    recorded = {"model": name, "trials": args.trials, "steps": recorded.get("steps", {}),
                "generated_by": "bench/model_steps.py " + " ".join(
                    a for a in sys.argv[1:] if not a.startswith("--cache") and a != str(args.cache))}
    cache = args.cache or Path(tempfile.mkdtemp(prefix="rankscope-steps-"))
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "steps-files"
    out.mkdir(exist_ok=True)
    try:
        model = args.model
        if args.random_qwen05b:
            from bench.bench_calibration_memory import build_model

            model_dir = out / RANDOM_QWEN05B
            if not (model_dir / "config.json").exists():
                recorded["built"] = build_model(model_dir, layers=24, vocab_size=QWEN05B_VOCAB)
            model, recorded["note"] = str(model_dir), RANDOM_QWEN05B_NOTE
        measure(model, args.trials, cache, out, recorded, args.sweep_ratios)
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    render_all()


if __name__ == "__main__":
    main()
