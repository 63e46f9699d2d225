"""Run every benchmark in bench/ in turn; each writes its JSON under bench/results/."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_spectra.py", "bench_calibration.py", "bench_factorization.py", "bench_compression.py",
              "bench_trial.py", "bench_sweep.py", "bench_search.py", "bench_export.py"]

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], check=True)
