"""`recover(store, loaded, plan, settings)`: train a recovery on a compressed model, fold it, store it.

One run: apply the plan, wrap its compressed linears (`engine.compression.recovered.attach_`), train
only the recovery's vectors with plain `torch.optim.AdamW` on next-token cross-entropy over the
training windows, prune (basis, when asked) on a fixed schedule, fold the vectors into the factors,
and measure perplexity and both KLs on the plan's evaluation set before and after, plus perplexity on
the held-out validation windows of the training text.

A run is keyed by the plan it starts from (its content, not its file) and its settings. It writes a
checkpoint every `checkpoint_every` steps (vectors, optimiser state, history); a run killed or
stopped part-way resumes from its last checkpoint when started again with the same plan and settings,
and finishes with the same vectors an uninterrupted run would have (the batch order depends only on
the seed and the step). A finished run's vectors are stored as arrays and its record in the store;
asking for it again returns it at once. The plan it started from is never changed: the recovered plan
is a new document with a `recovery` section (`RankPlan.recovery`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import psutil
import torch

from engine.compression.lowrank import restore_
from engine.compression.plan import PlanError, RankPlan
from engine.compression.plan_settings import plan_settings
from engine.compression.recovered import (
    RecoveryError, ScaledBasisLinear, attach_, fold_, load_vectors_, prune_to_ranks_, trainable_parameters, vectors_of,
)
from engine.compression.session import CompressionSession
from engine.compression.units import ModelShapes, count_parameters
from engine.cache.windows import ensure_windows
from engine.models.device import input_device
from engine.errors import CorpusError
from engine.hashing import sha256_json
from engine.metrics import evaluate_perplexity, evaluate_quality
from engine.models.loading import LoadedModel
from engine.progress import ProgressCallback, ProgressTracker
from engine.records import RecoveryRecord
from engine.recovery.settings import RecoverySettings
from engine.store.arrays import load_arrays, save_arrays
from engine.store.duckdb_store import Store
from engine.texts.windows import Windowing

ARRAY_KIND = "recovery"
GRADIENT_CLIP = 1.0


class RecoveryInterrupted(RecoveryError):
    """A run stopped before its last step; its checkpoint lets the same command resume it."""

    def __init__(self, run_id: str, step: int, steps: int):
        self.run_id, self.step, self.steps = run_id, step, steps
        super().__init__(f"Recovery run {run_id[:12]} stopped after step {step} of {steps}; its checkpoint is kept. "
                         "Start it again with the same plan and settings to resume from there.")


@dataclass(frozen=True)
class StepReport:
    """One training step, for live charts: the loss, and the validation perplexity when it was measured."""

    step: int
    steps: int
    loss: float
    validation_perplexity: Optional[float]
    seconds: float
    ranks_total: Optional[int] = None  # basis: the sum of kept directions after this step


@dataclass(frozen=True)
class RecoveryOutcome:
    record: RecoveryRecord
    plan: RankPlan  # the recovered plan (recovery section, measured metrics)
    result: dict  # before/after metrics, history, ranks
    from_cache: bool
    resumed_from: int = 0


def run_id_for(plan: RankPlan, settings: RecoverySettings, dtype: str = "float32") -> str:
    """The key of a run: what the plan compresses and measures (not its file or provenance) and the settings
    (in their canonical form, so a default given explicitly names the same run); the forward dtype only when it
    is not float32, so float32 runs keep their ids."""
    content = {k: v for k, v in plan.to_dict().items() if k not in ("metrics", "provenance")}
    return sha256_json([content, settings.canonical().to_dict(), *([] if dtype == "float32" else [dtype])])[:32]


def run_key(shapes: ModelShapes, plan: RankPlan, settings: RecoverySettings,
            dtype: str = "float32") -> tuple[RankPlan, RecoverySettings, str]:
    """(the plan checked against the model, the settings resolved against its texts, the run's id): what `recover`
    works from, for front ends that look a run up before starting it. Raises `PlanError` for another model's plan."""
    plan = plan.for_model(shapes)
    settings = settings.resolved(plan.calibration, plan.evaluation)
    return plan, settings, run_id_for(plan, settings, dtype)


def checkpoint_state(store: Store, run_id: str) -> Optional[dict]:
    """The step and history of a run's checkpoint (a run stopped part-way), or None when it has none."""
    path = checkpoint_path(store, run_id)
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)["state"]
    return {"step": state["step"], "history": state["history"]}


