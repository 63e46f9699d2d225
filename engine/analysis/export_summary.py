"""Export reports shaped for display: headline numbers, quality, size and speed, and the self-checks.

A report is `ExportReport.to_dict()` as `export_compressed` returns it and the store keeps it
(`Store.exports(model_fingerprint)`): parameters, file sizes, quality of the original, in-memory
and reloaded models, tokens/s of both models, the side-by-side generation and the checks.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

MIB = 2 ** 20
QUALITY_MODELS = (("original", "original"), ("compressed", "compressed (in memory)"),
                  ("reloaded", "reloaded from the directory"))


def _ratio(part: Optional[float], whole: Optional[float]) -> Optional[float]:
    return None if part is None or not whole else part / whole


def export_overview(report: Mapping) -> dict:
    """The headline numbers of one export.

    `size_ratio` is the weights file over the original's weights (None when the original's size is
    unknown); `speedup` is compressed over original tokens/s; `passed` is True when every check passed.
    """
    p, q, speed = report["parameters"], report["quality"], report["speed"]
    checks = report.get("checks", [])
    original_tps = speed["original"]["tokens_per_second"]
    compressed_tps = speed["compressed"]["tokens_per_second"]
    return {
        "out_dir": report["out_dir"],
        "storage": report["storage"],
        "method": report["method"],
        "decoder_dense": p["decoder_linear"]["dense"],
        "decoder_compressed": p["decoder_linear"]["compressed"],
        "decoder_reduction": p["decoder_linear"]["reduction"],
        "total_dense": p["total"]["dense"],
        "total_compressed": p["total"]["compressed"],
        "total_reduction": p["total"]["reduction"],
        "reloaded_parameters": p["reloaded"],
        "weights_bytes": report["weights_bytes"],
        "original_weights_bytes": report.get("original_weights_bytes"),
        "size_ratio": _ratio(report["weights_bytes"], report.get("original_weights_bytes")),
        "original_perplexity": q["original"]["perplexity"],
        "perplexity": q["reloaded"]["perplexity"],
        "kl_forward": q["reloaded"]["kl_forward"],
        "kl_reverse": q["reloaded"]["kl_reverse"],
        "original_tokens_per_second": original_tps,
        "compressed_tokens_per_second": compressed_tps,
        "speedup": _ratio(compressed_tps, original_tps),
        "checks_passed": sum(1 for c in checks if c["passed"]),
        "checks_total": len(checks),
        "passed": bool(checks) and all(c["passed"] for c in checks),
    }


COMPRESSED_FROM = {"plan": "compressed (the plan's record, same windows)", "in-memory": "compressed (in memory)"}


def quality_rows(report: Mapping) -> list[dict]:
    """Perplexity and both KLs of the original, the compressed model (as the plan recorded it on the same windows,
    or measured in memory before writing: `compressed_quality_from`) and the reloaded model."""
    source = COMPRESSED_FROM.get(report.get("compressed_quality_from", "in-memory"), COMPRESSED_FROM["in-memory"])
    return [{"model": source if key == "compressed" else label,
             **{k: report["quality"][key][k] for k in ("perplexity", "kl_forward", "kl_reverse")}}
            for key, label in QUALITY_MODELS]


def size_speed_rows(report: Mapping) -> list[dict]:
    """Weights file size (MiB) and tokens/s, original against compressed, for a grouped bar chart."""
    rows = []
    if report.get("original_weights_bytes") is not None:
        rows.append({"measure": "weights file (MiB)", "model": "original", "value": report["original_weights_bytes"] / MIB})
    rows.append({"measure": "weights file (MiB)", "model": "compressed", "value": report["weights_bytes"] / MIB})
    for model in ("original", "compressed"):
        rows.append({"measure": "tokens/s (batch 1, greedy)", "model": model,
                     "value": report["speed"][model]["tokens_per_second"]})
    return rows


def check_rows(report: Mapping) -> list[dict]:
    """The export's self-checks: what was compared, passed or FAILED, and the numbers."""
    return [{"check": c["name"], "result": "passed" if c["passed"] else "FAILED", "detail": c["detail"]}
            for c in report.get("checks", [])]


def export_rows(exports: Sequence[Mapping]) -> list[dict]:
    """One row per stored export (`Store.exports`), newest first; `current` is False for an export that a later
    one to the same directory replaced."""
    rows, seen = [], set()
    for entry in sorted(exports, key=lambda e: str(e["created_at"]), reverse=True):
        overview = export_overview(entry["report"])
        rows.append({"directory": entry["path"], "current": entry["path"] not in seen,
                     "exported_at": entry["created_at"], "storage": overview["storage"],
                     "method": overview["method"], "decoder_reduction": overview["decoder_reduction"],
                     "size_ratio": overview["size_ratio"], "perplexity": overview["perplexity"],
                     "checks": "passed" if overview["passed"] else "FAILED", "export_id": entry["export_id"]})
        seen.add(entry["path"])
    return rows
