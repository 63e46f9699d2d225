"""Search studies on the default model, written to docs/search-results.md.

feature-pca at a 20% decoder-linear budget (calibration 128 x 512 tokens of War and Peace;
validation: 8 sensitive windows chosen among the 24 windows of Sherlock Holmes that follow the
evaluation windows; final scores on the first 8,192 tokens, which the search never sees):
1. a 5x1 study of 50 trials and a 5x4 study of 80 trials, against uniform, LoRD and greedy;
2. beta = 0 against the default beta = 1 (5x1, 30 trials each arm);
3. the sensitive validation subset against a random subset of the same size (5x1, 30 trials).
The beta = 1 / sensitive arm of 2 and 3 is the first 30 trials of the 5x1 study: with the same seed
a 30-trial study asks exactly those points, so its best is re-measured instead of run again.
Studies are stored in the cache database (`rankscope search status` lists them) and resumed if
this script is run again after an interruption. Run: `.venv/bin/python bench/search_results.py`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import kl_note, rendered_from_stored, write_json  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.search.records import StudyState  # noqa: E402
from engine.search.runner import StudyRunner, create_study  # noqa: E402
from engine.search.settings import StudySettings  # noqa: E402
from engine.search.summary import study_summary  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.search.duckdb_storage import DuckDBStudyStorage  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "search-results.md"
TEXTS = TextSettings()  # War and Peace 128 x 512 calibration, Sherlock Holmes 16 x 512 evaluation
STUDIES = {
    "results-5x1": dict(grouping="5x1", n_trials=50),
    "results-5x4": dict(grouping="5x4", n_trials=80, n_initial_points=20),
    "results-5x1-beta0": dict(grouping="5x1", n_trials=30, beta=0.0),
    "results-5x1-random": dict(grouping="5x1", n_trials=30, subset="random"),
}
ARM_TRIALS = 30


def full_text_result(storage, session, name: str, label: str, trial) -> dict:
    """Full-text measurement of one trial of a study, stored under `label` (measured once)."""
    stored = storage.results(name).get(label)
    if stored is None or stored["trial"] != trial.number:
        r = session.evaluate_ranks(trial.ranks)
        stored = {"trial": trial.number, "perplexity": r.perplexity, "kl_forward": r.kl_forward,
                  "kl_reverse": r.kl_reverse, "tokens": r.n_tokens, "decoder_params": trial.decoder_params,
                  "total_params": trial.total_params}
        storage.put_result(name, label, stored)
    return stored


def best_of_first(storage, session, name: str, n: int) -> dict:
    """Full-text measurement of the best of a study's first `n` optimiser trials (stored once)."""
    from engine.search.records import TrialKind

    searched = [t for t in storage.trials(name) if t.kind != TrialKind.BASELINE][:n]
    return full_text_result(storage, session, name, f"best@{n}", min(searched, key=lambda t: t.objective))


def run_study(storage, session, name: str, overrides: dict) -> dict:
    """Create (default: feature-pca, 20% budget, seed 0, the default texts) or resume, then summarise."""
    existing = storage.get_study(name)
    if existing is None:
        settings = StudySettings(**{"method": "feature-pca", "budget": 0.2, "seed": 0, "texts": TEXTS, **overrides})
        create_study(storage, session, settings, name=name)
    if storage.get_study(name).state != StudyState.FINISHED:
        start = time.perf_counter()
        StudyRunner(storage, session, name, progress=TerminalProgress()).run()
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return study_summary(storage, name)


def main() -> None:
    store = open_store()
    storage = DuckDBStudyStorage(store)
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    session = CompressionSession.open(store, loaded, "feature-pca", TEXTS, TerminalProgress())
    summaries = {name: run_study(storage, session, name, overrides) for name, overrides in STUDIES.items()}
    best_of_first(storage, session, "results-5x1", ARM_TRIALS)
    summaries["results-5x1"] = study_summary(storage, "results-5x1")
    payload = {"original": session.original_quality(), "studies": summaries}
    path = write_json("search_results", payload)
    DOC.write_text(render(json.loads(path.read_text())))  # the written file carries the environment too
    print(f"wrote {DOC} and {path}")


