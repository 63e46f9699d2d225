"""The original (uncompressed) model's perplexity on an evaluation set, cached as a record."""

from __future__ import annotations

import time
from typing import Optional

from engine.cache.artifacts import Computed, get_or_compute
from engine.cache.keys import evaluation_key
from engine.cache.windows import ensure_windows
from engine.metrics import evaluate_perplexity
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.records import EvaluationRecord
from engine.store.duckdb_store import Store
from engine.texts.corpus import text_fingerprint
from engine.texts.settings import DEFAULT_EVALUATION_WINDOWING
from engine.texts.windows import Windowing, tokenizer_adds_bos


def ensure_baseline_evaluation(
    store: Store,
    loaded: LoadedModel,
    text_source: str,
    windowing: Windowing = DEFAULT_EVALUATION_WINDOWING,
    progress: Optional[ProgressCallback] = None,
) -> EvaluationRecord:
    """Perplexity of the original model on `text_source`, from the store or measured and stored."""
    text_fp = text_fingerprint(text_source)
    key = evaluation_key(loaded.fingerprint, text_fp, windowing, loaded.dtype)

    def compute() -> Computed:
        windows = ensure_windows(store, loaded, text_source, windowing)
        start = time.perf_counter()
        result = evaluate_perplexity(loaded.model, windows, progress)
        record = EvaluationRecord(
            evaluation_id=key, model_fingerprint=loaded.fingerprint, text_fingerprint=text_fp,
            window_len=windowing.window_len, n_windows=windows.shape[0], add_bos=tokenizer_adds_bos(loaded.tokenizer),
            perplexity=result.perplexity, mean_nll=result.mean_nll, n_tokens=result.n_tokens,
            window_nll=result.window_nll, seconds=time.perf_counter() - start,
        )
        return Computed(record, record)

    return get_or_compute(store, "evaluation", key, compute, lambda record, _t, _m: record,
                          record_type=EvaluationRecord, arrays=False).value
