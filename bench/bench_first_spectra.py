"""Cold-start time to the first spectra: `rankscope spectra` on an empty cache. Writes bench/results/first_spectra.json.

Runs `rankscope --cache <empty temp folder> spectra --model smollm2-135m` as a subprocess, the way a user runs it.
The temp cache's `models/` links the model already prepared in the project cache (`rankscope prepare`), so the
one-off GGUF conversion is not timed; everything else starts cold: windows, weight spectra, calibration, feature
spectra. The command prints the weights' rank shares at once, then the spectra of each calibration snapshot
("refining: n/N windows"), then the final stored result; this script timestamps each line as it arrives.

Reports, from the start of the command: the weight spectra, the first snapshot's spectra (target: under 120 s),
each later snapshot, and the final result.

Run: `.venv/bin/python bench/bench_first_spectra.py` (128 windows of 512 tokens, 32 groups: the defaults). A quick
check that takes about two minutes on a small machine: `--windows 16 --groups 4 --name first_spectra_smoke`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_json  # noqa: E402
from engine.paths import PROJECT_ROOT  # noqa: E402

TARGET_S = 120.0
REFINING = re.compile(r"refining: (\d+)/(\d+) windows")


def cold_cache(model: str, prepared_root: Path) -> Path:
    """An empty cache folder whose `models/<model>` links the prepared model (so prepare is not repeated)."""
    prepared = prepared_root / "models" / model
    if not (prepared / "config.json").is_file():
        raise SystemExit(f"{prepared} is not prepared: run `rankscope prepare --model {model}` first.")
    root = Path(tempfile.mkdtemp(prefix="rankscope-cold-"))
    (root / "models").mkdir()
    (root / "models" / model).symlink_to(prepared.resolve(), target_is_directory=True)
    return root


def timed_lines(command: list[str], stderr_path: Path) -> tuple[list[tuple[float, str]], float, int]:
    """Run `command`, timestamping each stdout line from the start; returns the lines, the total time, the exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines = []
    start = time.perf_counter()
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        for line in process.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
        code = process.wait()
    return lines, time.perf_counter() - start, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--prepared-cache", type=Path, default=Path(os.environ.get("RANKSCOPE_CACHE", PROJECT_ROOT / "cache")),
                        help="The cache folder holding the prepared model (default: $RANKSCOPE_CACHE or ./cache).")
    parser.add_argument("--name", default="first_spectra", help="Results file name under bench/results/.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary cache folder.")
    args = parser.parse_args()

    root = cold_cache(args.model, args.prepared_cache)
    command = [str(Path(sys.executable).parent / "rankscope"), "--cache", str(root), "spectra", "--model", args.model,
               "--windows", str(args.windows), "--window-len", str(args.window_len), "--groups", str(args.groups)]
    try:
        lines, total, code = timed_lines(command, root / "stderr.log")
        if code != 0:
            raise SystemExit(f"{' '.join(command)} failed ({code}):\n{(root / 'stderr.log').read_text()[-3000:]}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    weights_s = next((t for t, line in lines if "no calibration needed" in line), None)
    snapshots = [{"windows_done": int(match.group(1)), "windows_total": int(match.group(2)), "s": round(t, 1)}
                 for t, line in lines for match in [REFINING.search(line)] if match]
    first = snapshots[0]["s"] if snapshots else None
    path = write_json(args.name, {
        "command": " ".join(["rankscope", "--cache", "<empty temp folder>", *command[4:]]),
        "measured": "a subprocess, from its start to each line of its output (model load and imports included)",
        "model": args.model, "windows": args.windows, "window_len": args.window_len, "groups": args.groups,
        "weight_spectra_s": None if weights_s is None else round(weights_s, 1),
        "first_spectra_s": first,
        "snapshots": snapshots,
        "final_s": round(total, 1),
        "target_first_spectra_s": TARGET_S,
        "first_spectra_within_target": first is not None and first <= TARGET_S,
        "output": [f"{t:7.1f} s  {line}" for t, line in lines],
    })
    print(path.read_text())


if __name__ == "__main__":
    main()
