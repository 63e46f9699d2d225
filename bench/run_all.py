"""Run every benchmark in bench/ in turn; each writes its JSON under bench/results/.

The results pages (`*_results.py`, `search_goals.py` then `search_ceiling.py`, `model_steps.py`) take from tens of
minutes to hours and are run on their own; `bench_gpu.py` says "nothing measured" where no GPU is visible.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_spectra.py", "bench_first_spectra.py", "bench_calibration.py", "bench_calibration_memory.py",
              "bench_factorization.py", "bench_compression.py", "bench_trial.py", "bench_sweep.py", "bench_search.py",
              "bench_export.py", "bench_cache_sizes.py", "bench_live_estimate.py", "bench_workers.py", "bench_gpu.py"]

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], check=True)
