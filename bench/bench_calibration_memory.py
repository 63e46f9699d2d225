"""Calibration memory, whole model against layer by layer, on a 0.5B-class model. Writes
bench/results/calibration_memory.json.

No 0.5B model ships with a PyPI package, so this builds one: a random-weight Qwen2 with Qwen2.5-0.5B's shapes
(24 layers, hidden 896, MLP width 4864, 14 query and 2 key/value heads; the default model's tokenizer and its
49,152-token vocabulary), saved as a Hugging Face directory. Memory and time do not depend on the weights' values.
Then, each as one whole process the way a user runs it, on a cache folder of its own that starts empty:

- `load only`: the model loaded and nothing else (the floor: what the weights and libraries take);
- `rankscope calibrate --whole-model`: every layer's float64 sums at once (as before);
- `rankscope calibrate --by-layer`: one layer's sums at a time, each finished layer written to the file as it comes.

Peak memory is each process's own maximum resident set (`wait4`'s rusage). Both calibrations must store the same
statistics: their array files are compared tensor by tensor (`torch.equal`). Target: the layer-by-layer run peaks at
or under 4 GiB.

Run: `.venv/bin/python bench/bench_calibration_memory.py [--windows 16] [--groups 4]` (4 minutes here on 2026-12-01;
the whole-model run needs about 19 GiB free: it peaked at 19.0 GiB). `--layers N` makes a smaller model for a quick check.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import run_measured, write_json  # noqa: E402
from engine.paths import PROJECT_ROOT  # noqa: E402

RANKSCOPE = str(Path(sys.executable).with_name("rankscope"))
TARGET_MIB = 4096
QWEN_05B_SHAPES = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True)


def build_model(directory: Path, layers: int, vocab_size: int | None = None) -> dict:
    """A random-weight Qwen2 of Qwen2.5-0.5B's shapes with the default model's tokenizer, saved in `directory`.
    `vocab_size` above the tokenizer's gives the model more output rows than tokens (Qwen2.5's own 151,936 makes the
    LM head, and so an evaluation, cost what the real model's does); default: the tokenizer's 49,152."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(PROJECT_ROOT / "cache" / "models" / "smollm2-135m")
    vocab_size = vocab_size or len(tokenizer)
    config = Qwen2Config(vocab_size=vocab_size, num_hidden_layers=layers, **QWEN_05B_SHAPES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {"layers": layers, **QWEN_05B_SHAPES, "vocab_size": vocab_size, "tokenizer_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters())}


def same_statistics(cache_a: Path, cache_b: Path) -> dict:
    """Compare the calibration array files of two caches tensor by tensor, reading one tensor at a time."""
    import torch
    from safetensors import safe_open

    (file_a,), (file_b,) = (list((c / "arrays" / "calibration").glob("*.safetensors")) for c in (cache_a, cache_b))
    with safe_open(str(file_a), framework="pt") as a, safe_open(str(file_b), framework="pt") as b:
        names = sorted(a.keys())
        if names != sorted(b.keys()):
            return {"identical": False, "why": "different tensor names"}
        unequal = [name for name in names if not torch.equal(a.get_tensor(name), b.get_tensor(name))]
    return {"identical": not unequal, "tensors": len(names), "unequal": unequal[:10],
            "file_mib": round(file_a.stat().st_size / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the built model (24: 0.5B-class)")
    parser.add_argument("--name", default="calibration_memory", help="results file name under bench/results/")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rankscope-calibration-memory-"))
    try:
        model_dir = work / "qwen2-0.5b-shaped"
        model = build_model(model_dir, args.layers)
        calibrate = ["calibrate", "--model", str(model_dir), "--windows", str(args.windows), "--window-len",
                     str(args.window_len), "--groups", str(args.groups), "--json"]
        runs = {"load only": run_measured(
            [sys.executable, "-c", "import sys; from engine.models.loading import load_model; from engine.store "
             "import open_store; load_model(sys.argv[1], open_store())", str(model_dir)],
            {"RANKSCOPE_CACHE": str(work / "load-only")})}
        for mode in ("whole-model", "by-layer"):
            print(f"calibrate --{mode} ...", flush=True)
            runs[mode] = run_measured([RANKSCOPE, *calibrate, f"--{mode}"], {"RANKSCOPE_CACHE": str(work / mode)})
            print(f"  {runs[mode]['seconds']} s, peak {runs[mode]['peak_rss_mib']} MiB", flush=True)
        comparison = same_statistics(work / "whole-model", work / "by-layer")
        by_layer = runs["by-layer"]["peak_rss_mib"]
        result = {"model": model, "windows": args.windows, "window_len": args.window_len, "groups": args.groups,
                  "runs": runs, "statistics": comparison, "target_peak_mib": TARGET_MIB,
                  "by_layer_over_whole_model_peak": round(by_layer / runs["whole-model"]["peak_rss_mib"], 3),
                  "meets_target": by_layer <= TARGET_MIB and comparison["identical"]}
        path = write_json(args.name, result)
        print({k: v for k, v in result.items() if k != "runs"}, f"-> {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