def checkpoint_path(store: Store, run_id: str) -> Path:
    return store.cache_dir / "recovery" / f"{run_id}.checkpoint.pt"


def stored_outcome(store: Store, run_id: str) -> Optional[RecoveryOutcome]:
    """A finished run from the store (its record and readable vectors), or None."""
    record = store.get_record(RecoveryRecord, run_id)
    if record is None or load_arrays(store, record.array_id) is None:
        return None
    result = json.loads(record.result_json)
    return RecoveryOutcome(record, RankPlan.from_dict(result["plan"]), result, from_cache=True,
                           resumed_from=result.get("resumed_from", 0))


def recover(
    store: Store,
    loaded: LoadedModel,
    plan: RankPlan,
    settings: RecoverySettings = RecoverySettings(),
    progress: Optional[ProgressCallback] = None,
    on_step: Optional[Callable[[StepReport], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    session: Optional[CompressionSession] = None,
) -> RecoveryOutcome:
    """Train, fold and store a recovery of `plan` on `loaded`; see the module docstring.

    `session` reuses an open session of the plan's method and texts (a front end's), so its factors are not
    loaded a second time."""
    shapes = ModelShapes.of(loaded)
    plan, settings, run_id = run_key(shapes, plan, settings, loaded.dtype)  # PlanError for another model's plan
    if plan.recovery is not None:
        raise PlanError(f"This plan is already the result of recovery run {plan.recovery['run_id'][:12]}; recover the "
                        "plan it started from instead (recovery runs do not stack).")
    done = stored_outcome(store, run_id)
    if done is not None:
        return done
    base_ranks = dict(plan.ranks)
    pruning = _pruning_schedule(shapes, plan, settings)  # refuses an unreachable target before any work
    train, validation = _training_windows(store, loaded, settings)
    texts = plan_settings(plan).texts
    if session is None:
        session = CompressionSession.open(store, loaded, plan.method, texts, progress)
    elif session.loaded is not loaded or session.method != plan.method or session.texts != texts:
        raise RecoveryError("The session given does not hold this plan's model, method and texts.")
    model = loaded.model

    before = session.evaluate(plan, progress).metrics
    before = {k: before[k] for k in ("perplexity", "kl_forward", "kl_reverse", "tokens")}
    ckpt = checkpoint_path(store, run_id)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        session.apply_(plan)
        for p in model.parameters():
            p.requires_grad_(False)
        wrappers = attach_(model, settings.kind, settings.subset)
        params = trainable_parameters(wrappers)
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        state = {"step": 0, "history": [], "seconds": 0.0, "validation_before": None}
        if ckpt.is_file():
            state = _load_checkpoint(ckpt, wrappers, optimizer)
        resumed_from = state["step"]
        with _peak_rss() as peak:
            if state["validation_before"] is None:
                state["validation_before"] = _validation_perplexity(model, validation)
            _train(model, wrappers, params, optimizer, train, validation, settings, pruning, state, ckpt, run_id,
                   progress, on_step, should_stop)
            vectors = vectors_of(wrappers)
            ranks = fold_(model, wrappers)
            validation_after = _validation_perplexity(model, validation)
            after = evaluate_quality(model, session.windows, session.reference, progress).to_dict()
        peak_rss = peak()
    finally:
        restore_(model)
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))

    final_ranks = {path: ranks.get(path, base_ranks[path]) if base_ranks[path] is not None else None for path in base_ranks}
    tokens = settings.steps * settings.batch_windows * int(train.shape[1])
    recovered = _recovered_plan(shapes, plan, final_ranks, base_ranks, settings, run_id, tokens, after)
    result = {
        "plan": recovered.to_dict(), "before": before, "after": after,
        "validation": {"text": settings.training_text, "n_windows": int(validation.shape[0]),
                       "before": state["validation_before"], "after": validation_after},
        "history": state["history"], "resumed_from": resumed_from,
        "parameters": {"before": plan.parameters, "after": recovered.parameters},
    }
    save_arrays(store, run_id, ARRAY_KIND, vectors, {"kind": settings.kind, "run_id": run_id})
    record = RecoveryRecord(run_id, loaded.fingerprint, settings.kind, plan.to_json(), json.dumps(settings.to_dict()),
                            json.dumps(result), settings.steps, tokens, state["seconds"], peak_rss, run_id)
    store.put_record(record)
    ckpt.unlink(missing_ok=True)
    return RecoveryOutcome(record, recovered, result, from_cache=False, resumed_from=resumed_from)


