"""Benchmark of the search loop on the default model; writes bench/results/search.json.

Runs a short feature-pca 5x1 study at a 20% budget (default 12 trials, 8 sensitive validation
windows) in a throwaway in-memory study storage, and reports seconds per trial and the share of
the search loop's wall time spent outside model evaluation (optimiser ask/tell, budget projection,
storing), which should stay under 10%.
Run: `.venv/bin/python bench/bench_search.py [--trials N]`, or `--from-study ID` to measure a study
already in the cache database (loop time from the stored trials' timestamps; use an uninterrupted
study, since a resumed one's loop time includes the pause).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_rss_mib, write_json  # noqa: E402
from engine.compression.session import CompressionSession  # noqa: E402
from engine.texts.settings import TextSettings  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.search.records import InMemoryStudyStorage, TrialKind  # noqa: E402
from engine.search.runner import StudyRunner, create_study  # noqa: E402
from engine.search.settings import StudySettings  # noqa: E402
from engine.store import open_store  # noqa: E402


def from_study(study_id: str) -> None:
    """The same figures for a stored study: consecutive search trials' write times bound each trial."""
    from engine.search.duckdb_storage import DuckDBStudyStorage

    store = open_store()
    storage = DuckDBStudyStorage(store)
    record = storage.get_study(study_id)
    trials = [t for t in storage.trials(study_id) if t.kind == TrialKind.SEARCH]
    rows = store.fetch_all("SELECT number, epoch_us(created_at) FROM trials WHERE study_id = ? ORDER BY number", [study_id])
    written = {number: us / 1e6 for number, us in rows}
    loop_s = written[trials[-1].number] - written[trials[0].number]
    evaluate_s = sum(t.extra["evaluate_s"] for t in trials[1:])
    path = write_json("search", {
        "model": record.settings["model"], "study": study_id, "settings": record.settings,
        "search_trials": len(trials), "validation_windows": len(record.validation["windows"]),
        "seconds_per_trial": round(loop_s / (len(trials) - 1), 3),
        "evaluation_seconds_per_trial": round(evaluate_s / (len(trials) - 1), 3),
        "share_outside_evaluation": round(1 - evaluate_s / loop_s, 4),
        "projection_seconds_per_trial": round(sum(t.extra["project_s"] for t in trials) / len(trials), 4),
    })
    print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--from-study", help="measure this stored study instead of running one")
    args = parser.parse_args()
    if args.from_study:
        from_study(args.from_study)
        return
    store = open_store()
    loaded = load_model("smollm2-135m", store, TerminalProgress())
    session = CompressionSession.open(store, loaded, "feature-pca", TextSettings(), TerminalProgress())
    settings = StudySettings(n_trials=args.trials, n_initial_points=min(10, args.trials))
    storage = InMemoryStudyStorage()
    record = create_study(storage, session, settings, name="bench")
    marks: list[float] = []
    runner = StudyRunner(storage, session, record.study_id, progress=TerminalProgress(),
                         on_trial=lambda t: marks.append(time.perf_counter()) if t.kind == TrialKind.SEARCH else None)
    runner.run()
    trials = [t for t in storage.trials(record.study_id) if t.kind == TrialKind.SEARCH]
    # the loop from the first search trial's end to the last one's: ask, project, evaluate, store, tell
    loop_s = marks[-1] - marks[0]
    evaluate_s = sum(t.extra["evaluate_s"] for t in trials[1:])
    path = write_json("search", {
        "model": "smollm2-135m", "settings": settings.to_dict(), "search_trials": len(trials),
        "validation_windows": len(storage.get_study(record.study_id).validation["windows"]),
        "seconds_per_trial": round(loop_s / (len(trials) - 1), 3),
        "evaluation_seconds_per_trial": round(evaluate_s / (len(trials) - 1), 3),
        "share_outside_evaluation": round(1 - evaluate_s / loop_s, 4),
        "projection_seconds_per_trial": round(sum(t.extra["project_s"] for t in trials) / len(trials), 4),
        "peak_rss_mib": round(peak_rss_mib()),
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
