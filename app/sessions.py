"""Compression sessions shared by the app's pages and background jobs, keyed by plain ids.

Opening a `CompressionSession` can be long (calibration, the method's factorisation, the original
model's reference distribution), so jobs open them off the script thread and keep them in a small
process-wide pool; later trials on any page reuse them. Sessions in the pool are wrapped so that
every evaluation takes the model's `ModelGuard`: a sweep and an Apply on another page then take
turns point by point instead of compressing the same model at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Optional

from app.jobs import ModelGuard
from engine.compression.plan import RankPlan
from engine.compression.session import CompressionSession
from engine.texts.settings import TextSettings
from engine.metrics import QualityResult
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback
from engine.store.duckdb_store import Store

MAX_OPEN_SESSIONS = 2  # each holds a full factorisation (about twice the decoder linears, float32)


@dataclass(frozen=True)
class SessionKey:
    """What identifies a session: the cache, the model content, the method, the texts, and where and in which dtype
    the model runs (one model loaded twice, in two dtypes, has two sessions)."""

    database: str
    model_fingerprint: str
    method: str
    texts: TextSettings
    device: str = "cpu"
    dtype: str = "float32"


class SharedModelSession:
    """A `CompressionSession` whose evaluations hold the model guard; everything else is delegated."""

    def __init__(self, session: CompressionSession, guard: ModelGuard):
        self._session = session
        self._guard = guard

    def __getattr__(self, name: str):
        return getattr(self._session, name)

    def evaluate_ranks(self, ranks: Mapping[str, Optional[int]], progress: Optional[ProgressCallback] = None,
                       window_indices: Optional[list[int]] = None, **windows) -> QualityResult:
        """As `CompressionSession.evaluate_ranks`; `windows` passes its `windows=` and `reference=` (a search's
        validation windows) through."""
        with self._guard.hold(f"evaluating a {self._session.method} plan"):
            return self._session.evaluate_ranks(ranks, progress, window_indices, **windows)

    def evaluate(self, plan: RankPlan, progress: Optional[ProgressCallback] = None) -> RankPlan:
        with self._guard.hold(f"evaluating a {self._session.method} plan"):
            return self._session.evaluate(plan, progress)


class SessionPool:
    """Open sessions by key, least recently used dropped first. Thread-safe; one opening per key."""

    def __init__(self, capacity: int = MAX_OPEN_SESSIONS):
        self._capacity = capacity
        self._sessions: OrderedDict[SessionKey, SharedModelSession] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[SessionKey, threading.Lock] = {}

    def peek(self, key: SessionKey) -> Optional[SharedModelSession]:
        """The open session for `key`, or None (never opens one)."""
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                self._sessions.move_to_end(key)
            return session

    def open(self, key: SessionKey, store: Store, loaded: LoadedModel, guard: ModelGuard,
             progress: Optional[ProgressCallback] = None) -> SharedModelSession:
        """The session for `key`, opening it (from the store where cached) under the model guard."""
        with self._lock:
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:
            session = self.peek(key)
            if session is not None:
                return session
            with guard.hold(f"preparing {key.method} (calibration, factorisation, reference distribution)"):
                opened = CompressionSession.open(store, loaded, key.method, key.texts, progress)
            shared = SharedModelSession(opened, guard)
            with self._lock:
                self._sessions[key] = shared
                while len(self._sessions) > self._capacity:
                    self._sessions.popitem(last=False)
            return shared
