"""What the cache holds: calibrations, baseline evaluations and sensitivity sweeps, and every artifact with its size.

Read-only summaries for front ends (the app's "what is cached" tables, and the Sensitivity page,
which reopens instantly because it finds a sweep's points without loading any factors). Every
answer is one DuckDB query: no torch, no array files read. Text names come from the `texts` table
(the name a text had when it was first read); a text never read by a recorded step shows as the
first 12 characters of its fingerprint. It reads through the store's public query API.

`cached_artifacts` lists every artifact (calibrations, factorisations, references, windows, baseline
evaluations, spectra rows, sweeps, recovery runs and checkpoints, studies, export records, converted
models, and array files no record uses) with its kind, description, model, texts, bytes on disk, rows and
age, and what deleting it costs; `forget_artifact` deletes one (its rows, then its files), still without
torch: sizes come from the files (a windows file's header is read for its shape and text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from engine.errors import StoreError
from engine.store.duckdb_store import Store


def _text_name(column: str) -> str:
    return f"coalesce((SELECT name FROM texts WHERE fingerprint = {column}), substr({column}, 1, 12))"


def _rows(store: Store, sql: str, params: list, keys: tuple[str, ...]) -> list[dict]:
    return [dict(zip(keys, row)) for row in store.fetch_all(sql, params)]


def cached_calibrations(store: Store, model_fingerprint: str) -> list[dict]:
    """Calibrations of a model, oldest first: text, window length, windows, groups, tokens, seconds."""
    return _rows(
        store,
        f"SELECT calibration_id, {_text_name('text_fingerprint')}, window_len, n_windows, n_groups, n_tokens, seconds, "
        "created_at FROM calibrations WHERE model_fingerprint = ? ORDER BY created_at",
        [model_fingerprint],
        ("calibration_id", "text", "window_len", "n_windows", "n_groups", "n_tokens", "seconds", "created_at"),
    )


def cached_evaluations(store: Store, model_fingerprint: str) -> list[dict]:
    """Baseline (original-model) evaluations of a model, oldest first, with their perplexity."""
    return _rows(
        store,
        f"SELECT {_text_name('text_fingerprint')}, window_len, n_windows, n_tokens, perplexity, seconds, created_at "
        "FROM evaluations WHERE model_fingerprint = ? ORDER BY created_at",
        [model_fingerprint],
        ("text", "window_len", "n_windows", "n_tokens", "perplexity", "seconds", "created_at"),
    )


def cached_sweeps(store: Store, model_fingerprint: str) -> list[dict]:
    """Sensitivity sweeps of a model: method, evaluation text and how many points of each kind are stored."""
    return _rows(
        store,
        f"SELECT s.method, {_text_name('r.text_fingerprint')}, r.window_len, r.n_windows, "
        "count(p.sweep_id) FILTER (WHERE p.layer < 0), count(p.sweep_id) FILTER (WHERE p.layer >= 0), s.created_at "
        "FROM sweeps s JOIN reference_distributions r ON r.reference_id = s.reference_id "
        "LEFT JOIN sensitivity_points p ON p.sweep_id = s.sweep_id "
        "WHERE s.model_fingerprint = ? GROUP BY s.sweep_id, s.method, r.text_fingerprint, r.window_len, r.n_windows, "
        "s.created_at ORDER BY s.created_at",
        [model_fingerprint],
        ("method", "evaluation_text", "window_len", "n_windows", "points_by_type", "points_by_layer", "created_at"),
    )


@dataclass(frozen=True)
class SweepLookup:
    """A stored sweep found by its settings, and the original model's perplexity on its evaluation set."""

    sweep_id: str
    original_perplexity: float


