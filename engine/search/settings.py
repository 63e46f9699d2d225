"""`StudySettings`: everything that defines a search study, validated, versioned and JSON-able."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from engine.compression.grouping import MAX_RATIO, Grouping
from engine.compression.pruning import PruningSettings
from engine.errors import RankScopeError
from engine.methods.base import METHODS
from engine.texts.settings import TextSettings

# 2: `texts` is a versioned TextSettings (1 wrote RankScope 0.1.0's flat dict, still read), and trials are
# scored with exact KL (version 1 studies used a top-k estimate: they are read, but not resumed)
# `mlp` and `pruning` (a study that prunes MLP channels) are written only when the MLP is pruned, so studies that
# factorise it keep exactly the settings dict they had; an older RankScope refuses a pruning study by name
# 3: `strategy` (the `trust` search: priors told, trust region; `engine.search.proposals`); settings without it
# are read as the plain scikit-optimize loop they were run with (`bo`), so older studies resume exactly
# `select_top` (the final selection among the best plans on every candidate window) is written only when it selects
# (> 1): settings without it are read as 1, the best by the validation objective, as every study had before
SETTINGS_VERSION = 3
EXACT_KL_SINCE = 2
STRATEGIES = ("trust", "bo")
OBJECTIVE_KL = ("reverse", "forward")
SUBSETS = ("sensitive", "random", "all")
ATTENTION_GROUPS = ("qk", "q", "k", "v", "o", "q+k")
MLP_FORMS = ("low-rank", "prune")  # gate/up/down factorised (groups gate, up, down) or pruned (groups mlp-prune)


@dataclass(frozen=True)
class StudySettings:
    model: str = "smollm2-135m"
    method: str = "feature-pca"
    grouping: str = "5x1"  # 5x1, 5xG (e.g. 5x4), per-layer, curveK (e.g. curve3)
    search_v: bool = False
    budget: float = 0.2  # decoder-linear reduction
    beta: float = 1.0  # objective = log PPL + beta * KL
    kl: str = "reverse"
    n_trials: int = 50  # optimiser trials, warm start included; baselines are extra
    n_initial_points: int = 10  # random points before the GP takes over
    seed: int = 0
    max_ratio: float = 0.9  # upper bound of each group's ratio
    length_scale_attention: float = 1.0  # Bolaco's Matern length scales
    length_scale_mlp: float = 0.8
    subset: str = "sensitive"
    subset_size: int = 8
    subset_candidates: int = 24  # windows after the evaluation windows
    subset_probe_plans: int = 6
    warm_start: Optional[dict] = None  # group -> ratio
    texts: TextSettings = field(default_factory=TextSettings)
    mlp: str = "low-rank"
    pruning: Optional[dict] = None  # with mlp="prune": {"aggregation", "retention"}, LoRAP's l2 and 1% by default
    strategy: str = "trust"  # trust: priors told, random phase, GP-EI local/global; bo: the plain ask/tell loop
    batch: int = 1  # trust: points proposed at once (constant liar), so that many workers stay busy
    # after the search, the best `select_top` distinct plans by validation objective are measured on every candidate
    # window and the best there is the study's choice (a few noisy subset windows overrate their own winner)
    select_top: int = 4
    # forward dtype of every trial; written only when not float32, so float32 studies keep their settings dict and an
    # older RankScope refuses a bfloat16 study by name
    dtype: str = "float32"
    version: int = SETTINGS_VERSION

    def __post_init__(self):
        if not isinstance(self.texts, TextSettings):
            raise RankScopeError(f"Study texts must be TextSettings, got {type(self.texts).__name__} "
                                 "(StudySettings.from_dict reads their JSON form).")
        if self.method not in METHODS:
            raise RankScopeError(f"Unknown method '{self.method}'. Methods: {', '.join(METHODS)}.")
        self.parsed_grouping()  # raises for an unknown grouping
        if not 0.0 < self.budget < 1.0:
            raise RankScopeError(f"The budget is a decoder-linear reduction between 0 and 1, got {self.budget}.")
        if self.kl not in OBJECTIVE_KL:
            raise RankScopeError(f"The objective KL must be one of {', '.join(OBJECTIVE_KL)}, got '{self.kl}'.")
        if self.beta < 0:
            raise RankScopeError(f"beta must be 0 or more, got {self.beta}.")
        if self.n_trials < 1 or self.n_initial_points < 1:
            raise RankScopeError("A study needs at least one trial and one initial point.")
        if self.subset not in SUBSETS:
            raise RankScopeError(f"The validation subset must be one of {', '.join(SUBSETS)}, got '{self.subset}'.")
        if not 1 <= self.subset_size <= self.subset_candidates:
            raise RankScopeError(
                f"The validation subset size must be between 1 and the number of candidate windows "
                f"({self.subset_candidates}), got {self.subset_size}."
            )
        if self.mlp not in MLP_FORMS:
            raise RankScopeError(f"The MLP is searched as one of {', '.join(MLP_FORMS)}, got '{self.mlp}'.")
        if self.mlp == "prune":
            if self.parsed_grouping().kind in ("custom", "curve"):
                raise RankScopeError("A study that prunes MLPs needs a 5x1, 5xG or per-layer grouping.")
            object.__setattr__(self, "pruning", PruningSettings.from_dict(self.pruning).to_dict())
        elif self.pruning is not None:
            raise RankScopeError("Pruning settings apply only to a study that prunes MLPs (mlp='prune').")
        if self.strategy not in STRATEGIES:
            raise RankScopeError(f"The search strategy must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'.")
        if self.batch < 1:
            raise RankScopeError(f"A study proposes at least one point at a time (batch >= 1), got {self.batch}.")
        if self.batch > 1 and self.strategy != "trust":
            raise RankScopeError("The plain loop (strategy bo) asks for one point at a time; batches of points (for "
                                 "several workers) need the trust strategy.")
        if self.select_top < 1:
            raise RankScopeError(f"The final selection compares at least one plan (select_top >= 1; 1: the best by the "
                                 f"validation objective), got {self.select_top}.")
        from engine.models.device import DTYPE_CHOICES

        if self.dtype not in DTYPE_CHOICES:
            raise RankScopeError(f"A study's dtype must be one of {', '.join(DTYPE_CHOICES)}, got '{self.dtype}'.")
        if not 0.0 < self.max_ratio <= MAX_RATIO:
            raise RankScopeError(f"max_ratio must be in (0, {MAX_RATIO}], got {self.max_ratio}.")

    @property
    def prunes(self) -> bool:
        return self.mlp == "prune"

    def pruning_settings(self) -> Optional[PruningSettings]:
        return PruningSettings.from_dict(self.pruning) if self.prunes else None

    def parsed_grouping(self) -> Grouping:
        return Grouping.parse(self.grouping, self.search_v)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.mlp == "low-rank":  # the settings dict of a study that does not prune is the one it always was
            del data["mlp"], data["pruning"]
        if self.dtype == "float32":
            del data["dtype"]
        if self.select_top == 1:
            del data["select_top"]
        return {**data, "texts": self.texts.to_dict(), "version": SETTINGS_VERSION}

    @classmethod
    def from_dict(cls, data: dict) -> "StudySettings":
        if data.get("version", SETTINGS_VERSION) > SETTINGS_VERSION:
            raise RankScopeError(
                f"These study settings have version {data['version']}; this RankScope reads up to {SETTINGS_VERSION}."
            )
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise RankScopeError(f"Unknown study setting(s): {', '.join(sorted(unknown))}.")
        values = {**data, "texts": TextSettings.from_dict(data.get("texts")), "version": SETTINGS_VERSION,
                  "strategy": data.get("strategy", "bo"),  # written before strategies existed: the plain loop
                  "select_top": data.get("select_top", 1)}  # written before the final selection: none
        return cls(**values)

    def length_scale(self, group: str) -> float:
        """Bolaco's per-dimension Matern length scale: attention groups 1.0, MLP groups 0.8 by default."""
        base = group.split("@")[0].split("~")[0]
        return self.length_scale_attention if base in ATTENTION_GROUPS else self.length_scale_mlp
