"""Shared helpers for benchmark and results scripts: the default model, timing, peak memory, output."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
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


def run_measured(command: list[str], env: dict[str, str]) -> dict:
    """`command` as its own process (in the project folder, `env` added to this one's): wall time, its CPU time (user
    + system, all its threads: not stretched by other work on the machine), its own peak resident set (`wait4`'s
    rusage), its JSON output when it printed some, and the 1-minute load average before it. Child processes it
    starts (Ray workers) are not counted. Exits with the command's output when it fails."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **env},
                                 stdout=out, stderr=err, text=True)
        _pid, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed ({returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    try:
        output = json.loads(stdout) if stdout.strip() else None
    except json.JSONDecodeError:
        output = None
    return {"seconds": round(seconds, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "load_before": round(load_before, 2), "output": output}
