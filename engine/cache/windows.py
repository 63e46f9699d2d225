"""Token windows of a text for one model's tokenizer, cached as an int32 array.

Reading a text through `datasets` and tokenizing it costs seconds on a book; the windows a
calibration, an evaluation or a search used are read back in milliseconds. A text read for the
first time is also recorded in the store, so cache listings can name it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.cache.artifacts import Computed, get_or_compute
from engine.cache.keys import windows_key
from engine.models.loading import LoadedModel
from engine.store.duckdb_store import Store
from engine.texts.corpus import load_corpus, text_fingerprint
from engine.texts.windows import Windowing, make_windows

if TYPE_CHECKING:
    import torch


def ensure_windows(store: Store, loaded: LoadedModel, text_source: str, windowing: Windowing) -> "torch.Tensor":
    """Token windows `[N, L]` (int64) of `text_source` for `loaded`'s tokenizer, from the cache or made now."""
    import torch

    def compute() -> Computed:
        corpus = load_corpus(text_source)
        store.record_text(corpus.fingerprint, corpus.name, corpus.source, corpus.n_chars)
        windows = make_windows(corpus, loaded.tokenizer, windowing)  # [N, L]
        return Computed(windows, tensors={"windows": windows.to(torch.int32)}, metadata={"text": corpus.name})

    key = windows_key(loaded.fingerprint, text_fingerprint(text_source), windowing)
    return get_or_compute(store, "windows", key, compute, lambda _r, tensors, _m: tensors["windows"].long()).value
