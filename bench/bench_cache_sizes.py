"""Cache sizes: one calibration and one factorisation in the earlier full form against the stored form. Writes
bench/results/cache_sizes.json.

On the default model, in a cache folder of its own (`--cache`, so the project cache can stay in use):
- calibration: `ensure_calibration` over the first `--windows` windows of `--window-len` tokens with `--groups`
  groups stores the compact form (upper triangle of Σxxᵀ, token count, group sums); its bytes are the array
  file the store recorded. The earlier form is `CalibrationStatistics.legacy_tensors()` of the same statistics
  (exactly what `to_tensors` wrote before: mean, second moment, pooled covariance, L2 norms, token count, all
  float64), written by the same `save_arrays` into the same cache (and deleted again once measured). Sizes
  depend on the sites' widths and the number of groups, not on the windows' count or length: 32 windows in 32
  groups have the sizes of the default calibration (128 windows of 512 tokens in 32 groups: equal groups).
- factorisation (`--method`, feature-pca by default): `ensure_factorization` stores the factors cut at each
  unit's break-even rank and the component energies; the earlier form is the full-rank factorisation the method
  computed in the same call (captured before it was cut), written with `Factorization.to_tensors()` as before.
Both loaded forms are checked to give the same statistics (bit for bit) and the same cut factors, and the time
to load each from the cache (read, checksum, build the value) is reported; a compact calibration's sites are
derived when first used, which is timed apart (every site).

Run: `.venv/bin/python bench/bench_cache_sizes.py --cache /tmp/sizes-cache [--windows 32 --window-len 128]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import peak_rss_mib, write_json  # noqa: E402
from engine.cache import factorization as factorization_cache  # noqa: E402
from engine.cache.calibration import ensure_calibration  # noqa: E402
from engine.cache.factorization import ensure_factorization, load_stored  # noqa: E402
from engine.calibration import CalibrationStatistics  # noqa: E402
from engine.models.loading import load_model  # noqa: E402
from engine.paths import PROJECT_ROOT, choose_cache_root  # noqa: E402
from engine.progress import TerminalProgress  # noqa: E402
from engine.store import open_store  # noqa: E402
from engine.store.arrays import load_arrays_with_metadata, save_arrays  # noqa: E402
from engine.store.cache_inventory import cached_artifacts, forget_artifact  # noqa: E402
from engine.texts.windows import Windowing  # noqa: E402

DEFAULT_MODEL = PROJECT_ROOT / "cache" / "models" / "smollm2-135m"  # the converted default model, read in place
OLD_KIND, OLD_CALIBRATION, OLD_FACTORIZATION = "bench-old-form", "old-form-calibration", "old-form-factorization"


def _timed_load(store, array_id: str, build):
    """(seconds, value): reading an indexed array file (checksum included) and building the value from it."""
    start = time.perf_counter()
    tensors, metadata = load_arrays_with_metadata(store, array_id)
    value = build(tensors, metadata)
    return time.perf_counter() - start, value


def _by_name(tensors: dict, separator: str) -> dict[str, int]:
    """Bytes of the tensors by their name's last part (e.g. `second_moment`, `B`)."""
    out: dict[str, int] = {}
    for name, t in tensors.items():
        key = name.rsplit(separator, 1)[-1]
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return dict(sorted(out.items()))


