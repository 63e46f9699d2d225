"""The original model's next-token distribution on evaluation windows, cached as its final hidden states.

Trials then run only the compressed model: exact KL against the original reads this reference
through the model's own (never compressed) LM head (`engine.metrics.ReferenceDistribution`).
"""

from __future__ import annotations

import time
from typing import Optional

from engine.cache.artifacts import Computed, get_or_compute
from engine.cache.keys import reference_key
from engine.cache.windows import ensure_windows
from engine.metrics import ReferenceDistribution, compute_reference
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.records import ReferenceRecord
from engine.store.duckdb_store import Store
from engine.texts.corpus import text_fingerprint
from engine.texts.windows import Windowing

def ensure_reference(
    store: Store,
    loaded: LoadedModel,
    text_source: str,
    windowing: Windowing,
    progress: Optional[ProgressCallback] = None,
) -> tuple[ReferenceRecord, ReferenceDistribution]:
    """The original model's next-token distribution on the windows of `text_source` cut by `windowing`."""
    text_fp = text_fingerprint(text_source)
    key = reference_key(loaded.fingerprint, text_fp, windowing, loaded.dtype)

    def compute() -> Computed:
        windows = ensure_windows(store, loaded, text_source, windowing)  # [N, L]
        start = time.perf_counter()
        reference = compute_reference(loaded.model, windows, progress)
        record = ReferenceRecord(key, loaded.fingerprint, text_fp, windowing.window_len, windows.shape[0],
                                 0, key, reference.perplexity, time.perf_counter() - start)
        return Computed(reference, record, {"hidden": reference.hidden})  # [N, L-1, D]

    def load(record: ReferenceRecord, tensors, _metadata) -> ReferenceDistribution:
        return ReferenceDistribution(tensors["hidden"], record.perplexity)

    cached = get_or_compute(store, "reference", key, compute, load, record_type=ReferenceRecord)
    return cached.record, cached.value
