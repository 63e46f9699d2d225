"""LoRAP on the default model, written to docs/lorap-results.md.

Measures, on SmolLM2-135M (calibration: 128 x 512 tokens of War and Peace; evaluation: the first 8,192
tokens of Sherlock Holmes), at 20% and 30% of decoder-linear parameters removed:
1. uniform feature-pca; feature-pca with the best plan of the 5x1 search in docs/search-results.md (20%);
   LoRAP as published (awsvd attention with q+k:v+o = 1:3, MLP pruned by channels keeping the least
   important 1%); LoRAP's allocation with feature-pca attention;
2. the paper's ablations on LoRAP: retention 0 / 1 / 2% (its Table 5), channel-score aggregation
   l1 / l2 / max (Table 7), attention split 1:1 / 1:3 / 1:5 (Table 6), and the MLP pruned versus
   factorised (awsvd) at equal parameters (Table 8);
3. a mixed plan found by search: a 5x1 study with `mlp="prune"` (awsvd attention ranks and one MLP pruning
   ratio, 30 trials, LoRAP's allocation and a uniform point as baselines in the same study), re-measured
   on the evaluation windows, which the study never sees.
Perplexity and both KLs (exact) for each, with the achieved reduction.
Run: `.venv/bin/python bench/lorap_results.py` (about 40 minutes with cached factors); `--render-only`
rewrites the doc from bench/results/lorap_results.json; `--search-only` runs (or resumes) part 3 alone and
merges it into the stored JSON. Studies are kept in the cache (`rankscope search status` lists them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, rendered_from_stored, write_json  # noqa: E402
from engine.compression.grouping import Grouping  # noqa: E402
from engine.compression.lorap import lorap_plan  # noqa: E402
from engine.compression.pruning import PruningSettings  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.search.duckdb_storage import DuckDBStudyStorage  # noqa: E402
from engine.search.records import StudyState  # noqa: E402
from engine.search.runner import StudyRunner, create_study  # noqa: E402
from engine.search.settings import StudySettings  # noqa: E402
from engine.search.summary import study_summary  # noqa: E402
from engine.store import open_store  # noqa: E402

REDUCTIONS = (0.2, 0.3)
SEARCH_STUDY = "results-5x1"
MIXED_STUDY = dict(method="awsvd", grouping="5x1", mlp="prune", n_trials=30, n_initial_points=10, seed=0)
DOC = Path(__file__).resolve().parent.parent / "docs" / "lorap-results.md"


def _row(table: str, label: str, reduction: float, plan) -> dict:
    metrics, parameters = plan.metrics, plan.parameters
    kept = [k for k in (plan.channels or {}).values() if k is not None]
    return {"table": table, "label": label, "target": reduction, "method": plan.method,
            "reduction": parameters["decoder_linear"]["reduction"], "total_reduction": parameters["total"]["reduction"],
            "perplexity": metrics["perplexity"], "kl_forward": metrics["kl_forward"], "kl_reverse": metrics["kl_reverse"],
            "kept_channels_mean": sum(kept) / len(kept) if kept else None,
            "attention_ranks": sorted({r for p, r in plan.ranks.items() if "self_attn" in p and r is not None}),
            "dense_attention": sorted({p.rsplit(".", 1)[1] for p, r in plan.ranks.items() if "self_attn" in p and r is None})}


def measure() -> dict:
    store = open_store()
    loaded = load_model("smollm2-135m", store)
    progress = TerminalProgress()
    sessions = {m: CompressionSession.open(store, loaded, m, progress=progress) for m in ("awsvd", "feature-pca")}
    awsvd, fpca = sessions["awsvd"], sessions["feature-pca"]
    rows = []

    def run(table: str, label: str, reduction: float, session: CompressionSession, plan) -> None:
        print(f"{table} | {label} | {reduction:.0%}", flush=True)
        rows.append(_row(table, label, reduction, session.evaluate(plan, progress)))

    searched = json.loads((RESULTS / "search_results.json").read_text())["studies"][SEARCH_STUDY]
    settings = searched["settings"]
    for reduction in REDUCTIONS:
        run("comparison", "uniform feature-pca", reduction, fpca, fpca.uniform_plan(reduction))
        if settings["budget"] == reduction:
            grouping = Grouping.parse(settings["grouping"], settings.get("search_v", False))
            best = fpca.plan_from_ratios(grouping, searched["best"]["projected"], budget=reduction)
            run("comparison", "feature-pca, best 5x1 search plan", reduction, fpca, best)
        run("comparison", "LoRAP as published (awsvd 1:3, MLP pruned, 1% retained)", reduction, awsvd,
            lorap_plan(awsvd, reduction))
        run("comparison", "LoRAP allocation, feature-pca attention", reduction, fpca, lorap_plan(fpca, reduction))
        for retention in (0.0, 0.02):
            run("retention", f"{retention:.0%} retained", reduction, awsvd,
                lorap_plan(awsvd, reduction, pruning=PruningSettings(retention=retention)))
        for aggregation in ("l1", "max"):
            run("aggregation", aggregation, reduction, awsvd,
                lorap_plan(awsvd, reduction, pruning=PruningSettings(aggregation=aggregation)))
        for split in ((1.0, 1.0), (1.0, 5.0)):
            run("split", f"{split[0]:g}:{split[1]:g}", reduction, awsvd, lorap_plan(awsvd, reduction, split))
        run("mlp", "MLP factorised (awsvd), equal parameters", reduction, awsvd, lorap_plan(awsvd, reduction, mlp="low-rank"))
        # awsvd is destructive on this model's dequantised MLP weights (docs/compression-results.md), so the
        # comparison is also made with feature-pca on both sides
        run("mlp-fpca", "feature-pca attention, MLP factorised (feature-pca), equal parameters", reduction, fpca,
            lorap_plan(fpca, reduction, mlp="low-rank"))
    return {"original_perplexity": awsvd.reference.perplexity, "rows": rows, "search": search_studies(store, awsvd)}


def search_studies(store, session: CompressionSession) -> list[dict]:
    """Part 3: a pruning study per budget (created, or resumed when stopped), summarised with its full-text
    re-measurements of the best trial and the baselines."""
    storage = DuckDBStudyStorage(store)
    out = []
    for reduction in REDUCTIONS:
        name = f"lorap-mixed-{round(reduction * 100)}"
        if storage.get_study(name) is None:
            create_study(storage, session, StudySettings(budget=reduction, **MIXED_STUDY), name=name)
        if storage.get_study(name).state != StudyState.FINISHED:
            StudyRunner(storage, session, name, progress=TerminalProgress()).run()
        out.append({"target": reduction, "study": study_summary(storage, name)})
    return out


def _find(rows: list[dict], table: str, label: str, reduction: float) -> dict:
    return next(r for r in rows if r["table"] == table and r["label"] == label and r["target"] == reduction)


def render(data: dict) -> str:
    env, rows = data["environment"], data["rows"]
    published = "LoRAP as published (awsvd 1:3, MLP pruned, 1% retained)"

    def line(label: str, r: dict) -> str:
        return (f"| {label} | {r['reduction']:.2%} | {r['perplexity']:.2f} | {r['kl_forward']:.4f} | "
                f"{r['kl_reverse']:.4f} |")

    header = ["| plan | decoder-linear removed | perplexity | KL(P_orig‖P_comp) | KL(P_comp‖P_orig) |",
              "|---|---|---|---|---|"]
    out = [
        "# LoRAP results",
        "",
        "Generated by `bench/lorap_results.py` from `bench/results/lorap_results.json`; do not edit by hand.",
        f"Measured with RankScope {env['engine_version']}, torch {env['torch']}, {env['threads']} threads, on "
        f"{env['measured_at'][:16]} UTC"
        + (f" (the search part; the other tables on {data['rows_environment']['measured_at'][:16]} UTC with RankScope "
           f"{data['rows_environment']['engine_version']})." if data.get("rows_environment") else "."),
        "",
        "SmolLM2-135M. Calibration: 128 x 512 tokens of War and Peace (the channel scores use its input-channel L2 "
        "norms; awsvd weighs by the same norms). Evaluation: the first 8,192 tokens of Sherlock Holmes (original "
        f"perplexity {data['original_perplexity']:.2f}); KL exact, per token, in nats. LoRAP compresses every layer at "
        "the same ratio: attention factorised with a q+k : v+o parameter split (a matrix whose share would need "
        "factors no smaller than itself stays dense, and its surplus goes to q+k, the paper's special case), and "
        "each layer's MLP keeps what is left of the layer's budget as whole channels.",
        "",
        "Rerun: `.venv/bin/python bench/lorap_results.py`.",
        "",
    ]
    for reduction in REDUCTIONS:
        out += [f"## {reduction:.0%} of decoder-linear parameters removed", "", *header]
        out += [line(r["label"], r) for r in rows if r["table"] == "comparison" and r["target"] == reduction]
        out += ["", "Ablations of LoRAP as published (awsvd, 1:3, l2, 1% retained unless the row says otherwise):", "",
                *header]
        base = _find(rows, "comparison", published, reduction)
        out.append(line("LoRAP as published", base))
        for table, title in (("retention", "retention"), ("aggregation", "aggregation"), ("split", "q+k:v+o split"),
                             ("mlp", "MLP"), ("mlp-fpca", "MLP")):
            out += [line(f"{title}: {r['label']}", r) for r in rows if r["table"] == table and r["target"] == reduction]
        kept = base["kept_channels_mean"]
        out += ["", f"LoRAP's allocation here keeps {kept:.0f} of 1,536 MLP channels per layer on average, attention "
                f"ranks {base['attention_ranks']} with {', '.join(base['dense_attention']) or 'no'} projections dense.",
                ""]
    out += _search_section(data.get("search") or [])
    out += ["## Where this model agrees with the paper", ""] + _reading(rows) + _search_reading(data.get("search") or [])
    return "\n".join(out) + "\n"


def _search_section(studies: list[dict]) -> list[str]:
    if not studies:
        return ["## A mixed plan found by search", "", "Not measured in this run (`--search-only` adds it).", ""]
    out = ["## A mixed plan found by search", "",
           "A 5x1 study with `mlp=\"prune\"` per budget: awsvd ranks for qk and o (v dense, as in every 5x1 "
           "study) and one share of MLP channels removed for all layers, projected exactly onto the budget over "
           "both kinds; objective log PPL + KL(P_comp‖P_orig) on 8 sensitive validation windows after the evaluation "
           "windows. Rows are re-measured on the evaluation windows.", "",
           "| budget | plan | perplexity | KL(P_orig‖P_comp) | KL(P_comp‖P_orig) | decoder-linear params | group values |",
           "|---|---|---|---|---|---|---|"]
    for entry in studies:
        summary = entry["study"]
        full = summary["full_text"]
        values = {"best": summary["best"]["projected"]}
        values.update({b["label"]: b["projected"] for b in summary["baselines"]})
        for label in ("best", "lorap", "uniform"):
            if label in full:
                r = full[label]
                shown = ", ".join(f"{g} {v:.2f}" for g, v in values.get(label, {}).items())
                out.append(f"| {entry['target']:.0%} | {'searched' if label == 'best' else label} | "
                           f"{r['perplexity']:.2f} | {r['kl_forward']:.4f} | {r['kl_reverse']:.4f} | "
                           f"{r['decoder_params']:,} | {shown} |")
    trials = ", ".join(f"{e['target']:.0%}: {e['study']['trials_done']} trials, {e['study']['mean_trial_seconds']:.1f} s "
                       "each" for e in studies)
    return out + ["", f"Studies: {trials}. Baselines skipped in a pruning study: LoRD and greedy (they allocate "
                  "gate, up and down ranks).", ""]


def _search_reading(studies: list[dict]) -> list[str]:
    out = []
    for entry in studies:
        full = entry["study"]["full_text"]
        if "best" in full and "lorap" in full:
            best, lorap = full["best"], full["lorap"]
            ppl = best["perplexity"] < lorap["perplexity"]
            kl = best["kl_reverse"] < lorap["kl_reverse"]
            verdict = ("the search beats it on both" if ppl and kl else
                       "the search does not beat it" if not (ppl or kl) else
                       f"mixed: the search is {'lower' if ppl else 'higher'} in perplexity and "
                       f"{'lower' if kl else 'higher'} in reverse KL")
            out.append(f"- {entry['target']:.0%}, search over attention ranks and MLP pruning against LoRAP's fixed "
                       f"allocation in the same study: perplexity {best['perplexity']:.2f} vs {lorap['perplexity']:.2f}, "
                       f"reverse KL {best['kl_reverse']:.4f} vs {lorap['kl_reverse']:.4f}: {verdict}.")
    return out


def _reading(rows: list[dict]) -> list[str]:
    """Statements computed from the numbers (which is lower), not written by hand."""
    out = []
    published = "LoRAP as published (awsvd 1:3, MLP pruned, 1% retained)"
    for reduction in REDUCTIONS:
        base = _find(rows, "comparison", published, reduction)
        uniform = _find(rows, "comparison", "uniform feature-pca", reduction)
        factored = _find(rows, "mlp", "MLP factorised (awsvd), equal parameters", reduction)
        no_retention = _find(rows, "retention", "0% retained", reduction)
        fpca_attention = _find(rows, "comparison", "LoRAP allocation, feature-pca attention", reduction)
        splits = {r["label"]: r["perplexity"] for r in rows if r["table"] == "split" and r["target"] == reduction}
        splits["1:3"] = base["perplexity"]
        aggregations = {r["label"]: r["perplexity"] for r in rows if r["table"] == "aggregation" and r["target"] == reduction}
        aggregations["l2"] = base["perplexity"]

        def verdict(a: float, b: float, better: str, worse: str) -> str:
            return better if a < b else worse

        def best_of(values: dict[str, float]) -> str:
            low = min(values.values())
            tied = sorted(k for k, v in values.items() if v == low)
            return " and ".join(tied) + (" tie (the same plan: v and o stay dense at both)" if len(tied) > 1 else "")

        retention_kl = "; reverse KL " + verdict(
            base["kl_reverse"], no_retention["kl_reverse"], "agrees",
            "does not") + f" ({base['kl_reverse']:.4f} vs {no_retention['kl_reverse']:.4f})"
        fpca_factored = _find(rows, "mlp-fpca", "feature-pca attention, MLP factorised (feature-pca), equal parameters",
                              reduction)

        out += [
            f"- {reduction:.0%}: LoRAP ({base['perplexity']:.2f}) vs uniform feature-pca ({uniform['perplexity']:.2f}): "
            + verdict(base["perplexity"], uniform["perplexity"], "LoRAP is better here.", "LoRAP is worse here."),
            f"- {reduction:.0%}, the paper's central claim (prune the MLP, do not factorise it; Table 8): pruned "
            f"{base['perplexity']:.2f} vs factorised {factored['perplexity']:.2f} at equal parameters: "
            + verdict(base["perplexity"], factored["perplexity"], "agrees.", "does not hold on this model."),
            f"- {reduction:.0%}, retaining the least important 1% (Table 5): {base['perplexity']:.2f} vs "
            f"{no_retention['perplexity']:.2f} without: perplexity "
            + verdict(base["perplexity"], no_retention["perplexity"], "agrees (retention helps)",
                      "does not agree (retention does not help)") + retention_kl + ".",
            f"- {reduction:.0%}, the same with feature-pca on both sides: pruned {fpca_attention['perplexity']:.2f} vs "
            f"factorised {fpca_factored['perplexity']:.2f}: "
            + verdict(fpca_attention["perplexity"], fpca_factored["perplexity"], "agrees.",
                      "does not hold with feature-pca's factors."),
            f"- {reduction:.0%}, split (Table 6): best is {best_of(splits)} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(splits.items()))}); the paper's best is 1:3.",
            f"- {reduction:.0%}, aggregation (Table 7): best is {best_of(aggregations)} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(aggregations.items()))}); the paper's best is l2.",
            f"- {reduction:.0%}, awsvd vs feature-pca for LoRAP's attention: {base['perplexity']:.2f} vs "
            f"{fpca_attention['perplexity']:.2f}.",
        ]
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from the stored JSON")
    parser.add_argument("--search-only", action="store_true", help="run or resume part 3 alone, merged into the JSON")
    args = parser.parse_args()
    if args.render_only:
        rendered_from_stored("lorap_results", render, DOC)
        return
    if args.search_only:
        stored = json.loads((RESULTS / "lorap_results.json").read_text())
        store = open_store()
        session = CompressionSession.open(store, load_model("smollm2-135m", store), "awsvd", progress=TerminalProgress())
        payload = {k: v for k, v in stored.items() if k != "environment"}
        # parts 1-2 keep the environment they were measured in; the file's own is part 3's
        payload["rows_environment"] = stored.get("rows_environment", stored["environment"])
        payload["search"] = search_studies(store, session)
    else:
        payload = measure()
    path = write_json("lorap_results", payload)
    DOC.write_text(render(json.loads(path.read_text())))
    print(f"wrote {path} and {DOC}")


if __name__ == "__main__":
    main()
