"""`RankPlan`: the versioned, self-describing rank plan document (`rankscope.plan/v1`, DESIGN.md §8).

A plan names the model (id and content fingerprint), the method, the calibration and evaluation
texts with their windowing, the grouping and its values, an explicit map from module path to rank
(None = dense), the achieved parameter counts, the metrics with their definitions, and provenance.
`RankPlan.from_json` validates the document's form (a plan compresses at least one linear);
`for_model(shapes)` (alias `validate_for`) checks that it fits a model (modules, ranks, joint-rank
equality) and that its derived sections (the model's type and layers, the parameter counts) agree
with what its ranks give on that model, and raises `PlanError` saying what is wrong. A plan is
never trusted for numbers it could compute: a document whose `parameters` contradict its `ranks`
is refused (rather than corrected) because we cannot tell which of the two its author meant.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

from engine import __version__
from engine.compression.pruning import PruningSettings
from engine.compression.units import ModelShapes, count_parameters
from engine.errors import RankScopeError
from engine.metric_definitions import metric_definitions

SCHEMA = "rankscope.plan/v1"
SCHEMA_V2 = "rankscope.plan/v2"  # v1 plus pruned MLPs (`channels`, `pruning`); written only when a plan prunes
SCHEMAS = (SCHEMA, SCHEMA_V2)
METRIC_DEFINITIONS: dict[str, str] = metric_definitions()  # recorded in every plan's `metrics.definitions`


class PlanError(RankScopeError):
    """A plan document that is malformed or does not fit the model."""


@dataclass(frozen=True)
class RankPlan:
    model: dict  # {"id", "fingerprint", "model_type", "num_layers"}
    method: str
    ranks: dict[str, Optional[int]]
    grouping: Optional[dict] = None  # {"kind", "layer_blocks", "search_v", "values": {group: ratio}}
    calibration: Optional[dict] = None  # {"text", "text_fingerprint", "window_len", "n_windows", "n_groups"}
    evaluation: Optional[dict] = None  # {"text", "text_fingerprint", "window_len", "n_windows"}
    parameters: dict = field(default_factory=dict)
    metrics: Optional[dict] = None
    provenance: dict = field(default_factory=dict)
    # a recovered plan: {"run_id", "kind", "subset", "base_ranks", "settings", "steps", "tokens"}; its vectors are
    # arrays in the store, folded into the factors sliced at `base_ranks` (engine.compression.recovered)
    recovery: Optional[dict] = None
    # v2: MLP path -> kept channels (None: not pruned), and how channels were chosen ({"aggregation", "retention"})
    channels: Optional[dict] = None
    pruning: Optional[dict] = None
    schema: str = SCHEMA

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        shapes: ModelShapes,
        method: str,
        ranks: Mapping[str, Optional[int]],
        grouping: Optional[dict] = None,
        calibration: Optional[dict] = None,
        evaluation: Optional[dict] = None,
        metrics: Optional[dict] = None,
        seed: Optional[int] = None,
        study_id: Optional[str] = None,
        channels: Optional[Mapping[str, Optional[int]]] = None,
        pruning: Optional[dict] = None,
    ) -> "RankPlan":
        """A validated plan for `shapes` with its parameter counts filled in; missing paths are dense.

        `channels` (MLP path -> kept channels) prunes MLPs as LoRAP does, with `pruning` saying how channels are
        chosen ({"aggregation", "retention"}); such a plan is a `rankscope.plan/v2` document."""
        pruned = {p: k for p, k in (channels or {}).items() if k is not None}
        full = {s.path: ranks.get(s.path) for s in shapes.linears}
        full.update({p: r for p, r in ranks.items() if p not in full})  # unknown paths: rejected below, not dropped
        plan = cls(
            model={"id": shapes.model_id, "fingerprint": shapes.fingerprint, "model_type": shapes.model_type,
                   "num_layers": shapes.num_layers},
            method=method,
            ranks=full,
            grouping=grouping,
            calibration=calibration,
            evaluation=evaluation,
            parameters=count_parameters(shapes, method, full, pruned).to_dict(),
            metrics=metrics,
            provenance={"engine_version": __version__, "created_at": datetime.now(timezone.utc).isoformat(),
                        "seed": seed, "study_id": study_id},
            channels={m.path: pruned.get(m.path) for m in shapes.mlps} if pruned else None,
            pruning=_pruning_section(pruning) if pruned else None,
            schema=SCHEMA_V2 if pruned else SCHEMA,
        )
        plan.validate_for(shapes)
        return plan

    def with_metrics(self, metrics: Mapping[str, Any]) -> "RankPlan":
        data = self.to_dict()
        data["metrics"] = {**metrics, "definitions": METRIC_DEFINITIONS}
        return RankPlan.from_dict(data)

    # -- validation -----------------------------------------------------------------------------
    def for_model(self, shapes: ModelShapes, allow_other_model: bool = False) -> "RankPlan":
        """This plan checked against `shapes`, with its ranks listing every decoder linear (missing = dense).

        Raises `PlanError` unless the plan is for this model (by fingerprint), every module exists in
        it, every rank fits, at least one linear is compressed, and the derived sections agree with
        the model: `model.model_type`/`model.num_layers`, and `parameters` recomputed from the ranks.
        With `allow_other_model` the fingerprint and the derived sections are not compared, and the
        returned plan carries the parameter counts of `shapes`.
        """
        if not allow_other_model and self.model.get("fingerprint") != shapes.fingerprint:
            raise PlanError(
                f"This plan was made for model '{self.model.get('id')}' (fingerprint {str(self.model.get('fingerprint'))[:12]}), "
                f"not for '{shapes.model_id}' (fingerprint {shapes.fingerprint[:12]}). Load it with the model it was made for."
            )
        by_path = shapes.by_path
        unknown = [p for p in self.ranks if p not in by_path]
        if unknown:
            raise PlanError(
                f"The plan names {len(unknown)} module(s) the model does not have, e.g. '{unknown[0]}'. "
                f"Module paths look like '{shapes.linears[0].path}'."
            )
        for unit in shapes.units(self.method):
            ranks = {self.ranks.get(p) for p in unit.paths}
            if len(ranks) > 1:
                raise PlanError(
                    f"Method {self.method} shares one factor between {' and '.join(unit.paths)}, so they need "
                    f"the same rank; the plan gives {sorted(ranks, key=str)}."
                )
            rank = ranks.pop()
            if rank is None:
                continue
            # a joint unit's bound is its stacked matrix: min(d_in, sum of d_out)
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= unit.max_rank:
                raise PlanError(
                    f"Rank {rank!r} for '{' and '.join(unit.paths)}' is not allowed: it must be an integer from 1 to "
                    f"min(d_in, d_out) = {unit.max_rank} for this {unit.d_out}x{unit.d_in} "
                    f"{'stacked ' if len(unit.paths) > 1 else ''}matrix, or null for dense."
                )
            if rank > unit.break_even_rank:
                raise PlanError(
                    f"Rank {rank} for '{' and '.join(unit.paths)}' saves no parameters: its factors "
                    f"({rank}·({unit.d_in}+{unit.d_out}) = {unit.params(rank):,}) are larger than the dense "
                    f"{unit.d_out}x{unit.d_in} {'stacked ' if len(unit.paths) > 1 else ''}matrix ({unit.dense_params:,}), "
                    f"which is also exact. Use a rank up to {unit.break_even_rank} (the break-even rank), or null to "
                    "keep it dense."
                )
        channels = self._checked_channels(shapes)
        _refuse_empty(self.ranks, channels)
        full = {s.path: self.ranks.get(s.path) for s in shapes.linears}
        counts = count_parameters(shapes, self.method, full, channels).to_dict()
        if not allow_other_model:
            self._check_model_section(shapes)
            if not _same_numbers(self.parameters, counts):
                raise PlanError(_parameters_mismatch(self.parameters, counts, shapes))
        recovery = self.recovery
        if recovery is not None:
            recovery = {**recovery, "base_ranks": {s.path: recovery["base_ranks"].get(s.path) for s in shapes.linears}}
            _check_recovery_section(recovery, full)
        if channels is not None:
            channels = {m.path: channels.get(m.path) for m in shapes.mlps}
        return replace(self, ranks=full, parameters=counts, recovery=recovery, channels=channels)

    def _checked_channels(self, shapes: ModelShapes) -> Optional[dict]:
        """The kept channels of a v2 plan, checked against the model's MLPs (None for a plan that prunes nothing)."""
        if not self.channels:
            return None
        mlps = {m.path: m for m in shapes.mlps}
        if not mlps:
            raise PlanError(f"This plan prunes MLP channels, but '{shapes.model_id}' has no gated MLPs (gate, up and "
                            "down projections); channel pruning needs them.")
        unknown = [p for p in self.channels if p not in mlps]
        if unknown:
            raise PlanError(f"The plan prunes {len(unknown)} MLP(s) the model does not have, e.g. '{unknown[0]}'. MLP "
                            f"paths look like '{next(iter(mlps))}'.")
        for path, kept in self.channels.items():
            if kept is None:
                continue
            mlp = mlps[path]
            if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= mlp.d_ff:
                raise PlanError(f"Kept channels {kept!r} for '{path}' are not allowed: a pruned MLP keeps from 1 to "
                                f"{mlp.d_ff} channels (its intermediate width), or null for not pruned.")
            ranked = [p for p in mlp.paths if self.ranks.get(p) is not None]
            if ranked:
                raise PlanError(f"The plan both prunes '{path}' and gives '{ranked[0]}' a rank; a pruned MLP keeps its "
                                "gate, up and down as smaller dense matrices, so their ranks must be null.")
        return {p: k for p, k in self.channels.items() if k is not None}

    def validate_for(self, shapes: ModelShapes, allow_other_model: bool = False) -> "RankPlan":
        """`for_model`: raise `PlanError` unless the plan fits `shapes`; returns the checked plan."""
        return self.for_model(shapes, allow_other_model)

    def _check_model_section(self, shapes: ModelShapes) -> None:
        recorded = (self.model.get("model_type"), self.model.get("num_layers"))
        if recorded == (shapes.model_type, shapes.num_layers):
            return
        missing = [key for key in ("model_type", "num_layers") if self.model.get(key) is None]
        if missing:
            raise PlanError(
                f"The plan's model section lacks {' and '.join(repr(k) for k in missing)}; the model with its "
                f"fingerprint ('{shapes.model_id}') has model_type '{shapes.model_type}' and num_layers "
                f"{shapes.num_layers}. Add them, or make the plan again with this model."
            )
        raise PlanError(
            f"The plan's model section says model type {recorded[0]!r} with {recorded[1]!r} layers, but the "
            f"model with its fingerprint ({shapes.fingerprint[:12]}, '{shapes.model_id}') is a "
            f"'{shapes.model_type}' with {shapes.num_layers} layers, so the plan has been altered. Make the plan "
            "again with this model."
        )

    # -- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: Any) -> "RankPlan":
        if not isinstance(data, dict):
            raise PlanError(f"A rank plan is a JSON object, got {type(data).__name__}.")
        schema = data.get("schema")
        if schema not in SCHEMAS:
            raise PlanError(f"Unsupported plan schema {schema!r}: this RankScope reads {' and '.join(repr(s) for s in SCHEMAS)}.")
        if (schema == SCHEMA_V2) != bool(data.get("channels")):
            raise PlanError(f"A '{SCHEMA_V2}' plan prunes MLP channels (a non-empty 'channels' object) and a '{SCHEMA}' "
                            f"plan does not; this one is '{schema}' {'without' if schema == SCHEMA_V2 else 'with'} them.")
        if data.get("channels") is not None:
            if not isinstance(data["channels"], dict):
                raise PlanError("Plan field 'channels' must map MLP paths to kept channel counts.")
            PruningSettings.from_dict(data.get("pruning"))  # PruningError naming what is allowed
        for key, kind in (("model", dict), ("method", str), ("ranks", dict)):
            if not isinstance(data.get(key), kind):
                raise PlanError(f"Plan field '{key}' is missing or not a {kind.__name__}.")
        if not isinstance(data["model"].get("fingerprint"), str):
            raise PlanError("Plan field 'model.fingerprint' is missing.")
        for path, rank in data["ranks"].items():
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
                raise PlanError(f"Rank for '{path}' must be an integer or null, got {rank!r}.")
        _refuse_empty(data["ranks"], {p: k for p, k in (data.get("channels") or {}).items() if k is not None})
        if not isinstance(data.get("parameters", {}), dict):
            raise PlanError("Plan field 'parameters' is not an object.")
        _check_recovery_section(data.get("recovery"), data["ranks"])
        known = {f for f in cls.__dataclass_fields__}
        extra = set(data) - known
        if extra:
            raise PlanError(f"Unknown plan field(s): {', '.join(sorted(extra))}. Allowed: {', '.join(sorted(known))}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"The plan is not valid JSON: {exc}.") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Path | str) -> "RankPlan":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PlanError(f"Could not read plan file {path}: {exc.strerror or exc}.") from exc
        return cls.from_json(text)


RECOVERY_KEYS = {"run_id", "kind", "subset", "base_ranks", "settings", "steps", "tokens"}


def _check_recovery_section(section: Any, ranks: Mapping[str, Optional[int]]) -> None:
    """A recovery section names its run and kind, and starts from ranks no lower than the plan's own."""
    if section is None:
        return
    if not isinstance(section, dict) or set(section) - RECOVERY_KEYS or not {"run_id", "kind", "base_ranks"} <= set(section):
        raise PlanError(f"Plan field 'recovery' must be an object with run_id, kind and base_ranks (allowed keys: "
                        f"{', '.join(sorted(RECOVERY_KEYS))}), got {section!r:.200}.")
    base = section["base_ranks"]
    if not isinstance(base, dict) or set(base) != set(ranks):
        raise PlanError("The recovery section's base_ranks must name the same modules as the plan's ranks.")
    for path, rank in ranks.items():
        start = base[path]
        if (rank is None) != (start is None) or (rank is not None and (not isinstance(start, int) or rank > start)):
            raise PlanError(f"The recovery of '{path}' starts at rank {start!r} and ends at {rank!r}: recovery keeps or "
                            "lowers a rank and never makes a dense linear low-rank or a low-rank one dense.")


def _pruning_section(pruning: Optional[Mapping[str, Any]]) -> dict:
    return PruningSettings.from_dict(pruning).to_dict()


def _refuse_empty(ranks: Mapping[str, Optional[int]], pruned: Optional[Mapping[str, int]] = None) -> None:
    if not pruned and all(rank is None for rank in ranks.values()):
        raise PlanError(
            "A plan must compress at least one linear, but this one keeps every module dense ("
            + ("its 'ranks' are empty" if not ranks else f"all {len(ranks)} ranks are null")
            + "), so it would be the original model. Give at least one module a rank."
        )


def _same_numbers(recorded: Any, computed: Any) -> bool:
    """Whether a recorded section has the computed one's keys and values (ratios to 1e-6)."""
    if isinstance(computed, dict):
        return (isinstance(recorded, dict) and set(recorded) == set(computed)
                and all(_same_numbers(recorded[k], v) for k, v in computed.items()))
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)):
        return False
    if isinstance(computed, float):
        return math.isclose(recorded, computed, rel_tol=0.0, abs_tol=1e-6)
    return recorded == computed