def find_sweep(
    store: Store,
    model_fingerprint: str,
    method: str,
    calibration_id: str,
    evaluation_text_fingerprint: str,
    window_len: int,
    n_windows: int,
    reference_id: Optional[str] = None,
) -> Optional[SweepLookup]:
    """The newest sweep for these settings (`calibration_id` is '' for data-free methods), or None; with
    `reference_id`, only a sweep measured against that reference (its key holds the forward dtype).

    Matches on the stored factorisation's calibration and the reference distribution's evaluation
    set, so it finds exactly the sweep a `CompressionSession` with the same settings would extend.
    """
    row = store.fetch_one(
        "SELECT s.sweep_id, r.perplexity FROM sweeps s "
        "JOIN factorizations f ON f.factorization_id = s.factorization_id "
        "JOIN reference_distributions r ON r.reference_id = s.reference_id "
        "WHERE s.model_fingerprint = ? AND s.method = ? AND f.calibration_id = ? AND r.text_fingerprint = ? "
        "AND r.window_len = ? AND r.n_windows = ? AND (? IS NULL OR s.reference_id = ?) "
        "ORDER BY s.created_at DESC LIMIT 1",
        [model_fingerprint, method, calibration_id, evaluation_text_fingerprint, window_len, n_windows, reference_id,
         reference_id],
    )
    return None if row is None else SweepLookup(row[0], float(row[1]))


# -- every cached artifact, its size, and forgetting one ---------------------------------------------------------

ARTIFACT_KINDS: tuple[str, ...] = (
    "calibration", "factorization", "reference", "windows", "evaluation", "weight-spectra", "feature-spectra",
    "sweep", "mlp-sweep", "recovery", "recovery-checkpoint", "study", "export", "model", "array",
)
# artifact kind -> (table, key column) of the records that name an array file (`array_id`)
_RECORD_TABLES = {"calibration": ("calibrations", "calibration_id"),
                  "factorization": ("factorizations", "factorization_id"),
                  "reference": ("reference_distributions", "reference_id"),
                  "recovery": ("recovery_runs", "run_id")}
STUDY_FOLDER = "studies"  # `<cache>/studies/<study_id>.json`: each study's JSON copy (engine.search.mirror)
CHECKPOINT_FOLDER = "recovery"  # `<cache>/recovery/<run_id>.checkpoint.pt`: a stopped recovery run (engine.recovery)


@dataclass(frozen=True)
class CachedArtifact:
    """One thing the cache holds: its rows in the database and its files below the cache folder.

    `artifact_id` is `<kind>:<key>` (what `forget_artifact` takes); `n_bytes` counts its files in the cache
    (array files, a study's JSON copy, a checkpoint, a converted model), 0 for an artifact that is rows alone;
    `on_delete` says what deleting it costs: what is recomputed or lost, and what stays."""

    artifact_id: str
    kind: str
    description: str
    model_fingerprint: Optional[str]
    model: str  # the model's id, '' when the artifact does not record its model
    texts: str  # the texts it was made from, '' when none
    n_bytes: int
    rows: int
    created_at: Optional[datetime]
    files: tuple[str, ...]  # relative to the cache folder
    deletable: bool
    on_delete: str

    @property
    def key(self) -> str:
        return self.artifact_id.split(":", 1)[1]


@dataclass(frozen=True)
class ForgetReport:
    """What `forget_artifact` removed."""

    artifact: CachedArtifact
    rows_deleted: int
    files_deleted: tuple[str, ...]
    bytes_freed: int


