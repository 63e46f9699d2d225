"""`RecoverySettings`: what a recovery run trains, on which text, for how long; checked before any work.

The training text is by default the plan's calibration text, starting after its calibration windows
(and after the evaluation windows too when the two texts are the same), so the windows a run trains
on are disjoint from both the windows its factors were fitted to and the windows its quality is
measured on. Validation windows follow the training windows in the same text: held out from training,
they show the live validation perplexity and, for a target-application run, the gain on that text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Optional

from engine.compression.recovered import DEFAULT_SUBSET, RECOVERY_KINDS, RecoveryError

SETTINGS_VERSION = 1
DEFAULT_LEARNING_RATE = {"subspace": 2e-3, "basis": 2e-3}  # Bolaco's post-training rate (Appendix C), for both


@dataclass(frozen=True)
class RecoverySettings:
    kind: str = "subspace"
    steps: int = 100
    batch_windows: int = 4
    learning_rate: Optional[float] = None  # None: DEFAULT_LEARNING_RATE[kind]
    subset: int = DEFAULT_SUBSET  # r' for subspace
    training_text: Optional[str] = None  # None: the plan's calibration text
    window_len: Optional[int] = None  # None: the plan's calibration window length
    training_windows: int = 256
    start_window: Optional[int] = None  # None: after the plan's calibration (and evaluation) windows in that text
    validation_windows: int = 8
    eval_every: int = 20
    checkpoint_every: int = 10
    prune_to: Optional[float] = None  # basis: prune to this decoder-linear reduction
    prune_rounds: int = 4
    seed: int = 0
    version: int = SETTINGS_VERSION

    def __post_init__(self):
        if self.kind not in RECOVERY_KINDS:
            raise RecoveryError(f"Unknown recovery '{self.kind}'. Recoveries: {', '.join(RECOVERY_KINDS)}.")
        for name, low in (("steps", 1), ("batch_windows", 1), ("subset", 1), ("training_windows", 1),
                          ("validation_windows", 1), ("eval_every", 1), ("checkpoint_every", 1), ("prune_rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecoveryError(f"{_label(name)} must be a whole number of at least {low}, got {value!r}.")
        if self.window_len is not None and (not isinstance(self.window_len, int) or self.window_len < 2):
            raise RecoveryError(f"The training window length must be at least 2 tokens, got {self.window_len!r}.")
        if self.start_window is not None and (not isinstance(self.start_window, int) or self.start_window < 0):
            raise RecoveryError(f"The first training window must be 0 or more, got {self.start_window!r}.")
        if self.learning_rate is not None and not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise RecoveryError(f"The learning rate must be between 0 and 1, got {self.learning_rate!r}.")
        if self.prune_to is not None:
            if self.kind != "basis":
                raise RecoveryError("Pruning directions (a prune target, --prune-to) belongs to the basis recovery; "
                                    "subspace post-training keeps the plan's ranks. Choose basis, or leave the prune "
                                    "target out.")
            if not 0 < self.prune_to < 1:
                raise RecoveryError(f"The prune target (--prune-to) is a decoder-linear reduction between 0 and 1, got "
                                    f"{self.prune_to!r}.")
            if self.prune_rounds >= self.steps:
                raise RecoveryError(f"{self.prune_rounds} pruning rounds need more than {self.prune_rounds} training steps "
                                    f"(got {self.steps}): each round is followed by training.")

    def canonical(self) -> "RecoverySettings":
        """These settings with the values that do not change the training set to their defaults (a learning rate
        equal to the kind's default, r' for basis, pruning rounds without pruning), so equal runs have one key."""
        return replace(
            self,
            learning_rate=None if self.learning_rate == DEFAULT_LEARNING_RATE[self.kind] else self.learning_rate,
            subset=self.subset if self.kind == "subspace" else DEFAULT_SUBSET,
            prune_rounds=self.prune_rounds if self.prune_to is not None else RecoverySettings.prune_rounds,
        )

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.kind]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "RecoverySettings":
        data = dict(data or {})
        if data.get("version", SETTINGS_VERSION) != SETTINGS_VERSION:
            raise RecoveryError(f"These recovery settings have version {data.get('version')!r}; this RankScope reads "
                                f"version {SETTINGS_VERSION}.")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise RecoveryError(f"Unknown recovery setting(s): {', '.join(sorted(unknown))}; allowed: "
                                f"{', '.join(sorted(cls.__dataclass_fields__))}.")
        return cls(**data)

    def resolved(self, calibration: Optional[Mapping[str, Any]], evaluation: Optional[Mapping[str, Any]]) -> "RecoverySettings":
        """These settings with the text, window length and first window filled in from a plan's sections."""
        calibration, evaluation = dict(calibration or {}), dict(evaluation or {})
        text = self.training_text or calibration.get("text") or evaluation.get("text")
        if text is None:
            raise RecoveryError("The plan records no calibration or evaluation text; give a training text.")
        window_len = self.window_len or calibration.get("window_len") or evaluation.get("window_len") or 512
        start = self.start_window
        if start is None:
            start = 0
            for section in (calibration, evaluation):
                if section.get("text") == text:
                    # windows of another length cover a different number of tokens: skip enough of ours
                    covered = int(section.get("n_windows") or 0) * int(section.get("window_len") or window_len)
                    start = max(start, -(-covered // window_len))
        return replace(self, training_text=text, window_len=window_len, start_window=start)

    def pruning_steps(self) -> list[int]:
        """The steps after which the basis recovery prunes (evenly spread, the last one leaving time to retrain)."""
        if self.prune_to is None:
            return []
        every = self.steps // (self.prune_rounds + 1)
        return [every * (i + 1) for i in range(self.prune_rounds)]


def _label(name: str) -> str:
    return {"steps": "The step budget", "batch_windows": "The batch size (windows per step)",
            "subset": "The subspace size r'", "training_windows": "The number of training windows",
            "validation_windows": "The number of validation windows", "eval_every": "The validation interval",
            "checkpoint_every": "The checkpoint interval", "prune_rounds": "The number of pruning rounds"}.get(name, name)