def _reductions(parameters: Any) -> Optional[str]:
    """'X% of decoder linears, Y% of the model removed' from a parameters section, or None if it has no such numbers."""
    try:
        decoder, total = parameters["decoder_linear"], parameters["total"]
        return (f"{decoder['compressed']:,} of {decoder['dense']:,} decoder-linear parameters kept "
                f"({decoder['reduction']:.2%} removed), {total['compressed']:,} of {total['dense']:,} in the whole "
                f"model ({total['reduction']:.2%} removed)")
    except (KeyError, TypeError, ValueError):
        return None


def _parameters_mismatch(recorded: Any, computed: dict, shapes: ModelShapes) -> str:
    if not recorded:
        said = "the plan has no 'parameters' section"
    else:
        described = _reductions(recorded)
        said = f"the plan says {described}" if described else "the plan's 'parameters' section is malformed"
    return (
        f"The plan's 'parameters' do not match its ranks: on '{shapes.model_id}' the ranks give "
        f"{_reductions(computed)}, but {said}. These counts follow from the ranks, so a plan that contradicts "
        "them has been edited or made for other shapes, and is refused rather than shown, saved or exported with "
        f"wrong numbers. Make the plan again, or set 'parameters' to {json.dumps(computed, separators=(',', ':'))}."
    )
