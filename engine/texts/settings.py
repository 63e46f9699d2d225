"""`TextSettings`: which texts calibrate and evaluate, and how they are cut into windows.

One versioned value for what every front end asks about texts (the CLI's options, the app's sidebar,
a study's settings, a plan's calibration and evaluation sections), with the engine's defaults
(DESIGN.md §4): calibrate on 128 windows of 512 tokens of War and Peace with 32 groups for the
pooled covariance, evaluate on the first 16 windows of 512 tokens of Sherlock Holmes.

`to_dict`/`from_dict` round-trip it; `from_dict` also reads the flat form that RankScope 0.1.0
wrote into study settings (`calibration_text`, `calibration_windows`, `evaluation_text`,
`evaluation_windows`, `window_len`, `groups`), so studies stored by that release still load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from engine.errors import CorpusError
from engine.texts.corpus import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVALUATION_TEXT
from engine.texts.windows import Windowing

TEXT_SETTINGS_VERSION = 1
DEFAULT_WINDOW_LEN = 512
DEFAULT_CALIBRATION_WINDOWS = 128
DEFAULT_EVALUATION_WINDOWS = 16  # the first 8,192 tokens
DEFAULT_GROUPS = 32  # Bolaco's m for the pooled covariance
DEFAULT_CALIBRATION_WINDOWING = Windowing(DEFAULT_WINDOW_LEN, DEFAULT_CALIBRATION_WINDOWS)
DEFAULT_EVALUATION_WINDOWING = Windowing(DEFAULT_WINDOW_LEN, DEFAULT_EVALUATION_WINDOWS)

_CALIBRATION_KEYS = {"text", "window_len", "n_windows", "n_groups"}
_EVALUATION_KEYS = {"text", "window_len", "n_windows"}
_LEGACY_KEYS = {"calibration_text", "calibration_windows", "evaluation_text", "evaluation_windows", "window_len",
                "groups"}


@dataclass(frozen=True)
class TextSettings:
    """Calibration and evaluation texts with their windowing (both windowings start at window 0)."""

    calibration_text: str = DEFAULT_CALIBRATION_TEXT
    calibration_windowing: Windowing = DEFAULT_CALIBRATION_WINDOWING
    n_groups: int = DEFAULT_GROUPS
    evaluation_text: str = DEFAULT_EVALUATION_TEXT
    evaluation_windowing: Windowing = DEFAULT_EVALUATION_WINDOWING

    def __post_init__(self):
        for name in ("calibration_windowing", "evaluation_windowing"):
            if not isinstance(getattr(self, name), Windowing):
                raise CorpusError(f"{name} must be a Windowing, got {getattr(self, name)!r}.")
        if isinstance(self.n_groups, bool) or not isinstance(self.n_groups, int) or self.n_groups < 1:
            raise CorpusError(f"The pooled covariance needs at least 1 group of calibration windows, got {self.n_groups}.")
        if not self.calibration_text or not self.evaluation_text:
            raise CorpusError("Both a calibration text and an evaluation text are needed.")

    @classmethod
    def of(cls, calibration_text: str = DEFAULT_CALIBRATION_TEXT,
           calibration_windows: Optional[int] = DEFAULT_CALIBRATION_WINDOWS,
           evaluation_text: str = DEFAULT_EVALUATION_TEXT,
           evaluation_windows: Optional[int] = DEFAULT_EVALUATION_WINDOWS,
           window_len: int = DEFAULT_WINDOW_LEN, groups: int = DEFAULT_GROUPS) -> "TextSettings":
        """Settings with one window length for both texts, as the CLI and the app ask for them."""
        return cls(calibration_text, Windowing(window_len, calibration_windows), groups,
                   evaluation_text, Windowing(window_len, evaluation_windows))

    def calibration_dict(self) -> dict:
        w = self.calibration_windowing
        return {"text": self.calibration_text, "window_len": w.window_len, "n_windows": w.n_windows,
                "n_groups": self.n_groups}

    def evaluation_dict(self) -> dict:
        w = self.evaluation_windowing
        return {"text": self.evaluation_text, "window_len": w.window_len, "n_windows": w.n_windows}

    def to_dict(self) -> dict:
        return {"version": TEXT_SETTINGS_VERSION, "calibration": self.calibration_dict(),
                "evaluation": self.evaluation_dict()}

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "TextSettings":
        """Settings from `to_dict`'s form, RankScope 0.1.0's flat form, or None/{} for the defaults."""
        if not data:
            return cls()
        if not isinstance(data, Mapping):
            raise CorpusError(f"Text settings must be a JSON object, got {type(data).__name__}.")
        if "version" not in data:
            unknown = set(data) - _LEGACY_KEYS
            if unknown:
                raise CorpusError(f"Unknown text setting(s): {', '.join(sorted(unknown))}; RankScope 0.1.0's form allows "
                                  f"{', '.join(sorted(_LEGACY_KEYS))}.")
            return cls.of(data.get("calibration_text", DEFAULT_CALIBRATION_TEXT),
                          data.get("calibration_windows", DEFAULT_CALIBRATION_WINDOWS),
                          data.get("evaluation_text", DEFAULT_EVALUATION_TEXT),
                          data.get("evaluation_windows", DEFAULT_EVALUATION_WINDOWS),
                          data.get("window_len", DEFAULT_WINDOW_LEN), data.get("groups", DEFAULT_GROUPS))
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= TEXT_SETTINGS_VERSION:
            raise CorpusError(f"These text settings have version {version!r}; this RankScope reads versions 1 to "
                              f"{TEXT_SETTINGS_VERSION}.")
        unknown = set(data) - {"version", "calibration", "evaluation"}
        if unknown:
            raise CorpusError(f"Unknown text setting(s): {', '.join(sorted(unknown))}; "
                              "allowed: version, calibration, evaluation.")
        for name, allowed in (("calibration", _CALIBRATION_KEYS), ("evaluation", _EVALUATION_KEYS)):
            section = data.get(name) or {}
            if isinstance(section, Mapping) and set(section) - allowed:
                raise CorpusError(f"Unknown {name} setting(s): {', '.join(sorted(set(section) - allowed))}; "
                                  f"allowed: {', '.join(sorted(allowed))}.")
        calibration, evaluation = data.get("calibration") or {}, data.get("evaluation") or {}
        try:
            return cls(
                calibration.get("text", DEFAULT_CALIBRATION_TEXT),
                Windowing(calibration.get("window_len", DEFAULT_WINDOW_LEN),
                          calibration.get("n_windows", DEFAULT_CALIBRATION_WINDOWS)),
                calibration.get("n_groups", DEFAULT_GROUPS),
                evaluation.get("text", DEFAULT_EVALUATION_TEXT),
                Windowing(evaluation.get("window_len", DEFAULT_WINDOW_LEN),
                          evaluation.get("n_windows", DEFAULT_EVALUATION_WINDOWS)),
            )
        except (AttributeError, TypeError) as exc:
            raise CorpusError(f"Malformed text settings {dict(data)!r}: {exc}.") from exc

    def with_sections(self, calibration: Optional[Mapping[str, Any]] = None,
                      evaluation: Optional[Mapping[str, Any]] = None) -> "TextSettings":
        """These settings with a plan's `calibration` and/or `evaluation` section (as `calibration_dict` and
        `evaluation_dict` write them) in place of their own; a missing section, or a key a section lacks,
        keeps these settings' value; keys that are not settings (a `text_fingerprint`) are ignored."""
        data = self.to_dict()
        for name, section in (("calibration", calibration), ("evaluation", evaluation)):
            if section is not None:
                data[name] = {**data[name], **{k: section[k] for k in data[name] if k in section}}
        return TextSettings.from_dict(data)

    def describe_calibration(self) -> str:
        w = self.calibration_windowing
        return f"'{self.calibration_text}', {w.n_windows} windows of {w.window_len} tokens, {self.n_groups} groups"

    def describe_evaluation(self) -> str:
        w = self.evaluation_windowing
        return f"'{self.evaluation_text}', {w.n_windows} windows of {w.window_len} tokens"