# -- training -------------------------------------------------------------------------------------------------------

def _train(model, wrappers, params, optimizer, train, validation, settings: RecoverySettings, pruning: dict[int, dict],
           state: dict, ckpt: Path, run_id: str, progress, on_step, should_stop) -> None:
    tracker = ProgressTracker(progress, f"recovery ({settings.kind})", settings.steps, "steps")
    tracker.advance(state["step"])
    started = time.perf_counter() - state["seconds"]
    model.eval()  # no dropout: the vectors are all that changes
    while state["step"] < settings.steps:
        step = state["step"]
        ids = train[_batch_indices(step, settings.batch_windows, int(train.shape[0]), settings.seed)]  # [B, L]
        ids = ids.to(input_device(model))
        with torch.enable_grad():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRADIENT_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        if step in pruning:
            prune_to_ranks_(wrappers, pruning[step])
        validation_ppl = None
        if step % settings.eval_every == 0 or step == settings.steps:
            validation_ppl = _validation_perplexity(model, validation)
        state["seconds"] = time.perf_counter() - started
        ranks_total = (sum(w.kept_rank for w in wrappers.values())
                       if any(isinstance(w, ScaledBasisLinear) for w in wrappers.values()) else None)
        report = StepReport(step, settings.steps, float(loss.detach()), validation_ppl, state["seconds"], ranks_total)
        state["history"].append({"step": step, "loss": report.loss, "validation_perplexity": validation_ppl,
                                 "seconds": report.seconds, "ranks_total": ranks_total})
        tracker.advance()
        if on_step is not None:
            on_step(report)
        if step % settings.checkpoint_every == 0 and step < settings.steps:
            _save_checkpoint(ckpt, wrappers, optimizer, state)
        if should_stop is not None and should_stop() and step < settings.steps:
            _save_checkpoint(ckpt, wrappers, optimizer, state)
            raise RecoveryInterrupted(run_id, step, settings.steps)


def _batch_indices(step: int, batch: int, n_windows: int, seed: int) -> torch.Tensor:
    """The windows of one step: consecutive slices of per-epoch permutations, a function of (seed, step) only."""
    positions = range(step * batch, (step + 1) * batch)
    out = []
    for position in positions:
        epoch, offset = divmod(position, n_windows)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_windows, generator=generator)[offset]))
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def _validation_perplexity(model, validation: torch.Tensor) -> float:
    return evaluate_perplexity(model, validation).perplexity


def _training_windows(store: Store, loaded: LoadedModel, settings: RecoverySettings) -> tuple[torch.Tensor, torch.Tensor]:
    needed = settings.training_windows + settings.validation_windows
    try:
        windows = ensure_windows(store, loaded, settings.training_text,
                                 Windowing(settings.window_len, needed, settings.start_window))
    except CorpusError as exc:
        raise RecoveryError(
            f"The training text cannot give this run its windows: {exc} A run needs {settings.training_windows} training "
            f"+ {settings.validation_windows} validation windows of {settings.window_len} tokens after window "
            f"{settings.start_window}; use fewer training or validation windows (--training-windows, "
            "--validation-windows), or a longer text.") from exc
    return windows[: settings.training_windows], windows[settings.training_windows:]


# -- pruning (basis) ---------------------------------------------------------------------------------------------------