def _same_statistics(a: CalibrationStatistics, b: CalibrationStatistics) -> bool:
    names = ("mean", "second_moment", "pooled_covariance", "l2_norm", "covariance")
    return set(a.sites) == set(b.sites) and all(
        torch.equal(getattr(a.sites[k], n), getattr(b.sites[k], n)) for k in a.sites for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="a cache folder of its own (created)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else "smollm2-135m")
    parser.add_argument("--text", default="war-and-peace")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--window-len", type=int, default=128)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--method", default="feature-pca")
    args = parser.parse_args()
    choose_cache_root(args.cache)
    store = open_store(args.cache / "rankscope.duckdb")
    loaded = load_model(args.model, store, TerminalProgress())

    start = time.perf_counter()
    calibration = ensure_calibration(store, loaded, args.text, Windowing(args.window_len, args.windows), args.groups,
                                     TerminalProgress())
    calibration_seconds = time.perf_counter() - start
    entry = store.array_entry(calibration.record.array_id)
    new_calibration = (args.cache / entry["relpath"]).stat().st_size
    legacy = calibration.statistics.legacy_tensors()
    save_arrays(store, OLD_CALIBRATION, OLD_KIND, legacy, {"model": loaded.model_id, "text": args.text})
    old_calibration = store.array_entry(OLD_CALIBRATION)["n_bytes"]
    load_old, from_old = _timed_load(store, OLD_CALIBRATION, lambda t, _m: CalibrationStatistics.from_tensors(t, args.groups))
    load_new, from_new = _timed_load(store, calibration.record.array_id,
                                     lambda t, _m: CalibrationStatistics.from_tensors(t, args.groups))
    start = time.perf_counter()
    for _ in from_new.sites.values():  # each site is derived when first used: here, all of them
        pass
    derive_new = time.perf_counter() - start
    stored, _ = load_arrays_with_metadata(store, calibration.record.array_id)

    captured = {}
    cut = factorization_cache.cut_factorization

    def capture(full):
        captured["full"] = full
        return cut(full)

    factorization_cache.cut_factorization = capture
    try:
        start = time.perf_counter()
        record, factorization = ensure_factorization(store, loaded, args.method, calibration, TerminalProgress())
        factorization_seconds = time.perf_counter() - start
    finally:
        factorization_cache.cut_factorization = cut
    if "full" not in captured:
        raise SystemExit(f"The {args.method} factorisation was already in {args.cache}: use an empty cache folder.")
    old_tensors, old_metadata = captured["full"].to_tensors()
    entry = store.array_entry(record.array_id)
    new_factorization = (args.cache / entry["relpath"]).stat().st_size
    save_arrays(store, OLD_FACTORIZATION, OLD_KIND, old_tensors, old_metadata)
    old_factorization = store.array_entry(OLD_FACTORIZATION)["n_bytes"]
    load_old_f, from_full = _timed_load(store, OLD_FACTORIZATION, load_stored)
    load_new_f, again = _timed_load(store, record.array_id, load_stored)
    new_tensors, _ = load_arrays_with_metadata(store, record.array_id)
    same_factors = set(again.factors) == set(from_full.factors) and all(
        torch.equal(again.factors[p].B, from_full.factors[p].B) and torch.equal(again.factors[p].A, from_full.factors[p].A)
        for p in again.factors) and all(torch.equal(again.energies[p], from_full.energies[p]) for p in again.factors)
    listed = {a.kind: a.n_bytes for a in cached_artifacts(store, loaded.fingerprint)
              if a.kind in ("calibration", "factorization")}
    for array_id in (OLD_CALIBRATION, OLD_FACTORIZATION):  # the earlier forms were measured: drop them again
        forget_artifact(store, f"array:{array_id}")

    result = {
        "model": loaded.model_id,
        "command": "bench/bench_cache_sizes.py " + " ".join(sys.argv[1:]),
        "calibration": {
            "text": args.text, "windows": args.windows, "window_len": args.window_len, "groups": args.groups,
            "seconds": round(calibration_seconds, 1),
            "old_bytes": old_calibration, "new_bytes": new_calibration, "listed_bytes": listed.get("calibration"),
            "ratio": round(new_calibration / old_calibration, 4),
            "old_tensor_bytes": _by_name(legacy, "."), "new_tensor_bytes": _by_name(stored, "."),
            "load_seconds_old_form": round(load_old, 2), "load_seconds_new_form": round(load_new, 2),
            "derive_every_site_seconds_new_form": round(derive_new, 2),
            "identical_after_loading": (_same_statistics(from_new, from_old)
                                        and _same_statistics(from_new, calibration.statistics)),
        },
        "factorization": {
            "method": args.method, "seconds": round(factorization_seconds, 1),
            "old_bytes": old_factorization, "new_bytes": new_factorization, "listed_bytes": listed.get("factorization"),
            "ratio": round(new_factorization / old_factorization, 4),
            "old_tensor_bytes": _by_name(old_tensors, "::"), "new_tensor_bytes": _by_name(new_tensors, "::"),
            "load_seconds_old_form": round(load_old_f, 2), "load_seconds_new_form": round(load_new_f, 2),
            "identical_after_loading": same_factors,
        },
        "both": {"old_bytes": old_calibration + old_factorization, "new_bytes": new_calibration + new_factorization,
                 "ratio": round((new_calibration + new_factorization) / (old_calibration + old_factorization), 4)},
        "peak_rss_mib": round(peak_rss_mib()),
    }
    path = write_json("cache_sizes", result)
    for kind in ("calibration", "factorization", "both"):
        r = result[kind]
        print(f"{kind}: {r['old_bytes'] / 1e6:,.1f} MB -> {r['new_bytes'] / 1e6:,.1f} MB ({r['ratio']:.1%})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