def _row(label: str, r: dict, reference: dict) -> str:
    gain = 1 - r["perplexity"] / reference["perplexity"]
    return (f"| {label} | {r['perplexity']:.3f} | {r['kl_forward']:.4f} | {r['kl_reverse']:.4f} | "
            f"{r['decoder_params']:,} | {gain:+.1%} |")


def render(p: dict) -> str:
    s = p["studies"]
    lines = [
        "# Search results on the default model",
        "",
        "Generated by `.venv/bin/python bench/search_results.py` (do not edit by hand; rerun it).",
        f"Measured {p['environment']['measured_at'][:16]} UTC, RankScope {p['environment']['engine_version']}, "
        f"{p['environment']['threads']} torch threads.",
        "",
        "SmolLM2-135M, feature-pca (pooled covariance of 128 x 512 tokens of War and Peace), budget: remove 20% of "
        "decoder-linear parameters; v kept dense in searched plans. Objective: log PPL + beta x KL(P_comp‖P_orig) "
        "on 8 validation windows chosen among the 24 Sherlock Holmes windows after the evaluation windows. "
        "Every number below is re-measured on the evaluation windows (the first 8,192 tokens), which no "
        f"study saw. Original perplexity {p['original']['perplexity']:.3f}. {kl_note(p['environment'])}",
        "",
    ]
    for name, title in (("results-5x1", "5x1 grouping, 50 trials"), ("results-5x4", "5x4 grouping, 80 trials")):
        summary = s[name]
        full = summary["full_text"]
        lord = full.get("lord")
        lines += [f"## {title}", "",
                  f"Study `{name}`: {summary['trials_done']} trials, mean {summary['mean_trial_seconds']:.1f} s per "
                  f"trial. Last column: perplexity change against LoRD (positive = better than LoRD).", "",
                  "| plan | perplexity | KL(P_orig‖P_comp) | KL(P_comp‖P_orig) | decoder-linear params | vs LoRD |",
                  "|---|---|---|---|---|---|"]
        for label in ("best", "uniform", "lord", "greedy"):
            if label in full:
                lines.append(_row(label, full[label], lord))
        best = summary["best"]
        lines += ["", "Best group ratios (after projection onto the budget): "
                  + ", ".join(f"{g} {v:.3f}" for g, v in best["projected"].items()), ""]
    lines += ["## beta = 0 against beta = 1", "",
              f"Same 5x1 settings, {ARM_TRIALS} trials each (Bolaco's Table 3 asks the same question).", "",
              "| study | objective | perplexity | KL(P_orig‖P_comp) | KL(P_comp‖P_orig) |", "|---|---|---|---|---|"]
    arms = (("results-5x1-beta0", "best", "beta = 0 (perplexity only)"),
            ("results-5x1", f"best@{ARM_TRIALS}", f"beta = 1 (first {ARM_TRIALS} trials of results-5x1)"))
    for name, key, label in arms:
        r = s[name]["full_text"][key]
        lines.append(f"| {label} | log PPL + {s[name]['settings']['beta']} KL | {r['perplexity']:.3f} | "
                     f"{r['kl_forward']:.4f} | {r['kl_reverse']:.4f} |")
    lines += ["", "## Sensitive against random validation subset", "",
              f"Same 5x1 settings, {ARM_TRIALS} trials, 8 windows each (Bolaco's Table 4).", "",
              "| subset | windows | perplexity | KL(P_comp‖P_orig) |", "|---|---|---|---|"]
    for name, key, label in (("results-5x1", f"best@{ARM_TRIALS}", "sensitive"), ("results-5x1-random", "best", "random")):
        r = s[name]["full_text"][key]
        lines.append(f"| {label} | {s[name]['validation']['windows']} | {r['perplexity']:.3f} | {r['kl_reverse']:.4f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--render-only" in sys.argv:  # the doc again from the stored JSON, e.g. after a wording change
        rendered_from_stored("search_results", render, DOC)
    else:
        main()
