"""Calibration statistics of a model over a text, from the cache or computed and stored.

What is stored is only what cannot be derived (`engine.calibration`'s stored form: the upper triangle of
`Σ x xᵀ`, the token count, and the group sums or, for groups of two sizes, the pooled covariance's upper
triangle and the mean); the rest is derived when it is read, bit for bit as it was collected. A
calibration stored in the earlier full form is read as it was written.

Snapshots taken while the statistics are collected (`snapshot`) are handed to the caller only: they are never
stored, and nothing is keyed by them.

A model too large to calibrate every layer at once (`engine.calibration.calibrates_by_layer`) is calibrated layer by
layer, each finished layer written to the array file as it comes (`PartWriter`), and the statistics returned are
read from that file site by site when used: memory holds one layer's sums, never the whole calibration. No snapshots
are taken then. The statistics, the key and the file's content are those of a whole-model run. A stored calibration
over `FILE_READ_BY_SITE_BYTES` is read back the same way, site by site, and the derived sites kept in memory are
bounded (`engine.calibration.DERIVED_SITES_MEMORY_BYTES`), so spectra and factorisations of a large model hold a few
layers' statistics at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.cache.artifacts import Computed, get_or_compute
from engine.cache.keys import calibration_key
from engine.cache.windows import ensure_windows
from engine.calibration import (CalibrationStatistics, SnapshotCallback, calibrates_by_layer, collect_statistics,
                                write_statistics_by_layer)
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.records import CalibrationRecord
from engine.store.arrays import PartWriter
from engine.store.duckdb_store import Store
from engine.texts.corpus import text_fingerprint
from engine.texts.settings import DEFAULT_CALIBRATION_WINDOWING, DEFAULT_GROUPS
from engine.texts.windows import Windowing, tokenizer_adds_bos

FILE_READ_BY_SITE_BYTES = 1 << 30  # a stored calibration larger than this is read site by site (the default model's: 0.4 GB)


@dataclass(frozen=True)
class Calibration:
    record: CalibrationRecord
    statistics: CalibrationStatistics
    from_cache: bool


def ensure_calibration(
    store: Store,
    loaded: LoadedModel,
    text_source: str,
    windowing: Windowing = DEFAULT_CALIBRATION_WINDOWING,
    n_groups: int = DEFAULT_GROUPS,
    progress: Optional[ProgressCallback] = None,
    snapshot: Optional[SnapshotCallback] = None,
    by_layer: Optional[bool] = None,
) -> Calibration:
    """Calibration statistics of `loaded` over `text_source`, from the cache or computed and stored.

    `snapshot`: called with the statistics of the windows seen so far while they are computed
    (`engine.calibration.collect_statistics`); not called when they come from the cache. `by_layer`: calibrate one
    decoder layer at a time (None: when the whole model's sums would not fit in `WHOLE_MODEL_MEMORY_LIMIT`); the
    statistics, and so the key, are the same either way; no snapshots are taken by layer."""
    text_fp = text_fingerprint(text_source)
    key = calibration_key(loaded.fingerprint, text_fp, windowing, n_groups, loaded.dtype)

    def compute() -> Computed:
        windows = ensure_windows(store, loaded, text_source, windowing)
        metadata = {"model": loaded.model_id, "text": text_source}
        start = time.perf_counter()
        if calibrates_by_layer(loaded.model, loaded.adapter, by_layer):
            # layer by layer, each layer's stored form written to the file as it is finished: memory holds one layer
            with PartWriter(store, key, "calibration", metadata) as writer:
                write_statistics_by_layer(loaded.model, loaded.adapter, windows, n_groups, writer.add, progress)
                path = writer.finish()
            statistics, tensors = CalibrationStatistics.from_file(path, n_groups), None
        else:
            collected = collect_statistics(loaded.model, loaded.adapter, windows, n_groups, progress,
                                           snapshot=snapshot, by_layer=False)
            # stored in the compact form; the value returned (and kept by sessions) drops it
            statistics, tensors = collected.without_stored_form(), collected.to_tensors()
        record = CalibrationRecord(
            calibration_id=key, model_fingerprint=loaded.fingerprint, text_fingerprint=text_fp,
            window_len=windowing.window_len, n_windows=windows.shape[0], n_groups=n_groups,
            add_bos=tokenizer_adds_bos(loaded.tokenizer), n_tokens=windows.numel(), array_id=key,
            seconds=time.perf_counter() - start,
        )
        return Computed(statistics, record, tensors, metadata)  # tensors None: already written, part by part

    cached = get_or_compute(store, "calibration", key, compute,
                            lambda record, tensors, _m: CalibrationStatistics.from_tensors(tensors, record.n_groups),
                            record_type=CalibrationRecord, load_from_file=_read_large_file_by_site)
    return Calibration(cached.record, cached.value, cached.from_cache)


def _read_large_file_by_site(record: CalibrationRecord, path: Path) -> Optional[CalibrationStatistics]:
    """A stored calibration over `FILE_READ_BY_SITE_BYTES` read site by site from its file as the sites are used
    (a 0.5B-class model's is over 2 GB); a smaller one is read whole (None), so it does not depend on the file
    staying in place."""
    if path.stat().st_size <= FILE_READ_BY_SITE_BYTES:
        return None
    return CalibrationStatistics.from_file(path, record.n_groups)