def human_bytes(n_bytes: int) -> str:
    """`1.61 GB`, `425.76 MB`, `16.50 kB`, `512 B` (decimal units, as file sizes are usually shown)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.2f} {unit}"
    return f"{n_bytes:,} B"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _folder_size(path: Path) -> int:
    return sum(_file_size(p) for p in path.rglob("*")) if path.is_dir() else 0


def _seconds(value) -> str:
    if value is None:
        return "some time"
    return "under a second" if float(value) < 1 else f"about {float(value):,.0f} s"


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, shapes, metadata), read without torch; {} if unreadable."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length < 100_000_000:
                return {}
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


class _Inventory:
    """The queries behind `cached_artifacts`, sharing the model and array tables read once."""

    def __init__(self, store: Store):
        self.store = store
        self.models = {fp: mid for fp, mid in store.fetch_all("SELECT fingerprint, model_id FROM models")}
        self.arrays = {row[0]: row[1:] for row in store.fetch_all("SELECT array_id, kind, relpath, created_at FROM arrays")}
        self.used_arrays: set[str] = set()

    def array(self, array_id: str) -> tuple[int, tuple[str, ...]]:
        """(bytes on disk, relative path) of an indexed array file; (0, ()) when it is not indexed."""
        self.used_arrays.add(array_id)
        entry = self.arrays.get(array_id)
        if entry is None:
            return 0, ()
        return _file_size(self.store.cache_dir / entry[1]), (entry[1],)

    def artifact(self, kind: str, key: str, description: str, model_fingerprint: Optional[str], texts: str,
                 n_bytes: int, rows: int, created_at, files: tuple[str, ...], on_delete: str,
                 deletable: bool = True) -> CachedArtifact:
        return CachedArtifact(f"{kind}:{key}", kind, description, model_fingerprint,
                              self.models.get(model_fingerprint or "", ""), texts, n_bytes, rows, created_at, files,
                              deletable, on_delete)

    def earlier_form(self, files: tuple[str, ...], kind: str) -> str:
        """A note for an array file in the full form earlier versions wrote (read as it is; computed again, it is
        stored smaller), from its header alone; '' otherwise."""
        header = _safetensors_header(self.store.cache_dir / files[0]) if files else {}
        if kind == "calibration":
            earlier = any(name.endswith(".second_moment") for name in header)
        else:
            earlier = bool(header) and "stored_rank" not in header.get("__metadata__", {})
        return "; earlier full form, stored smaller when computed again" if earlier else ""

    def all(self) -> list[CachedArtifact]:
        found = [*self.calibrations(), *self.factorizations(), *self.references(), *self.evaluations(),
                 *self.spectra(), *self.sweeps(), *self.recoveries(), *self.studies(), *self.exports(),
                 *self.converted_models()]
        found += self.windows_and_orphans()  # last: arrays no record above uses
        return found

    def calibrations(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all(
            f"SELECT c.calibration_id, c.model_fingerprint, {_text_name('c.text_fingerprint')}, c.window_len, "
            "c.n_windows, c.n_groups, c.n_tokens, c.array_id, c.seconds, c.created_at, "
            "(SELECT count(*) FROM factorizations f WHERE f.calibration_id = c.calibration_id), "
            "(SELECT count(*) FROM feature_spectra s WHERE s.calibration_id = c.calibration_id) "
            "FROM calibrations c ORDER BY c.created_at")
        out = []
        for cid, fp, text, length, windows, groups, tokens, array_id, seconds, created, n_fact, n_spectra in rows:
            n_bytes, files = self.array(array_id)
            keeps = []
            if n_fact:
                keeps.append(f"the {n_fact} factorisation(s) computed from it")
            if n_spectra:
                keeps.append("its feature spectra")
            out.append(self.artifact(
                "calibration", cid, f"calibration statistics: {windows} windows × {length} tokens, {groups} groups "
                f"({tokens:,} tokens){self.earlier_form(files, 'calibration')}", fp, text, n_bytes, 1, created, files,
                f"Computed again ({_seconds(seconds)}) the next time a data-aware method, channel pruning or new "
                f"feature spectra need this calibration"
                + (f"; {' and '.join(keeps)} are stored separately and stay." if keeps else ".")))
        return out

    def factorizations(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all(
            f"SELECT f.factorization_id, f.model_fingerprint, f.method, f.calibration_id, f.array_id, f.seconds, "
            f"f.created_at, (SELECT {_text_name('c.text_fingerprint')} FROM calibrations c "
            "WHERE c.calibration_id = f.calibration_id), "
            "(SELECT count(*) FROM sweeps s WHERE s.factorization_id = f.factorization_id) "
            "FROM factorizations f ORDER BY f.created_at")
        out = []
        for fid, fp, method, cid, array_id, seconds, created, text, n_sweeps in rows:
            n_bytes, files = self.array(array_id)
            source = "data-free" if not cid else f"from calibration {cid[:12]}"
            out.append(self.artifact(
                "factorization", fid, f"{method} factors ({source}){self.earlier_form(files, 'factorization')}", fp,
                text or "", n_bytes, 1, created, files,
                f"Computed again ({_seconds(seconds)}) the next time {method} is used on this model"
                + (f"; the {n_sweeps} sweep(s) measured with it keep their points." if n_sweeps else ".")))
        return out

    def references(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all(
            f"SELECT reference_id, model_fingerprint, {_text_name('text_fingerprint')}, window_len, n_windows, kind, "
            "array_id, seconds, created_at FROM reference_distributions ORDER BY created_at")
        out = []
        for rid, fp, text, length, windows, kind, array_id, seconds, created in rows:
            n_bytes, files = self.array(array_id)
            if kind == "top-k":
                description = (f"reference distribution (top-k, RankScope 0.1): {windows} windows × {length} tokens; "
                               "never read since exact KL replaced it")
                on_delete = "Nothing is recomputed: exact-KL references replaced this one."
            else:
                description = f"reference distribution (final hidden states): {windows} windows × {length} tokens"
                on_delete = (f"Computed again ({_seconds(seconds)}) the next time this evaluation set is used; "
                             "stored sweep points and trials stay.")
            out.append(self.artifact("reference", rid, description, fp, text, n_bytes, 1, created, files, on_delete))
        return out

    def evaluations(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all(
            f"SELECT evaluation_id, model_fingerprint, {_text_name('text_fingerprint')}, window_len, n_windows, "
            "perplexity, seconds, created_at FROM evaluations ORDER BY created_at")
        return [self.artifact(
            "evaluation", eid, f"original perplexity {ppl:.3f}: {windows} windows × {length} tokens", fp, text, 0, 1,
            created, (), f"Measured again ({_seconds(seconds)}) when the Model page or `rankscope models --eval` asks.")
            for eid, fp, text, length, windows, ppl, seconds, created in rows]

    def spectra(self) -> list[CachedArtifact]:
        out = []
        for fp, n in self.store.fetch_all(
                "SELECT model_fingerprint, count(*) FROM weight_spectra GROUP BY model_fingerprint ORDER BY 1"):
            out.append(self.artifact("weight-spectra", fp, f"weight spectra of {n} matrices", fp, "", 0, n, None, (),
                                     "Computed again (seconds) when the Spectra page or `rankscope spectra` asks."))
        rows = self.store.fetch_all(
            f"SELECT s.calibration_id, s.covariance, count(*), any_value(c.model_fingerprint), "
            f"any_value({_text_name('c.text_fingerprint')}) FROM feature_spectra s "
            "LEFT JOIN calibrations c ON c.calibration_id = s.calibration_id GROUP BY 1, 2 ORDER BY 1, 2")
        for cid, covariance, n, fp, text in rows:
            out.append(self.artifact(
                "feature-spectra", f"{cid}/{covariance}", f"feature spectra ({covariance}) of {n} matrices, "
                f"calibration {cid[:12]}", fp, text or "", 0, n, None, (),
                "Computed again (seconds, from the calibration, which is computed first if it is gone) when the "
                "Spectra page or `rankscope spectra` asks."))
        return out

    def sweeps(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all(
            f"SELECT s.sweep_id, s.model_fingerprint, s.method, s.created_at, "
            f"(SELECT {_text_name('r.text_fingerprint')} FROM reference_distributions r "
            "WHERE r.reference_id = s.reference_id), "
            "(SELECT count(*) FROM sensitivity_points p WHERE p.sweep_id = s.sweep_id), "
            "(SELECT coalesce(sum(p.seconds), 0) FROM sensitivity_points p WHERE p.sweep_id = s.sweep_id) "
            "FROM sweeps s ORDER BY s.created_at")
        out = [self.artifact(
            "sweep", sid, f"{method} sensitivity sweep: {n} measured points", fp, text or "", 0, 1 + n, created, (),
            f"Its {n} measured points are lost (measuring them again takes {_seconds(seconds)}); the Allocate page's "
            "estimate and the search baselines read them.") for sid, fp, method, created, text, n, seconds in rows]
        for sid, n, seconds, created in self.store.fetch_all(
                "SELECT sweep_id, count(*), sum(seconds), min(created_at) FROM sensitivity_points "
                "WHERE sweep_id NOT IN (SELECT sweep_id FROM sweeps) GROUP BY sweep_id ORDER BY 4"):
            out.append(self.artifact(
                "mlp-sweep", sid, f"MLP sweep (pruning against low rank): {n} measured points", None, "", 0, n,
                created, (), f"Its {n} measured points are lost (measuring them again takes {_seconds(seconds)})."))
        return out

    def recoveries(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all("SELECT run_id, model_fingerprint, kind, steps, tokens, array_id, seconds, "
                                    "created_at FROM recovery_runs ORDER BY created_at")
        out = []
        for run_id, fp, kind, steps, tokens, array_id, seconds, created in rows:
            n_bytes, files = self.array(array_id)
            out.append(self.artifact(
                "recovery", run_id, f"{kind} recovery run: {steps} steps, {tokens:,} tokens", fp, "", n_bytes, 1,
                created, files, "Plans recovered by this run cannot be applied or exported until the same run is "
                f"repeated ({_seconds(seconds)})."))
        folder = self.store.cache_dir / CHECKPOINT_FOLDER
        for path in sorted(folder.glob("*.checkpoint.pt")) if folder.is_dir() else []:
            relpath = str(path.relative_to(self.store.cache_dir))
            out.append(self.artifact(
                "recovery-checkpoint", path.name.removesuffix(".checkpoint.pt"),
                "checkpoint of a stopped recovery run", None, "", _file_size(path), 0,
                datetime.fromtimestamp(path.stat().st_mtime), (relpath,),
                "That run, when started again, begins at step 0 instead of resuming."))
        return out

    def studies(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all(
            "SELECT s.study_id, s.model_fingerprint, s.state, s.created_at, "
            "(SELECT count(*) FROM trials t WHERE t.study_id = s.study_id), "
            "(SELECT count(*) FROM study_results r WHERE r.study_id = s.study_id) FROM studies s ORDER BY s.created_at")
        out = []
        for sid, fp, state, created, n_trials, n_results in rows:
            path = self.store.cache_dir / STUDY_FOLDER / f"{sid}.json"
            files = (str(path.relative_to(self.store.cache_dir)),) if path.is_file() else ()
            out.append(self.artifact(
                "study", sid, f"search study ({state}): {n_trials} trials", fp, "", _file_size(path),
                1 + n_trials + n_results, created, files,
                "A study is work, not a cache: it is not deleted here.", deletable=False))
        return out

    def exports(self) -> list[CachedArtifact]:
        rows = self.store.fetch_all("SELECT export_id, model_fingerprint, path, created_at FROM exports ORDER BY created_at")
        out = []
        for eid, fp, path, created in rows:
            outside = Path(path)
            size = f", {_folder_size(outside) / 1e6:,.1f} MB" if outside.is_dir() else ", no longer there"
            out.append(self.artifact(
                "export", eid, f"export record of {path} (a directory outside the cache{size})", fp, "", 0, 1, created,
                (), "Only the record goes (the Export page's list); the export directory is never touched."))
        return out

    def converted_models(self) -> list[CachedArtifact]:
        out = []
        root = self.store.cache_dir.resolve()
        for fp, model_id, path, created in self.store.fetch_all(
                "SELECT fingerprint, model_id, path, created_at FROM models ORDER BY created_at"):
            folder = Path(path).resolve()
            if root not in folder.parents or not folder.is_dir():
                continue  # a model read in place from the user's own folder is not part of the cache
            out.append(self.artifact(
                "model", fp, f"converted model {model_id}", fp, "", _folder_size(folder), 1, created,
                (str(folder.relative_to(root)),),
                "Not deleted here: the model in use lives there. Delete the folder by hand when no RankScope runs; "
                "`rankscope prepare` converts it again.", deletable=False))
        return out

    def windows_and_orphans(self) -> list[CachedArtifact]:
        out = []
        for array_id, (kind, relpath, created) in sorted(self.arrays.items(), key=lambda item: str(item[1][2])):
            if array_id in self.used_arrays:
                continue
            path = self.store.cache_dir / relpath
            n_bytes = _file_size(path)
            if kind == "windows":
                header = _safetensors_header(path)
                shape = header.get("windows", {}).get("shape", ["?", "?"])
                text = header.get("__metadata__", {}).get("text", "")
                out.append(self.artifact(
                    "windows", array_id, f"token windows: {shape[0]} × {shape[1]} tokens", None, text, n_bytes, 1,
                    created, (relpath,), "Tokenised again (seconds) the next time these windows are used."))
            else:
                out.append(self.artifact(
                    "array", array_id, f"{kind} array that no stored record uses", None, "", n_bytes, 1, created,
                    (relpath,), "Nothing: no stored record reads it."))
        return out


def cached_artifacts(store: Store, model_fingerprint: Optional[str] = None) -> list[CachedArtifact]:
    """Every artifact the cache holds, by kind (`ARTIFACT_KINDS` order) and age; with `model_fingerprint`, those of
    that model only (windows, MLP sweep points and orphan arrays do not record their model, so they are left out)."""
    found = _Inventory(store).all()
    if model_fingerprint is not None:
        found = [a for a in found if a.model_fingerprint == model_fingerprint]
    order = {kind: i for i, kind in enumerate(ARTIFACT_KINDS)}
    return sorted(found, key=lambda a: (order[a.kind], str(a.created_at or "")))


def find_artifact(store: Store, artifact_id: str) -> CachedArtifact:
    """The artifact with this id, or the only one whose id starts with it; `StoreError` naming the candidates otherwise."""
    found = cached_artifacts(store)
    exact = [a for a in found if a.artifact_id == artifact_id]
    matches = exact or [a for a in found if a.artifact_id.startswith(artifact_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise StoreError(f"No cached artifact has the id '{artifact_id}'. Ids look like "
                         f"'{found[0].artifact_id if found else 'calibration:<key>'}' (`rankscope cache list`).")
    names = ", ".join(a.artifact_id for a in matches[:5])
    raise StoreError(f"'{artifact_id}' names {len(matches)} cached artifacts ({names}"
                     f"{', ...' if len(matches) > 5 else ''}); give more of the id.")


def _count(store: Store, sql: str, params: list) -> int:
    return int(store.fetch_one(f"SELECT count(*) FROM {sql}", params)[0])


def _delete(store: Store, table: str, where: str, params: list) -> int:
    n = _count(store, f"{table} WHERE {where}", params)
    if n:
        store.execute(f"DELETE FROM {table} WHERE {where}", params)
    return n


def _array_users(store: Store, array_id: str) -> int:
    return sum(_count(store, f"{table} WHERE array_id = ?", [array_id]) for table, _ in _RECORD_TABLES.values())


def forget_artifact(store: Store, artifact_id: str) -> ForgetReport:
    """Delete one artifact: its rows, then its files (an array file only when no other record uses it).

    Refuses (`StoreError`) an artifact that is not deletable here (studies, converted models) and files outside
    the cache folder. Nothing else is touched: artifacts are keyed by content, so what depended on this one
    either stays valid (stored separately) or computes it again when needed, as its `on_delete` says."""
    artifact = find_artifact(store, artifact_id)
    if not artifact.deletable:
        raise StoreError(f"{artifact.artifact_id} ({artifact.description}) is not deleted here. {artifact.on_delete}")
    kind, key, rows = artifact.kind, artifact.key, 0
    arrays: list[str] = []
    if kind in _RECORD_TABLES:
        table, column = _RECORD_TABLES[kind]
        arrays = [row[0] for row in store.fetch_all(f"SELECT array_id FROM {table} WHERE {column} = ?", [key])]
        rows += _delete(store, table, f"{column} = ?", [key])
    elif kind == "evaluation":
        rows += _delete(store, "evaluations", "evaluation_id = ?", [key])
    elif kind == "weight-spectra":
        rows += _delete(store, "weight_spectra", "model_fingerprint = ?", [key])
    elif kind == "feature-spectra":
        calibration_id, covariance = key.split("/", 1)
        rows += _delete(store, "feature_spectra", "calibration_id = ? AND covariance = ?", [calibration_id, covariance])
    elif kind in ("sweep", "mlp-sweep"):
        rows += _delete(store, "sensitivity_points", "sweep_id = ?", [key])
        rows += _delete(store, "sweeps", "sweep_id = ?", [key])
    elif kind == "export":
        rows += _delete(store, "exports", "export_id = ?", [key])
    elif kind in ("windows", "array"):
        arrays = [key]
    files: list[Path] = []
    for array_id in arrays:
        if _array_users(store, array_id):
            continue  # another record still reads this file
        entry = store.array_entry(array_id)
        if entry is not None:
            rows += 1
            store.forget_array(array_id)
            files.append(store.cache_dir / entry["relpath"])
    if kind == "recovery-checkpoint":
        files.append(store.cache_dir / artifact.files[0])
    deleted, freed = [], 0
    root = store.cache_dir.resolve()
    for path in files:
        resolved = path.resolve()
        if root not in resolved.parents:
            raise StoreError(f"Refusing to delete {path}: it is outside the cache folder {root}.")
        size = _file_size(resolved)
        try:
            resolved.unlink()
        except FileNotFoundError:
            continue
        deleted.append(str(resolved.relative_to(root)))
        freed += size
    return ForgetReport(artifact, rows, tuple(deleted), freed)
