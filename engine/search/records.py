"""A study and its trials as plain, immutable records, and the storage contract they go through.

A study (like an Optuna study) has an id, a name, settings, a state and finished trials. A trial
is written once, when it finishes, and never changed. `StudyStorage` is the contract; the DuckDB
store (`engine.search.duckdb_storage`) and `InMemoryStudyStorage` implement it and pass the same
tests (tests/test_study_storage.py).
"""

from __future__ import annotations

import copy
import os
import socket
import threading
from datetime import datetime, timezone
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Optional, Protocol

from engine.errors import RankScopeError


class StudyState(str, Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"


class TrialKind(str, Enum):
    SEARCH = "search"  # asked by the optimiser
    WARM_START = "warm-start"  # a given plan, told to the optimiser first
    PRIOR = "prior"  # a known plan (the global allocation, LoRAP) at the study's nearest point, told before searching
    BASELINE = "baseline"  # uniform, LoRD, greedy: evaluated for comparison, not told


# The study result (beside the full-text re-measurements, keyed by plan label) that holds the final selection: the
# best plans by validation objective measured on every candidate window; the study's choice is the best there.
SELECTION = "selection"
# Baselines the final selection may choose besides the trials: the informed ones, made in the study's own grouping or
# as exact plans (uniform, every linear at one ratio and v included, is the naive reference, never a candidate).
SELECTABLE_BASELINES = frozenset({"global", "lorap", "greedy", "lord"})


@dataclass(frozen=True)
class StudyRecord:
    study_id: str
    name: str
    model_fingerprint: str
    settings: dict
    state: StudyState
    validation: Optional[dict] = None  # chosen windows and why
    message: Optional[str] = None  # why it stopped or failed
    owner: Optional[dict] = None  # {"pid", "host", "started_at"} of the process running it, while it runs


@dataclass(frozen=True)
class TrialRecord:
    study_id: str
    number: int
    kind: TrialKind
    label: str  # "trial 12", "uniform", "lord", "greedy", "warm start"
    values: dict  # group -> ratio as asked (before projection)
    projected: dict  # group -> ratio after projection onto the budget
    ranks: dict  # module path -> rank or None
    objective: float
    perplexity: float
    kl_forward: float
    kl_reverse: float
    decoder_params: int
    total_params: int
    seconds: float
    extra: dict = field(default_factory=dict)
    channels: Optional[dict] = None  # MLP path -> kept channels (None: not pruned); None for a trial that prunes nothing

    def to_json_dict(self) -> dict:
        return {"values": self.values, "projected": self.projected, "ranks": self.ranks,
                "total_params": self.total_params, "extra": self.extra}


def this_process() -> dict:
    """The owner record of a study run by this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def is_interrupted(record: StudyRecord) -> bool:
    """Stored as running, but its process is gone (killed, or the app restarted): resume it.

    A study run on another host is taken as running: its process cannot be checked from here.
    """
    if record.state != StudyState.RUNNING:
        return False
    owner = record.owner
    if not owner or "pid" not in owner:
        return True
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, run by another user
        return False
    return False


class StudyStorage(Protocol):
    """Reads of an unknown study give None, [] or {}; writes to one raise `StudyNotFoundError`."""

    def create_study(self, record: StudyRecord) -> None: ...
    def get_study(self, study_id: str) -> Optional[StudyRecord]: ...
    def list_studies(self) -> list[StudyRecord]: ...
    def set_state(self, study_id: str, state: StudyState, message: Optional[str] = None,
                  owner: Optional[dict] = None) -> None: ...
    def set_validation(self, study_id: str, validation: dict) -> None: ...
    def add_trial(self, trial: TrialRecord) -> None: ...
    def trials(self, study_id: str) -> list[TrialRecord]: ...
    def put_result(self, study_id: str, label: str, result: dict) -> None: ...
    def results(self, study_id: str) -> dict[str, dict]: ...


class StudyExistsError(RankScopeError):
    pass


class TrialExistsError(RankScopeError):
    pass


class StudyNotFoundError(RankScopeError):
    pass


def unknown_study(study_id: str) -> StudyNotFoundError:
    """The error every backend raises for a write to a study that does not exist."""
    return StudyNotFoundError(f"No study with id '{study_id}'. `rankscope search status` lists the studies.")


class InMemoryStudyStorage:
    """`StudyStorage` in dicts: for tests and throwaway studies (nothing survives the process).

    Records are copied on the way in and out, so, as with the DuckDB store, changing what a read
    returned never changes what is stored.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._studies: dict[str, StudyRecord] = {}
        self._trials: dict[str, dict[int, TrialRecord]] = {}
        self._results: dict[str, dict[str, dict]] = {}

    def create_study(self, record: StudyRecord) -> None:
        with self._lock:
            if record.study_id in self._studies:
                raise StudyExistsError(f"A study with id '{record.study_id}' already exists.")
            self._studies[record.study_id] = copy.deepcopy(record)
            self._trials[record.study_id] = {}
            self._results[record.study_id] = {}

    def _known(self, study_id: str) -> None:
        if study_id not in self._studies:
            raise unknown_study(study_id)

    def get_study(self, study_id: str) -> Optional[StudyRecord]:
        with self._lock:
            return copy.deepcopy(self._studies.get(study_id))

    def list_studies(self) -> list[StudyRecord]:
        with self._lock:
            return copy.deepcopy(list(self._studies.values()))

    def set_state(self, study_id: str, state: StudyState, message: Optional[str] = None,
                  owner: Optional[dict] = None) -> None:
        with self._lock:
            self._known(study_id)
            self._studies[study_id] = replace(self._studies[study_id], state=state, message=message,
                                              owner=copy.deepcopy(owner))

    def set_validation(self, study_id: str, validation: dict) -> None:
        with self._lock:
            self._known(study_id)
            self._studies[study_id] = replace(self._studies[study_id], validation=copy.deepcopy(validation))

    def add_trial(self, trial: TrialRecord) -> None:
        with self._lock:
            self._known(trial.study_id)
            trials = self._trials[trial.study_id]
            if trial.number in trials:
                raise TrialExistsError(f"Trial {trial.number} of study '{trial.study_id}' is already stored.")
            trials[trial.number] = copy.deepcopy(trial)

    def trials(self, study_id: str) -> list[TrialRecord]:
        with self._lock:
            trials = self._trials.get(study_id, {})
            return copy.deepcopy([trials[n] for n in sorted(trials)])

    def put_result(self, study_id: str, label: str, result: dict) -> None:
        with self._lock:
            self._known(study_id)
            self._results[study_id][label] = copy.deepcopy(result)

    def results(self, study_id: str) -> dict[str, dict]:
        with self._lock:
            return copy.deepcopy(self._results.get(study_id, {}))
