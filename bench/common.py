"""Shared helpers for benchmark and results scripts: the default model, timing, peak memory, output."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine import __version__

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed(into: dict, key: str):
    start = time.perf_counter()
    yield
    into[key] = round(time.perf_counter() - start, 4)


def environment() -> dict:
    return {"engine_version": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
            "measured_at": datetime.now(timezone.utc).isoformat()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


def kl_note(environment_of_run: dict) -> str:
    """What the KL numbers of a stored run are: exact since RankScope 0.2, a top-k estimate before."""
    major_minor = tuple(int(x) for x in environment_of_run["engine_version"].split(".")[:2])
    if major_minor >= (0, 2):
        return "KL values are exact over the full vocabulary."
    return ("KL values, and the studies' objective, are RankScope 0.1.0's top-1024 + tail-bucket estimate, which reads "
            "low (compression-results.md measures by how much on this model); RankScope 0.2 computes KL exactly, and "
            "rerunning this script measures with it.")


def rendered_from_stored(name: str, render, doc: Path) -> None:
    """Write `doc` again from the stored `bench/results/<name>.json`, without measuring anything."""
    doc.write_text(render(json.loads((RESULTS / f"{name}.json").read_text())))
    print(f"wrote {doc} from {RESULTS / f'{name}.json'}")


def results_main(name: str, description: str, measure, render, doc: Path) -> None:
    """The command line of a results script: measure, store `bench/results/<name>.json` and write `doc` from
    it; with `--render-only`, rewrite `doc` from the stored JSON without measuring."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from the stored JSON")
    if parser.parse_args().render_only:
        rendered_from_stored(name, render, doc)
        return
    path = write_json(name, measure())
    doc.write_text(render(json.loads(path.read_text())))
    print(f"wrote {path} and {doc}")
