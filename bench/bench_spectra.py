"""Benchmark of calibration and spectra on the default model; writes bench/results/spectra.json.

Runs `rankscope spectra --model smollm2-135m --json` (128 x 512 tokens of War and Peace) once,
which computes whatever is not cached yet, then three more times to time the answer from the store
(target: under 3 s for the whole command). Reports the stored calibration time too.
Run: `.venv/bin/python bench/bench_spectra.py`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_json  # noqa: E402

COMMAND = [str(Path(sys.executable).parent / "rankscope"), "spectra", "--model", "smollm2-135m", "--json"]


def _run() -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run(COMMAND, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - start, json.loads(out)


def main() -> None:
    first_s, first = _run()
    warm = [_run()[0] for _ in range(3)]
    from engine.records import CalibrationRecord
    from engine.store import open_store

    record = open_store().get_record(CalibrationRecord, first["calibration_id"])
    summary = {s["type"]: s for s in first["summary_by_type"]["0.9"]}
    path = write_json("spectra", {
        "command": " ".join(COMMAND[1:]),
        "first_run_s": round(first_s, 2), "first_run_from_cache": first["from_cache"],
        "warm_runs_s": [round(t, 3) for t in warm], "warm_median_s": round(statistics.median(warm), 3),
        "calibration": {"windows": record.n_windows, "window_len": record.window_len, "groups": record.n_groups,
                        "seconds": round(record.seconds, 1),
                        "seconds_per_window": round(record.seconds / record.n_windows, 3)},
        "rank_share_for_90pct_energy": {t: {"weights": round(s["weight_rank_share"], 3),
                                            "features": round(s["feature_rank_share"], 3)} for t, s in summary.items()},
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
