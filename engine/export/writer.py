"""Export a compressed model as a Hugging Face directory that reloads anywhere, and prove it (DESIGN.md §12).

`export_compressed(session, plan, out_dir)` applies the plan to the session's model in place, writes
the directory described in `engine.export.format` (config.json with a `rankscope_compression`
section, model.safetensors with the factors, tokenizer files, rank_plan.json, the generated
modeling_rankscope.py and a README.md model card) into a temporary sibling folder, and then proves
it before anything appears at `out_dir`: it reloads the folder through `load_compressed` and through
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, compares logits with the
in-memory compressed model on the first evaluation window (identical for the low-rank form; float32
max abs diff < 1e-4 for the dense form), compares every reloaded tensor bit for bit with the tensor
written, and checks that the reloaded parameter count is the plan's (so no dense weights crept back). Any failed check raises `ExportError` and leaves `out_dir` untouched;
on success the folder is renamed into place. `dense=True` writes `W_r = B_r A_r` as plain
`nn.Linear` weights instead: a standard transformers model, not smaller than the original.

Each piece of work is done once. When the plan records its metrics for these evaluation windows (as
`rankscope compress --save-plan` writes it), the reloads hold the written tensors bit for bit and give
identical logits on the check windows, the reloaded model is the model those metrics were measured on,
so they are reported without evaluating anything on all windows (`evaluate_reload=False`, the default).
The reload is evaluated on all windows when asked (`evaluate_reload=True`, `--evaluate-reload`), when
the plan has no metrics for these windows, or when a reloaded tensor differs; its perplexity is then
compared with the plan's record, and the in-memory model is evaluated only when the plan has no metrics
for these windows or its record disagrees with the reload (a stale or edited record: the in-memory
measurement then decides). Where the reload is evaluated, its check-window logits are taken from that
evaluation's own forward passes. Tokens/s is timed on the side-by-side generation itself (per decode
step, `engine.export.report`). The report's `timings` give the seconds of each part (0 for a part
that did not run).

A plan that prunes MLP channels (LoRAP, `rankscope.plan/v2`) exports its pruned MLPs as smaller dense
linears, listed in the section's `pruned` (schema `rankscope.compression/v2`); which linears those are
comes from the plan's kept channels and the session's MLP shapes, and their sizes from the pruned modules
themselves, checked against the plan. A dense export cannot hold them (a plain config has one
intermediate size for all layers), so `dense=True` with such a plan is refused before any work.

Every export carries `rankscope_manifest.json` (size and sha256 of each file it wrote), and all its
files get the same permissions (what the umask gives a new file). The target (DESIGN.md §14: nothing
deletes a directory it did not create) may be new or empty; an earlier RankScope export there is
replaced only with `overwrite=True`, and only when it holds nothing but the files that export wrote;
any other directory is never modified.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import stat
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from engine.compression.lowrank import restore_
from engine.compression.plan import RankPlan
from engine.compression.session import CompressionSession
from engine.export.format import (
    CARD_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    PLAN_FILE,
    SECTION,
    SUPPORTED_SCHEMAS,
    WEIGHTS_FILE,
    CompressionConfig,
    ExportError,
    count_module_parameters,
    describe_source,
    load_compressed,
    original_weights_bytes,
    read_manifest,
    unique_state_dict,
    write_manifest,
    write_safetensors,
)
from engine.export.modeling import MODELING_FILE, auto_map, modeling_source, remote_class_name
from engine.export.report import (
    DEFAULT_CHECK_WINDOWS,
    DEFAULT_NEW_TOKENS,
    DEFAULT_PROMPT,
    DEFAULT_TIMING_RUNS,
    Check,
    ExportReport,
    generate_and_time,
    render_model_card,
)
from engine.hashing import sha256_json
from engine.methods import get_method
from engine.metrics import QualityResult, evaluate_quality
from engine.models.device import input_device
from engine.progress import ProgressCallback, ProgressTracker

LOGITS_TOLERANCE = 1e-4  # dense form: float32 max abs difference between reloaded and in-memory logits
LOW_RANK_LOGITS_TOLERANCE = 0.0  # low-rank form: the reload holds the in-memory factors, so its logits are identical
PERPLEXITY_RTOL = 1e-4  # relative difference of re-evaluated perplexity (and of the KLs, against a plan's record)
KL_FLOOR = 1e-2  # a recorded KL agrees within PERPLEXITY_RTOL * max(|KL|, KL_FLOOR): near-zero KLs get an absolute limit
# the parts of an export's time (ExportReport.timings, seconds), in the order they run
TIMING_PARTS = {
    "write_s": "apply the plan, write weights, config, tokenizer, plan and manifest",
    "in_memory_s": "the in-memory model's logits on the check windows, and its evaluation when the plan has no metrics",
    "reload_s": "reload through load_compressed and through transformers (manifest hashes included)",
    "compare_s": "every reloaded tensor compared bit for bit with the tensor written (both reloads)",
    "logits_s": "the transformers reload's logits on the check windows",
    "evaluation_s": "the load_compressed reload's check-window logits, and its evaluation on every window when it is "
                    "evaluated (the logits check then rides on it)",
    "generation_s": "the side-by-side generation, timed for tokens/s, and any further timed runs (timing_runs > 1)",
    "finish_s": "model card, manifest again, permissions, move into place",
}
# Llama-style config switches that give q/k/v/o (attention_bias) or gate/up/down (mlp_bias) a bias: a dense
# export needs them when the method adds a bias (feature-pca's mean compensation) to linears that had none.
_BIAS_SWITCHES = ("attention_bias", "mlp_bias")


@dataclass
class _Written:
    """What the writing step knows that the checks need: the in-memory model's outputs and counts."""

    compression: CompressionConfig
    tensors: dict[str, torch.Tensor]  # what model.safetensors holds, by name (each tied tensor once)
    check_logits: list[torch.Tensor]  # per check window: [L, V] logits of the in-memory compressed model
    compressed: dict  # the compressed model's metrics on the evaluation windows: perplexity, kl_forward, kl_reverse, tokens
    compressed_from: str  # "plan" (its record for these windows) or "in-memory" (measured before writing)
    added_bias: int  # bias parameters on linears that had no bias in the original
    removed_bias: int  # bias parameters of pruned channels (the plan counts weights only)
    weights_elements: int


