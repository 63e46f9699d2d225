"""`StudyStorage` on the DuckDB store: studies, immutable trials and re-measured results.

It lives beside its contract (`engine.search.records`) and reaches the database only through the
store's public query API, so `engine.store` knows nothing of searches. After every change it also
writes the study to a JSON file next to the database (`engine.search.mirror`): a backup, and what
a second process reads while this one holds the database.
"""

from __future__ import annotations

import json
from typing import Optional

import duckdb

from engine.search.records import (
    StudyExistsError, StudyRecord, StudyState, TrialExistsError, TrialKind, TrialRecord, unknown_study,
)
from engine.search.mirror import mirror_folder, write_mirror
from engine.store.duckdb_store import Store


_STUDY_COLUMNS = "study_id, name, model_fingerprint, settings_json, state, validation_json, message, owner_json"


class DuckDBStudyStorage:
    """Studies and trials in the cache database; each trial is committed as soon as it is added."""

    def __init__(self, store: Store):
        self.store = store
        self.mirror = mirror_folder(store.cache_dir)

    def _mirror(self, study_id: str) -> None:
        write_mirror(self.mirror, self.get_study(study_id), self.trials(study_id), self.results(study_id))

    def create_study(self, record: StudyRecord) -> None:
        try:
            self.store.execute(
                f"INSERT INTO studies ({_STUDY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [record.study_id, record.name, record.model_fingerprint, json.dumps(record.settings, sort_keys=True),
                 record.state.value, _dump(record.validation), record.message, _dump(record.owner)],
            )
        except duckdb.ConstraintException as exc:
            raise StudyExistsError(f"A study with id '{record.study_id}' already exists.") from exc
        self._mirror(record.study_id)

    def get_study(self, study_id: str) -> Optional[StudyRecord]:
        row = self.store.fetch_one(f"SELECT {_STUDY_COLUMNS} FROM studies WHERE study_id = ?", [study_id])
        return None if row is None else _study(row)

    def list_studies(self) -> list[StudyRecord]:
        rows = self.store.fetch_all(f"SELECT {_STUDY_COLUMNS} FROM studies ORDER BY created_at")
        return [_study(row) for row in rows]

    def _known(self, study_id: str) -> None:
        """Writes name an existing study: nothing is updated or inserted for a mistyped id."""
        if self.store.fetch_one("SELECT 1 FROM studies WHERE study_id = ?", [study_id]) is None:
            raise unknown_study(study_id)

    def set_state(self, study_id: str, state: StudyState, message: Optional[str] = None,
                  owner: Optional[dict] = None) -> None:
        self._known(study_id)
        self.store.execute("UPDATE studies SET state = ?, message = ?, owner_json = ?, updated_at = current_timestamp "
                           "WHERE study_id = ?", [state.value, message, _dump(owner), study_id])
        self._mirror(study_id)

    def set_validation(self, study_id: str, validation: dict) -> None:
        self._known(study_id)
        self.store.execute("UPDATE studies SET validation_json = ?, updated_at = current_timestamp WHERE study_id = ?",
                           [_dump(validation), study_id])
        self._mirror(study_id)

    def add_trial(self, trial: TrialRecord) -> None:
        self._known(trial.study_id)
        try:
            self.store.execute(
                "INSERT INTO trials (study_id, number, kind, label, trial_json, objective, perplexity, kl_forward, "
                "kl_reverse, decoder_params, seconds, channels_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [trial.study_id, trial.number, trial.kind.value, trial.label, json.dumps(trial.to_json_dict()),
                 trial.objective, trial.perplexity, trial.kl_forward, trial.kl_reverse, trial.decoder_params,
                 trial.seconds, _dump(trial.channels)],
            )
        except duckdb.ConstraintException as exc:
            raise TrialExistsError(f"Trial {trial.number} of study '{trial.study_id}' is already stored.") from exc
        self._mirror(trial.study_id)

    def trials(self, study_id: str) -> list[TrialRecord]:
        rows = self.store.fetch_all(
            "SELECT study_id, number, kind, label, trial_json, objective, perplexity, kl_forward, kl_reverse, "
            "decoder_params, seconds, channels_json FROM trials WHERE study_id = ? ORDER BY number", [study_id])
        trials = []
        for sid, number, kind, label, payload, objective, ppl, kl_f, kl_r, params, seconds, channels in rows:
            data = json.loads(payload)
            trials.append(TrialRecord(sid, number, TrialKind(kind), label, data["values"], data["projected"],
                                      data["ranks"], objective, ppl, kl_f, kl_r, params, data["total_params"],
                                      seconds, data.get("extra", {}), None if channels is None else json.loads(channels)))
        return trials

    def put_result(self, study_id: str, label: str, result: dict) -> None:
        self._known(study_id)
        self.store.execute("INSERT OR REPLACE INTO study_results (study_id, label, result_json) VALUES (?, ?, ?)",
                           [study_id, label, json.dumps(result, sort_keys=True)])
        self._mirror(study_id)

    def results(self, study_id: str) -> dict[str, dict]:
        rows = self.store.fetch_all("SELECT label, result_json FROM study_results WHERE study_id = ?", [study_id])
        return {label: json.loads(payload) for label, payload in rows}


def _dump(value) -> Optional[str]:
    return None if value is None else json.dumps(value, sort_keys=True)


def _study(row) -> StudyRecord:
    study_id, name, fingerprint, settings, state, validation, message, owner = row
    return StudyRecord(study_id, name, fingerprint, json.loads(settings), StudyState(state),
                       None if validation is None else json.loads(validation), message,
                       None if owner is None else json.loads(owner))