def _pruning_schedule(shapes: ModelShapes, plan: RankPlan, settings: RecoverySettings) -> dict[int, dict]:
    """Step -> the ranks to prune to after it, stepping from the plan's reduction to `prune_to` in equal parts."""
    if settings.prune_to is None:
        return {}
    start = plan.parameters["decoder_linear"]["reduction"]
    if settings.prune_to <= start:
        raise RecoveryError(f"A prune target (--prune-to) of {settings.prune_to:.1%} does not prune: the plan already "
                            f"removes {start:.1%} of the decoder-linear parameters. Give a larger reduction.")
    floor = {p: (1 if r is not None else None) for p, r in plan.ranks.items()}
    reachable = count_parameters(shapes, plan.method, floor, _pruned(plan)).decoder_reduction
    if settings.prune_to > reachable:
        raise RecoveryError(f"A prune target (--prune-to) of {settings.prune_to:.1%} is out of reach by pruning this "
                            f"plan's compressed linears: rank 1 everywhere removes {reachable:.1%}. Give a reduction between {start:.1%} and "
                            f"{reachable:.1%}.")
    steps = settings.pruning_steps()
    return {step: _scaled_ranks(shapes, plan, start + (settings.prune_to - start) * (i + 1) / len(steps))
            for i, step in enumerate(steps)}


def _scaled_ranks(shapes: ModelShapes, plan: RankPlan, reduction: float) -> dict[str, int]:
    """Every compressed rank scaled by one factor (the largest, by bisection) that reaches `reduction`."""
    def ranks_at(f: float) -> dict:
        return {p: max(1, int(math.floor(r * f))) for p, r in plan.ranks.items() if r is not None}

    def reached(f: float) -> bool:
        return count_parameters(shapes, plan.method, {**plan.ranks, **ranks_at(f)}, _pruned(plan)).decoder_reduction \
            >= reduction

    low, high = 0.0, 1.0  # reached(low) holds (rank 1 everywhere, checked by the caller); reached(high) does not
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if reached(mid) else (low, mid)
    return ranks_at(low)


def _pruned(plan: RankPlan) -> dict[str, int]:
    return {path: kept for path, kept in (plan.channels or {}).items() if kept is not None}


# -- checkpoints, plans, memory -------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, wrappers, optimizer, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save({"vectors": vectors_of(wrappers), "optimizer": optimizer.state_dict(), "state": state}, partial)
    os.replace(partial, path)  # a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, wrappers, optimizer) -> dict:
    saved = torch.load(path, weights_only=True)
    load_vectors_(wrappers, saved["vectors"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["state"]


def _recovered_plan(shapes: ModelShapes, plan: RankPlan, ranks: dict, base_ranks: dict, settings: RecoverySettings,
                    run_id: str, tokens: int, metrics: dict) -> RankPlan:
    built = RankPlan.build(shapes, plan.method, ranks, grouping=plan.grouping, calibration=plan.calibration,
                           evaluation=plan.evaluation, seed=plan.provenance.get("seed"),
                           study_id=plan.provenance.get("study_id"), channels=plan.channels, pruning=plan.pruning)
    recovery = {"run_id": run_id, "kind": settings.kind, "subset": settings.subset, "base_ranks": base_ranks,
                "settings": settings.to_dict(), "steps": settings.steps, "tokens": tokens}
    data = {**built.to_dict(), "recovery": recovery}
    return RankPlan.from_dict(data).for_model(shapes).with_metrics(metrics)


@contextmanager
def _peak_rss(interval_s: float = 0.05) -> Iterator[Callable[[], int]]:
    """The process's peak resident memory while the block runs (sampled; torch allocates outside tracemalloc)."""
    process = psutil.Process()
    peak = [process.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], process.memory_info().rss)


def describe_settings(settings: RecoverySettings) -> str:
    text = (f"{settings.kind}: {settings.steps} steps of {settings.batch_windows} windows of {settings.window_len} tokens "
            f"from '{settings.training_text}' (windows {settings.start_window}-"
            f"{(settings.start_window or 0) + settings.training_windows - 1}), lr {settings.lr:g}")
    if settings.kind == "subspace":
        text += f", r' = {settings.subset}"
    if settings.prune_to is not None:
        text += f", pruned to {settings.prune_to:.0%} in {settings.prune_rounds} rounds"
    return text


__all__ = ["recover", "RecoveryInterrupted", "RecoveryOutcome", "StepReport", "run_id_for", "run_key", "stored_outcome",
           "checkpoint_path", "checkpoint_state", "describe_settings"]