class _Stopwatch:
    """Seconds per named part of the export (a part timed twice adds up)."""

    def __init__(self) -> None:
        self.start, self.parts = time.perf_counter(), {}

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] = self.parts.get(part, 0.0) + time.perf_counter() - begun

    def report(self) -> dict[str, float]:
        # to the millisecond, parts down and the total up, so that the parts never add up to more than the total
        parts = {k: math.floor(self.parts.get(k, 0.0) * 1000) / 1000 for k in TIMING_PARTS}  # 0: the part did not run
        return {**parts, "total_s": math.ceil((time.perf_counter() - self.start) * 1000) / 1000}


def export_compressed(
    session: CompressionSession,
    plan: RankPlan,
    out_dir: Path | str,
    dense: bool = False,
    overwrite: bool = False,
    prompt: str = DEFAULT_PROMPT,
    progress: Optional[ProgressCallback] = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    timing_runs: int = DEFAULT_TIMING_RUNS,
    check_windows: int = DEFAULT_CHECK_WINDOWS,
    evaluate_reload: bool = False,
) -> ExportReport:
    """Write `plan` applied to the session's model to `out_dir`, verify the reload, and report.

    Example: `export_compressed(session, session.uniform_plan(0.2), "exports/fpca-20")`.
    `out_dir` may be new or empty; an earlier RankScope export there is replaced only with
    `overwrite=True` (and only after the new one passed its checks), and never when it holds files
    that export did not write. The session's model is compressed in place while writing and
    restored afterwards. `check_windows` evaluation windows (the first ones) have their logits compared
    after each reload; `timing_runs` timed generations per model give tokens/s. `evaluate_reload`: evaluate
    the reloaded model on every evaluation window even when the plan records its metrics for them (without
    it, the recorded metrics are reported once the reload is proven to hold the written tensors bit for bit). Raises `ExportError`
    (or `PlanError`) with the reason when the target is refused, the plan does not fit the session or
    the written directory does not reproduce the in-memory model.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if min(max_new_tokens, timing_runs, check_windows) < 1:
        raise ExportError("New tokens, timing runs and check windows must each be at least 1.")
    check_export_storage(plan, dense)
    check_export_target(out_dir, overwrite)
    _check_plan_fits(session, plan)
    _check_transformers_class(session.loaded.model)
    storage = "dense" if dense else "low-rank"
    clock = _Stopwatch()
    tracker = ProgressTracker(progress, f"export ({storage})", total=4, unit="steps")
    # staged as <parent>/.rankscope-export-<id>/<name>: the same folder name as the target, so transformers'
    # remote-code cache (keyed by folder name and file hash) gains no extra entry for the staging folder
    staging = out_dir.parent / f".rankscope-export-{uuid.uuid4().hex[:8]}" / out_dir.name
    staging.mkdir(parents=True)
    try:
        check_ids = session.windows[:check_windows]  # [n, L]
        written = _write(session, plan, staging, storage, check_ids, progress, clock)
        with clock("write_s"):
            write_manifest(staging)  # the reload checks below go through the manifest check too
        tracker.advance()
        verified = _verify(session, plan, staging, written, check_ids, storage, progress, clock, evaluate_reload)
        tracker.advance()
        original, tokenizer = session.loaded.model, session.loaded.tokenizer
        with clock("generation_s"):  # the side-by-side generation is each model's first timed run
            generation, speed = generate_and_time(original, verified.model, tokenizer, prompt, max_new_tokens,
                                                  timing_runs)
        tracker.advance()
        with clock("finish_s"):
            report = ExportReport(
                out_dir=str(out_dir), storage=storage, method=plan.method, model_id=session.loaded.model_id, files={},
                weights_bytes=(staging / WEIGHTS_FILE).stat().st_size,
                original_weights_bytes=original_weights_bytes(session.loaded.path),
                parameters={**plan.parameters, "expected_from_plan": _planned_count(plan, storage),
                            "added_bias": written.added_bias, "removed_bias": written.removed_bias,
                            "weights_file_elements": written.weights_elements,
                            "reloaded": count_module_parameters(verified.model),
                            "reloaded_transformers": verified.transformers_count},
                quality={"original": session.original_quality(), "compressed": verified.compressed,
                         "reloaded": verified.quality},
                evaluation=_evaluation_context(session),
                logits_max_abs_diff=verified.logits_max_abs_diff,
                speed=speed, generation=generation, checks=verified.checks, pruning=_pruning_summary(session, plan),
                compressed_quality_from=verified.compressed_from, reload_evaluated=verified.evaluated,
                measured_on={"device": session.loaded.device, "dtype": session.loaded.dtype},
            )
            (staging / CARD_FILE).write_text(render_model_card(report))
            write_manifest(staging)  # now with the model card
            _same_permissions(staging)
            report.files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
            _move_into_place(staging, out_dir, overwrite)
        report.timings = clock.report()  # up to the move; stored with the report below
        session.store.record_export(sha256_json([str(out_dir), report.to_dict()])[:32], session.loaded.fingerprint,
                                    str(out_dir), report.to_dict())
        tracker.advance()
        return report
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)  # empty after a successful move


# -- before writing ----------------------------------------------------------------------------------------------

def check_export_storage(plan: RankPlan, dense: bool) -> None:
    """Refuse a dense export of a plan that prunes MLP channels, saying why and what to do; nothing is loaded.

    A dense export is a plain transformers model, whose config has one `intermediate_size` for every layer, so
    MLPs pruned to their own widths cannot be written as one. The low-rank export holds them."""
    pruned = {path: kept for path, kept in (plan.channels or {}).items() if kept is not None}
    if dense and pruned:
        shown = ", ".join(f"{path} keeps {kept}" for path, kept in list(pruned.items())[:3])
        raise ExportError(
            f"This plan prunes the channels of {len(pruned)} MLP(s) ({shown}{', ...' if len(pruned) > 3 else ''}), "
            "which a dense export cannot hold: it is a plain transformers model, whose config has one "
            "intermediate_size for every layer. Export the low-rank form instead (without --dense): it stores the "
            "pruned MLPs as smaller dense linears and reloads with load_compressed or trust_remote_code=True.")


def _check_plan_fits(session: CompressionSession, plan: RankPlan) -> None:
    """The plan must be for this model and method, and factorised from the same calibration."""
    plan.validate_for(session.shapes)  # PlanError naming both models when it is another model's plan
    if plan.method != session.method:
        raise ExportError(f"The plan uses method '{plan.method}' but the session factorised with '{session.method}'; "
                          "open the session with the plan's method.")
    if not get_method(plan.method).needs or plan.calibration is None:
        return
    ours = {"text_fingerprint": session.calibration.record.text_fingerprint,
            "window_len": session.texts.calibration_windowing.window_len,
            "n_windows": session.texts.calibration_windowing.n_windows, "n_groups": session.texts.n_groups}
    differing = [key for key, value in ours.items() if plan.calibration.get(key) != value]
    if differing:
        c = plan.calibration
        raise ExportError(
            f"The plan was measured with {plan.method} factors calibrated on '{c.get('text')}' ({c.get('n_windows')} "
            f"windows of {c.get('window_len')}, {c.get('n_groups')} groups), but this session calibrates differently "
            f"({', '.join(differing)} differ), so the exported model would not be the one the plan measured. Export "
            f"with --calibration-text {c.get('text')} --calibration-windows {c.get('n_windows')} "
            f"--window-len {c.get('window_len')} --groups {c.get('n_groups')}."
        )


# What RankScope wrote into an export before manifests existed (0.1.0): its own files and the tokenizer files that
# `save_pretrained` writes. Replacing such an export removes only these names; anything else refuses the overwrite.
_PRE_MANIFEST_FILES = frozenset({
    CONFIG_FILE, WEIGHTS_FILE, PLAN_FILE, CARD_FILE, MODELING_FILE, "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
})


def check_export_target(out_dir: Path | str, overwrite: bool = False) -> None:
    """Refuse an export target unless it is new, empty, or (with `overwrite`) an earlier export that holds only
    the files that export wrote. Nothing is changed here; `export_compressed` checks again just before the move.

    Raises `ExportError` saying why and what to do: a file, a directory that is not an export, an earlier export
    without `overwrite` (--overwrite / the Export page's box), or an earlier export holding other files (named).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    _replaceable_files(out_dir, overwrite)


def _replaceable_files(out_dir: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier export at `out_dir` that replacing it removes ([] when there is nothing there)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is a file; give a directory for the export.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return []
    written = _written_by_export(out_dir)
    if written is None:
        raise ExportError(f"{out_dir} exists and is not an earlier RankScope export; nothing in it was changed. "
                          "Choose a new or empty directory.")
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()
                    if p.name not in written or not (p.is_file() or p.is_symlink()))
    if others:  # refused with or without overwrite: these are someone's files
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        raise ExportError(f"{out_dir} holds an earlier RankScope export and {len(others)} file(s) not written by it: "
                          f"{shown}. Nothing was changed, and it is not replaced even with --overwrite; move those "
                          "files elsewhere, or choose another directory.")
    if not overwrite:
        raise ExportError(f"{out_dir} holds an earlier RankScope export; nothing in it was changed. To replace it, "
                          "pass --overwrite (rankscope export) or overwrite=True (export_compressed), or tick "
                          "'Replace an earlier export' on the Export page; or choose another directory.")
    return [out_dir / name for name in sorted(written) if (out_dir / name).is_file() or (out_dir / name).is_symlink()]


def _written_by_export(directory: Path) -> Optional[set[str]]:
    """Names of the files an earlier RankScope export wrote in `directory`, or None if it is not an export.

    With a manifest, its files and itself; for an export from before manifests (config.json with the compression
    section), the names such an export could write."""
    try:
        files = read_manifest(directory)
    except ExportError:
        files = None  # a damaged manifest: fall back to config.json
    if files is not None:
        return {*files, MANIFEST_FILE}
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {*_PRE_MANIFEST_FILES, MANIFEST_FILE} if isinstance(config, dict) and SECTION in config else None


# -- writing -------------------------------------------------------------------------------------------------------

def _write(session: CompressionSession, plan: RankPlan, staging: Path, storage: str, check_ids: torch.Tensor,
           progress: Optional[ProgressCallback], clock: _Stopwatch) -> _Written:
    """Apply the plan in place, record the in-memory model's outputs, write every file, restore the model.

    The in-memory model runs on the check windows only, unless the plan has no metrics for the session's
    evaluation windows: then it is evaluated once (and its check-window logits come from that evaluation)."""
    model = session.loaded.model
    recorded = _recorded_quality(session, plan)
    with clock("write_s"):
        restore_(model)
        original_names = set(model.state_dict())
        pruned = _pruned_widths(session, plan)
        original_bias = {path: model.get_submodule(path).bias.numel() for path in pruned
                         if model.get_submodule(path).bias is not None}
        session.apply_(plan)
    try:
        with clock("in_memory_s"):
            check_logits: dict[int, torch.Tensor] = {}
            measure = None if recorded is not None else \
                (lambda: evaluate_quality(model, session.windows, session.reference, progress))
            measured = _with_check_logits(model, check_ids, check_logits.__setitem__, measure)
        with clock("write_s"):
            compression = CompressionConfig.of_model(model, plan.method, storage, describe_source(session.loaded), pruned)
            _check_pruned_widths(compression, pruned)
            if storage == "low-rank":
                config = copy.deepcopy(model.config)
                config.architectures = [remote_class_name(compression.base_class)]
                config.auto_map = auto_map(compression.base_class)
                tensors, _ = unique_state_dict(model)
                (staging / MODELING_FILE).write_text(modeling_source(compression.base_class, SUPPORTED_SCHEMAS))
            else:
                config, tensors = _dense_config_and_tensors(model, compression)
            setattr(config, SECTION, compression.to_dict())
            write_safetensors(tensors, staging / WEIGHTS_FILE)
    finally:
        restore_(model)
    with clock("write_s"):
        added_bias = sum(t.numel() for name, t in tensors.items() if name.endswith(".bias") and name not in original_names)
        removed_bias = sum(n - tensors[f"{path}.bias"].numel() for path, n in original_bias.items())
        config.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        session.loaded.tokenizer.save_pretrained(staging)
        compressed = recorded if measured is None else measured.to_dict()
        _measured_plan(session, plan, compressed).save(staging / PLAN_FILE)
    return _Written(compression, tensors, [check_logits[i] for i in range(len(check_ids))], compressed,
                    "plan" if measured is None else "in-memory", added_bias, removed_bias,
                    sum(t.numel() for t in tensors.values()))


def _recorded_quality(session: CompressionSession, plan: RankPlan) -> Optional[dict]:
    """The plan's own metrics when they were measured on the session's evaluation windows, else None.

    Same windows: the plan's evaluation section names the same text (by fingerprint), window length and count,
    and its metrics count the predicted tokens of those windows. The plan is already known to be for this model
    (fingerprint), method and calibration (`_check_plan_fits`), so those metrics are this compressed model's; the
    reload's re-evaluation is compared with them instead of evaluating the in-memory model again."""
    metrics, section, ours = plan.metrics or {}, plan.evaluation or {}, _evaluation_context(session)
    if any(section.get(key) != ours[key] for key in ("text_fingerprint", "window_len", "n_windows")):
        return None
    values = {key: metrics.get(key) for key in ("perplexity", "kl_forward", "kl_reverse")}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
        return None
    tokens = ours["n_windows"] * (ours["window_len"] - 1)
    if metrics.get("tokens") != tokens or values["perplexity"] <= 0:
        return None
    return {**{k: float(v) for k, v in values.items()}, "tokens": tokens}


def _with_check_logits(model: nn.Module, check_ids: torch.Tensor, consume: Callable[[int, torch.Tensor], None],
                       run: Optional[Callable[[], object]] = None):
    """Give `consume(i, logits [L, V])` the model's logits on each check window i; return `run()`'s result.

    `run` (an evaluation over windows that begin with the check windows) is watched by a forward hook: a
    forward whose input is check window i hands over its logits, so that window is not run again. A check
    window `run` did not run through the model (or no `run`) gets its own forward pass afterwards."""
    seen: set[int] = set()

    def watch(_module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
            return
        for i, window in enumerate(check_ids):
            if i not in seen and ids.shape[1] == window.shape[0] and torch.equal(ids[0], window.to(ids.device)):
                seen.add(i)
                consume(i, output.logits[0].detach().float())  # [L, V]
                return

    result = None
    if run is not None:
        handle = model.register_forward_hook(watch, with_kwargs=True)
        try:
            result = run()
        finally:
            handle.remove()
    for i, window in enumerate(check_ids):
        if i not in seen:
            consume(i, _logits(model, window))
    return result


def _pruned_widths(session: CompressionSession, plan: RankPlan) -> dict[str, tuple[int, int]]:
    """Linear path -> (in_features, out_features) it has once pruned, for the gate, up and down of every MLP the
    plan prunes: gate and up keep `kept` rows of [d_ff, d_model], down `kept` columns of [d_model, d_ff]."""
    widths = {}
    for mlp in session.shapes.mlps:
        kept = (plan.channels or {}).get(mlp.path)
        if kept is not None:
            widths.update({mlp.gate: (mlp.d_model, kept), mlp.up: (mlp.d_model, kept), mlp.down: (kept, mlp.d_model)})
    return widths


def _check_pruned_widths(compression: CompressionConfig, expected: Mapping[str, tuple[int, int]]) -> None:
    for path, spec in compression.pruned.items():
        if (spec.in_features, spec.out_features) != expected[path]:
            raise ExportError(f"Internal error: the pruned linear '{path}' is {spec.in_features}->{spec.out_features}, "
                              f"but the plan's kept channels give {expected[path][0]}->{expected[path][1]}.")


def _pruning_summary(session: CompressionSession, plan: RankPlan) -> Optional[dict]:
    """For the report and model card: how channels were chosen, and each pruned MLP's kept and full width."""
    kept = {path: k for path, k in (plan.channels or {}).items() if k is not None}
    if not kept:
        return None
    mlps = {m.path: {"layer": m.layer, "kept": kept[m.path], "channels": m.d_ff}
            for m in session.shapes.mlps if m.path in kept}
    return {"settings": dict(plan.pruning or {}), "mlps": mlps, "of_mlps": len(session.shapes.mlps)}


def _measured_plan(session: CompressionSession, plan: RankPlan, metrics: Mapping[str, float]) -> RankPlan:
    """The plan with the compressed model's metrics (its own record, checked by the reload, or measured at export)
    and the evaluation set they were measured on."""
    return RankPlan.from_dict({**plan.with_metrics(dict(metrics)).to_dict(), "evaluation": _evaluation_context(session)})


def _evaluation_context(session: CompressionSession) -> dict:
    """The evaluation text and windows that an export's quality numbers were measured on."""
    return {"text": session.texts.evaluation_text, "text_fingerprint": session.reference_record.text_fingerprint,
            "window_len": int(session.windows.shape[1]), "n_windows": int(session.windows.shape[0])}


def _check_transformers_class(model: nn.Module) -> None:
    import transformers

    if getattr(transformers, type(model).__name__, None) is not type(model):
        raise ExportError(f"{type(model).__name__} is not a class of transformers {transformers.__version__}; "
                          "exports rebuild the model from a transformers class.")


def _dense_config_and_tensors(model: nn.Module, compression: CompressionConfig) -> tuple[object, dict[str, torch.Tensor]]:
    """Config and tensors of a plain transformers model whose compressed linears hold `W_r = B_r A_r`."""
    config = copy.deepcopy(model.config)
    needs_bias = [path for path, spec in compression.modules.items() if spec.bias]
    skeleton = _meta_skeleton(type(model), config)
    if any(skeleton.get_submodule(p).bias is None for p in needs_bias):
        for switch in _BIAS_SWITCHES:
            if getattr(config, switch, None) is False:
                setattr(config, switch, True)
        skeleton = _meta_skeleton(type(model), config)
        lacking = [p for p in needs_bias if skeleton.get_submodule(p).bias is None]
        if lacking:
            raise ExportError(
                f"A dense export cannot hold the bias that {compression.method} adds to '{lacking[0]}' "
                f"({len(lacking)} linear(s) in all): {compression.base_class} has no bias there and no config switch "
                "for one. Export the low-rank form instead (without --dense), which keeps the bias."
            )
    expected, _ = unique_state_dict(skeleton)
    source, _ = unique_state_dict(model)
    tensors = {}
    for name, like in expected.items():
        path, _, leaf = name.rpartition(".")
        if path in compression.modules:
            module = model.get_submodule(path)
            value = module.weight if leaf == "weight" else module.bias  # weight: B @ A, [d_out, d_in]
        else:
            value = source.get(name)
        if value is None and leaf == "bias":
            value = torch.zeros(like.shape)  # a switch gave this linear a bias it never had: zero keeps it exact
        if value is None or tuple(value.shape) != tuple(like.shape):
            raise ExportError(f"Internal error: no value of shape {list(like.shape)} for '{name}' in the dense export.")
        tensors[name] = value.detach().to(torch.float32)
    return config, tensors


def _meta_skeleton(model_class: type, config) -> nn.Module:
    with torch.device("meta"):  # shapes and tied structure only, no memory
        return model_class(config)


# -- checking ------------------------------------------------------------------------------------------------------

@dataclass
class _Verified:
    """The reloaded model (through load_compressed) and what the checks measured."""

    model: nn.Module
    quality: dict  # the reloaded model's metrics: perplexity, kl_forward, kl_reverse, tokens
    evaluated: bool  # whether `quality` was measured on the reload (else: the plan's record, weights proven identical)
    compressed: dict  # the compressed model's metrics the reload was checked against
    compressed_from: str  # "plan" or "in-memory"
    checks: list[Check]
    logits_max_abs_diff: dict[str, float]  # reload path -> max |logits - in-memory logits|
    transformers_count: int  # parameters of the model reloaded through transformers


def _verify(session, plan, staging, written: _Written, check_ids, storage, progress, clock: _Stopwatch,
            evaluate_reload: bool = False) -> _Verified:
    """Reload through both paths, compare with the in-memory model, and raise unless every check passes."""
    from transformers import AutoModelForCausalLM

    expected_count = _planned_count(plan, storage) + written.added_bias - written.removed_bias
    limit = LOW_RANK_LOGITS_TOLERANCE if storage == "low-rank" else LOGITS_TOLERANCE
    with clock("reload_s"):
        placement = session.loaded.placement  # both reloads run where, and in the dtype, the session's model ran
        reloaded, _, _ = load_compressed(staging)
        reloaded.to(placement.torch_device, placement.torch_dtype)
        remote = {} if storage == "dense" else {"trust_remote_code": True}  # dense: prove it loads as plain transformers
        through_transformers, info = AutoModelForCausalLM.from_pretrained(staging, dtype=placement.torch_dtype,
                                                                          output_loading_info=True, **remote)
        through_transformers.to(placement.torch_device).eval()
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    load_check = Check("transformers loads every tensor", not problems,
                       str(problems)[:300] if problems else "no missing, unexpected or mismatched keys")
    with clock("compare_s"):
        differing = {"load_compressed": _differing_tensors(reloaded, written.tensors),
                     "transformers": _differing_tensors(through_transformers, written.tensors)}
    n_written = len(written.tensors)
    written.tensors = {}  # no longer needed (a dense export's are a second copy of the weights)
    diffs: dict[str, list[float]] = {"load_compressed": [], "transformers": []}

    def comparer(label: str) -> Callable[[int, torch.Tensor], None]:
        return lambda i, logits: diffs[label].append(float((logits - written.check_logits[i]).abs().max()))

    with clock("logits_s"):
        _with_check_logits(through_transformers, check_ids, comparer("transformers"))
    counts = {"load_compressed": count_module_parameters(reloaded),
              "transformers": count_module_parameters(through_transformers)}
    del through_transformers
    compressed, compressed_from, record_note = written.compressed, written.compressed_from, ""
    # the plan's record stands for the reload only when the reload is proven to be the model it was measured on
    evaluated = evaluate_reload or compressed_from != "plan" or any(differing.values())
    with clock("evaluation_s"):  # when evaluated, the load_compressed check-window logits come from its forwards
        measure = (lambda: evaluate_quality(reloaded, session.windows, session.reference, progress)) if evaluated else None
        measured = _with_check_logits(reloaded, check_ids, comparer("load_compressed"), measure)
    quality = measured.to_dict() if evaluated else dict(compressed)
    if evaluated and compressed_from == "plan" and not _same_quality(measured, compressed):
        # the plan's record is not what this model measures (edited, stale, or from an older RankScope): measure the
        # in-memory model once, and let that decide whether the export reproduces it
        with clock("in_memory_s"):
            in_memory = _evaluate_in_memory(session, plan, progress)
        record_note = (f"; the plan's recorded perplexity {compressed['perplexity']:.6f} (and KLs) did not match, "
                       "so the in-memory model was measured")
        compressed, compressed_from = in_memory.to_dict(), "in-memory"
        with clock("write_s"):
            _measured_plan(session, plan, compressed).save(staging / PLAN_FILE)  # rank_plan.json: the measured metrics
    worst = {label: max(values) for label, values in diffs.items()}
    within = (lambda d: d == 0.0) if limit == 0.0 else (lambda d: d < limit)
    wanted = "identical logits required" if limit == 0.0 else f"limit {limit:g}"
    checks = [load_check]
    for label in ("load_compressed", "transformers"):
        names = differing[label]
        checks.append(Check(f"weights via {label}", not names,
                            f"all {n_written:,} written tensors reloaded bit for bit"
                            if not names else f"{len(names)} tensor(s) differ from those written or are missing on "
                                              f"one side: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"))
    for label in ("load_compressed", "transformers"):
        checks.append(Check(f"logits via {label}", within(worst[label]),
                            f"max abs diff {worst[label]:.2e} on {len(check_ids)} window(s) ({wanted})"))
        removed = f" - {written.removed_bias:,} bias of pruned channels" if written.removed_bias else ""
        checks.append(Check(f"parameters via {label}", counts[label] == expected_count,
                            f"{counts[label]:,} reloaded, {expected_count:,} expected (plan's {storage} count + "
                            f"{written.added_bias:,} added bias{removed})"))
    if evaluated:
        rel = abs(quality["perplexity"] - compressed["perplexity"]) / compressed["perplexity"]
        against = "recorded in the plan for these windows" if compressed_from == "plan" else "in memory"
        checks.append(Check("perplexity re-evaluated after reload", rel <= PERPLEXITY_RTOL,
                            f"{quality['perplexity']:.6f} reloaded vs {compressed['perplexity']:.6f} {against} "
                            f"(relative difference {rel:.1e}, limit {PERPLEXITY_RTOL:g}){record_note}"))
    else:
        checks.append(Check("quality of the reload", True,
                            f"the plan's record for these windows (perplexity {compressed['perplexity']:.6f}, "
                            f"{compressed['tokens']:,} tokens): the reload holds the written tensors bit for bit, so "
                            "it is the model the plan measured; not re-evaluated (--evaluate-reload re-evaluates it)"))
    failed = [c for c in checks if not c.passed]
    if failed:
        raise ExportError("The export did not reproduce the compressed model, so nothing was written to the target: "
                          + "; ".join(f"{c.name}: {c.detail}" for c in failed))
    return _Verified(reloaded, quality, evaluated, compressed, compressed_from, checks, worst, counts["transformers"])


def _differing_tensors(model: nn.Module, written: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors `model` does not hold bit for bit as written (each written tensor cast to the dtype and
    device the model runs in), and names that only one side has. Cheap: one pass of comparisons, no forward."""
    reloaded, _ = unique_state_dict(model)
    names = sorted(set(reloaded) ^ set(written))
    for name, tensor in reloaded.items():
        if name in written and not torch.equal(tensor, written[name].to(tensor.device, tensor.dtype)):
            names.append(name)
    return names


def _same_quality(quality: QualityResult, recorded: Mapping[str, float]) -> bool:
    """Whether re-evaluated metrics agree with recorded ones: perplexity and both KLs within PERPLEXITY_RTOL (the KLs
    relative to at least KL_FLOOR), the same token count."""
    ours = quality.to_dict()
    if ours["tokens"] != recorded["tokens"]:
        return False
    if abs(ours["perplexity"] - recorded["perplexity"]) > PERPLEXITY_RTOL * recorded["perplexity"]:
        return False
    return all(abs(ours[k] - recorded[k]) <= PERPLEXITY_RTOL * max(abs(recorded[k]), KL_FLOOR)
               for k in ("kl_forward", "kl_reverse"))


def _evaluate_in_memory(session: CompressionSession, plan: RankPlan,
                        progress: Optional[ProgressCallback]) -> QualityResult:
    """The compressed model's metrics, measured on the session's model with the plan applied (then restored)."""
    model = session.loaded.model
    restore_(model)
    session.apply_(plan)
    try:
        return evaluate_quality(model, session.windows, session.reference, progress)
    finally:
        restore_(model)


def _planned_count(plan: RankPlan, storage: str) -> int:
    """All parameters the plan predicts: compressed for low-rank storage, the original's for dense."""
    return plan.parameters["total"]["compressed" if storage == "low-rank" else "dense"]


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids[None].to(input_device(model)), use_cache=False).logits[0].float()  # [L] -> [L, V]


def _same_permissions(directory: Path) -> None:
    """Give every file the mode a new file gets under the umask (safetensors writes its file 0600).

    The manifest was just written with Python's `open`, so its mode is that of a new file (0644 for umask 022);
    reading it there avoids `os.umask`, which would change the umask of every thread for a moment."""
    mode = stat.S_IMODE((directory / MANIFEST_FILE).stat().st_mode)
    for path in directory.iterdir():
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the verified folder to `out_dir`, replacing an earlier export only now that the new one passed.

    The target is checked again (a user may have added a file while the export ran). An earlier export is moved
    aside, the new one renamed in, and then only the files the earlier export wrote are removed; if anything else
    appeared in the meantime, the moved-aside folder is kept and named in the error."""
    previous_files = _replaceable_files(out_dir, overwrite)
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    if not previous_files:  # an empty directory
        out_dir.rmdir()
        staging.rename(out_dir)
        return
    previous = out_dir.with_name(f".{out_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
    out_dir.rename(previous)
    staging.rename(out_dir)
    for path in previous_files:
        (previous / path.name).unlink(missing_ok=True)
    try:
        previous.rmdir()
    except OSError:
        left = sorted(p.name for p in previous.iterdir())
        raise ExportError(f"The new export is at {out_dir}, but files appeared in the earlier one while exporting "
                          f"({', '.join(left[:8])}); they were kept in {previous}.") from None
