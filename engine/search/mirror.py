"""Studies mirrored as JSON files next to the database: a backup, and a view for a second process.

DuckDB lets one process write a database and no other process open it meanwhile, so a study run
from the command line would hide its progress from `rankscope search status` in another terminal,
and a lost or corrupt database would take every study with it. `DuckDBStudyStorage` therefore
writes each study after every change (state, validation windows, each trial, each full-text
result) to `<cache>/studies/<study_id>.json`, atomically. `StudyMirror` reads those files through
the reading half of the `StudyStorage` contract (so `study_summary` works on it unchanged), and
`restore_studies` copies the studies a database lacks back into it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from engine.errors import RankScopeError
from engine.search.records import StudyRecord, StudyState, StudyStorage, TrialKind, TrialRecord

MIRROR_SCHEMA = "rankscope.study/v1"
MIRROR_FOLDER = "studies"


def mirror_folder(cache_dir: Path) -> Path:
    return Path(cache_dir) / MIRROR_FOLDER


def write_mirror(folder: Path, record: StudyRecord, trials: list[TrialRecord], results: dict[str, dict]) -> Path:
    """Write one study's JSON file (atomically: a reader never sees half of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.study_id}.json"
    document = {
        "schema": MIRROR_SCHEMA,
        "study": {**asdict(record), "state": record.state.value},
        "trials": [{**asdict(t), "kind": t.kind.value} for t in trials],
        "results": results,
    }
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps(document, sort_keys=True))
    os.replace(partial, path)
    return path


def _read(path: Path) -> tuple[StudyRecord, list[TrialRecord], dict[str, dict]]:
    try:
        document = json.loads(path.read_text())
        if document.get("schema") != MIRROR_SCHEMA:
            raise ValueError(f"schema {document.get('schema')!r}, expected {MIRROR_SCHEMA}")
        study = document["study"]
        record = StudyRecord(**{**study, "state": StudyState(study["state"])})
        trials = [TrialRecord(**{**t, "kind": TrialKind(t["kind"])}) for t in document["trials"]]
        return record, trials, document["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RankScopeError(f"The study file {path} cannot be read: {exc}.") from exc


def _files(folder: Path) -> list[Path]:
    """The study files of a folder, oldest first."""
    return sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)


class StudyMirror:
    """The studies of a mirror folder, read-only (`get_study`, `list_studies`, `trials`, `results`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, study_id: str) -> Path:
        return self.folder / f"{study_id}.json"

    def get_study(self, study_id: str) -> Optional[StudyRecord]:
        path = self._path(study_id)
        return _read(path)[0] if path.is_file() else None

    def list_studies(self) -> list[StudyRecord]:
        return [_read(path)[0] for path in _files(self.folder)]

    def trials(self, study_id: str) -> list[TrialRecord]:
        path = self._path(study_id)
        return _read(path)[1] if path.is_file() else []

    def results(self, study_id: str) -> dict[str, dict]:
        path = self._path(study_id)
        return _read(path)[2] if path.is_file() else {}


def restore_studies(storage: StudyStorage, folder: Path) -> list[str]:
    """Copy every mirrored study that `storage` lacks into it, trials and results included; returns their ids.

    A study the storage already has is left as it is (the database is the record while it is readable).
    Every file is read before anything is written, since a DuckDB storage rewrites the files as it goes.
    """
    documents = [_read(path) for path in _files(Path(folder))]
    restored = []
    for record, trials, results in documents:
        if storage.get_study(record.study_id) is not None:
            continue
        storage.create_study(record)
        for trial in trials:
            storage.add_trial(trial)
        for label, result in results.items():
            storage.put_result(record.study_id, label, result)
        if record.validation is not None:
            storage.set_validation(record.study_id, record.validation)
        storage.set_state(record.study_id, record.state, record.message, record.owner)
        restored.append(record.study_id)
    return restored
