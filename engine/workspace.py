"""Cached analysis operations: calibration, spectra and baseline evaluation, keyed by content.

Each `ensure_*` function answers from the store when it can and otherwise computes, writes the
result to the store, and then returns it, so whatever a front end shows was persisted first.
Cache keys hash the model fingerprint (weights + tokenizer), the text fingerprint and the
windowing, so changing any of them never returns a stale result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from engine.cache_keys import Spectra, calibration_key, evaluation_key
from engine.calibration import CalibrationStatistics, collect_statistics
from engine.metrics import evaluate_perplexity
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.spectra import compute_feature_spectra, compute_weight_spectra
from engine.store.arrays import load_arrays, save_arrays
from engine.store.duckdb_store import CalibrationRecord, EvaluationRecord, Store
from engine.texts.corpus import Corpus, load_corpus, text_fingerprint
from engine.texts.windows import Windowing, make_windows, tokenizer_adds_bos

if TYPE_CHECKING:
    import torch

DEFAULT_CALIBRATION_WINDOWING = Windowing(window_len=512, n_windows=128)
DEFAULT_EVALUATION_WINDOWING = Windowing(window_len=512, n_windows=16)  # the first 8,192 tokens
DEFAULT_GROUPS = 32


def load_windows(store: Store, loaded: LoadedModel, text_source: str, windowing: Windowing) -> tuple[Corpus, "torch.Tensor"]:
    """Load a text through the corpus interface, record it in the store, and cut it into windows."""
    corpus = load_corpus(text_source)
    store.record_text(corpus.fingerprint, corpus.name, corpus.source, corpus.n_chars)
    return corpus, make_windows(corpus, loaded.tokenizer, windowing)


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
) -> Calibration:
    """Calibration statistics of `loaded` over `text_source`, from the cache or computed and stored."""
    key = calibration_key(loaded.fingerprint, text_fingerprint(text_source), windowing, n_groups)
    record = store.get_calibration(key)
    if record is not None:
        tensors = load_arrays(store, record.array_id)
        if tensors is not None:
            return Calibration(record, CalibrationStatistics.from_tensors(tensors, record.n_groups), True)
        store.forget_calibration(key)  # the array file is gone: recompute
    corpus, windows = load_windows(store, loaded, text_source, windowing)
    start = time.perf_counter()
    statistics = collect_statistics(loaded.model, loaded.adapter, windows, n_groups, progress)
    seconds = time.perf_counter() - start
    save_arrays(store, key, "calibration", statistics.to_tensors(), metadata={"model": loaded.model_id, "text": corpus.name})
    record = CalibrationRecord(
        calibration_id=key,
        model_fingerprint=loaded.fingerprint,
        text_fingerprint=corpus.fingerprint,
        window_len=windowing.window_len,
        n_windows=windows.shape[0],
        n_groups=n_groups,
        add_bos=tokenizer_adds_bos(loaded.tokenizer),
        n_tokens=windows.numel(),
        array_id=key,
        seconds=seconds,
    )
    store.put_calibration(record)
    return Calibration(record, statistics, False)


def ensure_spectra(
    store: Store,
    loaded: LoadedModel,
    calibration: Calibration,
    covariance: str = "pooled",
    progress: Optional[ProgressCallback] = None,
) -> Spectra:
    """Weight and feature spectra of every decoder linear, from the store or computed and stored."""
    weight = store.get_weight_spectra(loaded.fingerprint)
    if not weight:
        weight = compute_weight_spectra(loaded.linears(), progress)
        store.put_weight_spectra(loaded.fingerprint, weight)
    cid = calibration.record.calibration_id
    feature = store.get_feature_spectra(cid, covariance)
    if not feature:
        feature = compute_feature_spectra(loaded.linears(), calibration.statistics, covariance, progress)
        store.put_feature_spectra(cid, covariance, feature)
    return Spectra(weight, feature, covariance, cid)


def ensure_baseline_evaluation(
    store: Store,
    loaded: LoadedModel,
    text_source: str,
    windowing: Windowing = DEFAULT_EVALUATION_WINDOWING,
    progress: Optional[ProgressCallback] = None,
) -> EvaluationRecord:
    """Perplexity of the original (uncompressed) model on `text_source`, cached in the store."""
    key = evaluation_key(loaded.fingerprint, text_fingerprint(text_source), windowing)
    record = store.get_evaluation(key)
    if record is not None:
        return record
    corpus, windows = load_windows(store, loaded, text_source, windowing)
    start = time.perf_counter()
    result = evaluate_perplexity(loaded.model, windows, progress)
    record = EvaluationRecord(
        evaluation_id=key,
        model_fingerprint=loaded.fingerprint,
        text_fingerprint=corpus.fingerprint,
        window_len=windowing.window_len,
        n_windows=windows.shape[0],
        add_bos=tokenizer_adds_bos(loaded.tokenizer),
        perplexity=result.perplexity,
        mean_nll=result.mean_nll,
        n_tokens=result.n_tokens,
        window_nll=result.window_nll,
        seconds=time.perf_counter() - start,
    )
    store.put_evaluation(record)
    return record
