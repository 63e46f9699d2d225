"""How well can KL be computed from a stored top-k of the original distribution? Writes
bench/results/kl_estimators.json.

On the first evaluation windows of the default model, for uniform 20% plans of feature-pca and svd,
compares the exact forward and reverse KL (full 49,152-token distributions) with two top-k forms:
- bucket: the original's top-k tokens plus one bucket for the rest (what RankScope 0.1.0 stored;
  a lower bound of the exact KL; since 0.2 `engine.metrics` computes KL exactly);
- uniform tail: the original's remaining mass spread evenly over the other tokens, so the compressed
  model's own tail enters the reverse KL term by term (a candidate replacement).
Run: `.venv/bin/python bench/kl_estimators.py [--windows N]` (uses the cached calibration and factors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_json  # noqa: E402
from engine.compression.lowrank import compress_, restore_  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402

REFERENCE_TOP_K = 1024  # the top-k RankScope 0.1.0 stored


@torch.no_grad()
def estimates(logp: torch.Tensor, logq: torch.Tensor, k: int) -> dict[str, float]:
    # logp, logq: [T, V] log-distributions of the original and the compressed model
    p, q = logp.exp(), logq.exp()
    top, idx = logp.topk(k, dim=-1)  # [T, k]
    tail = torch.ones_like(logp, dtype=torch.bool).scatter_(1, idx, False)  # [T, V]
    p_tail, q_tail = (p * tail).sum(-1), (q * tail).sum(-1)  # [T]
    q_top, logq_top = q.gather(1, idx), logq.gather(1, idx)
    spread = (p_tail / (logp.shape[-1] - k)).log()[:, None]  # log of the original's even tail share
    return {
        "exact_forward": float((p * (logp - logq)).sum()),
        "exact_reverse": float((q * (logq - logp)).sum()),
        "bucket_forward": float((top.exp() * (top - logq_top)).sum() + (p_tail * (p_tail.log() - q_tail.log())).sum()),
        "bucket_reverse": float((q_top * (logq_top - top)).sum() + (q_tail * (q_tail.log() - p_tail.log())).sum()),
        "uniform_tail_forward": float((top.exp() * (top - logq_top)).sum()
                                      + (spread.exp() * tail * (spread - logq)).sum()),
        "uniform_tail_reverse": float((q_top * (logq_top - top)).sum() + (q * tail * (logq - spread)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()
    store = open_store()
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    rows = {}
    for method in ("feature-pca", "svd"):
        session = CompressionSession.open(store, loaded, method, TextSettings(), TerminalProgress())
        ranks = session.uniform_plan(0.2).ranks
        totals: dict[str, float] = {}
        for ids in session.windows[: args.windows]:
            model = loaded.model
            logp = F.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
            compress_(model, ranks, session.factorization)
            try:
                logq = F.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)
            finally:
                restore_(model)
            for key, value in estimates(logp, logq, REFERENCE_TOP_K).items():
                totals[key] = totals.get(key, 0.0) + value
        n = args.windows * (session.windows.shape[1] - 1)
        per_token = {key: value / n for key, value in totals.items()}
        for direction in ("forward", "reverse"):
            for form in ("bucket", "uniform_tail"):
                per_token[f"{form}_{direction}_relative_error"] = (
                    per_token[f"{form}_{direction}"] / per_token[f"exact_{direction}"] - 1)
        rows[f"{method} uniform 20%"] = per_token
    path = write_json("kl_estimators", {"model": "smollm2-135m", "top_k": REFERENCE_TOP_K, "windows": args.windows,
                                        "plans": rows})
    print(path.read_text())


if __name__ == "__main__":
    main()
