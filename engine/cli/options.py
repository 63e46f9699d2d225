"""Options shared by several `rankscope` commands, declared once with the engine's defaults.

`@text_options` gives a command the six text and window options (`--calibration-text`,
`--calibration-windows`, `--eval-text`, `--eval-windows`, `--window-len`, `--groups`) and hands
them to it as one `TextOptions`; `TextOptions.settings(base)` lays the options the user gave over
`base` (the engine's `TextSettings` defaults unless a command has better ones), and `for_plan(plan)`
runs a plan with its own recorded settings, refusing options that contradict it
(`engine.compression.plan_settings`), so a command knows which options were given explicitly. The calibration-only and evaluation-only commands
(`calibrate`, `spectra`, `models --eval`) use the single options below, with the same defaults.

`@placement_options` gives every command that loads a model `--device auto|cpu|cuda|cuda:N` and `--dtype
float32|bfloat16|float16`; they are checked against the machine before the command does anything (so a bad
choice stores nothing) and handed to it as one `Placement` (`engine.models.device`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
from typing import Callable, Optional

import typer

from engine.texts.settings import (
    DEFAULT_CALIBRATION_WINDOWS, DEFAULT_EVALUATION_WINDOWS, DEFAULT_GROUPS, DEFAULT_WINDOW_LEN, TextSettings,
)
from engine.texts.corpus import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVALUATION_TEXT

METHODS_HELP = "Decomposition method: svd, joint-svd, awsvd, feature-pca, feature-pca-sample, whiten."
MethodOption = typer.Option("feature-pca", "--method", help=METHODS_HELP)
JsonOption = typer.Option(False, "--json", help="Print JSON.")

# single-text commands (calibrate, spectra, models --eval)
CalibrationTextOption = typer.Option(DEFAULT_CALIBRATION_TEXT, "--text",
                                     help="Calibration text: built-in name, file or hf:NAME[:CONFIG]:SPLIT.")
CalibrationWindowsOption = typer.Option(DEFAULT_CALIBRATION_WINDOWS, "--windows", help="Calibration windows.")
EvaluationTextOption = typer.Option(DEFAULT_EVALUATION_TEXT, "--text", help="Evaluation text for --eval.")
EvaluationWindowsOption = typer.Option(DEFAULT_EVALUATION_WINDOWS, "--windows",
                                       help="Evaluation windows for --eval (16 x 512 = the first 8,192 tokens).")
WindowLenOption = typer.Option(DEFAULT_WINDOW_LEN, "--window-len", help="Tokens per window.")
GroupsOption = typer.Option(DEFAULT_GROUPS, "--groups", help="Groups of windows for the pooled covariance.")


@dataclass(frozen=True)
class TextOptions:
    """The text and window options as given on the command line (None: not given)."""

    calibration_text: Optional[str] = None
    calibration_windows: Optional[int] = None
    eval_text: Optional[str] = None
    eval_windows: Optional[int] = None
    window_len: Optional[int] = None
    groups: Optional[int] = None

    def given(self) -> dict:
        """The options given explicitly, by option name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def calibration_given(self) -> dict:
        """The given calibration options, in `TextSettings.calibration_dict()`'s keys."""
        values = {"text": self.calibration_text, "n_windows": self.calibration_windows,
                  "window_len": self.window_len, "n_groups": self.groups}
        return {k: v for k, v in values.items() if v is not None}

    def evaluation_given(self) -> dict:
        """The given evaluation options, in `TextSettings.evaluation_dict()`'s keys."""
        values = {"text": self.eval_text, "n_windows": self.eval_windows, "window_len": self.window_len}
        return {k: v for k, v in values.items() if v is not None}

    def for_plan(self, plan, method: Optional[str] = None, transfer: bool = False):
        """The plan's own method and texts, with these options checked against it (`plan_settings`)."""
        from engine.compression.plan_settings import plan_settings

        return plan_settings(plan, method=method, calibration=self.calibration_given(),
                             evaluation=self.evaluation_given(), transfer=transfer)

    def settings(self, base: TextSettings = TextSettings()) -> TextSettings:
        """`base` with every option given on the command line in place of its value."""
        calibration, evaluation = base.calibration_dict(), base.evaluation_dict()
        for section, key, value in (
            (calibration, "text", self.calibration_text), (calibration, "n_windows", self.calibration_windows),
            (calibration, "n_groups", self.groups), (calibration, "window_len", self.window_len),
            (evaluation, "text", self.eval_text), (evaluation, "n_windows", self.eval_windows),
            (evaluation, "window_len", self.window_len),
        ):
            if value is not None:
                section[key] = value
        return TextSettings.from_dict({**base.to_dict(), "calibration": calibration, "evaluation": evaluation})


def _option(name: str, flag: str, annotation: type, default, help_text: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[annotation],
                             default=typer.Option(None, flag, help=help_text, show_default=str(default)))


_TEXT_PARAMETERS = (
    _option("calibration_text", "--calibration-text", str, DEFAULT_CALIBRATION_TEXT,
            "Calibration text (built-in name, file, or hf:...)."),
    _option("calibration_windows", "--calibration-windows", int, DEFAULT_CALIBRATION_WINDOWS, "Calibration windows."),
    _option("eval_text", "--eval-text", str, DEFAULT_EVALUATION_TEXT, "Evaluation text (built-in name, file, or hf:...)."),
    _option("eval_windows", "--eval-windows", int, DEFAULT_EVALUATION_WINDOWS,
            "Evaluation windows (16 x 512 = the first 8,192 tokens)."),
    _option("window_len", "--window-len", int, DEFAULT_WINDOW_LEN, "Tokens per window, for calibration and evaluation."),
    _option("groups", "--groups", int, DEFAULT_GROUPS, "Groups of calibration windows for the pooled covariance."),
)


def text_options(command: Callable) -> Callable:
    """Give `command` the six text and window options; it receives them as its `texts: TextOptions` argument."""
    signature = inspect.signature(command)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values() if p.name != "texts"]

    @functools.wraps(command)
    def with_texts(**kwargs):
        texts = TextOptions(**{p.name: kwargs.pop(p.name) for p in _TEXT_PARAMETERS})
        return command(texts=texts, **kwargs)

    with_texts.__signature__ = signature.replace(parameters=[*own, *_TEXT_PARAMETERS])
    return with_texts


WorkersOption = typer.Option(1, "--workers", help="Evaluate on N Ray workers, one model replica each (a local Ray "
                             "started for the run, one CPU per worker); 1 evaluates in this process.")
RayAddressOption = typer.Option(None, "--ray-address", help="Join a running Ray cluster (host:port of `ray start "
                                "--head`) instead of starting a local one; every node must see the model directory.")


DeviceOption = typer.Option("auto", "--device", help="Where forward passes run: auto (a CUDA GPU when PyTorch sees "
                            "one, else the CPU), cpu, cuda or cuda:N. Results are shared between devices.")
_PLACEMENT_PARAMETERS = (
    inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=DeviceOption),
    inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        "float32", "--dtype", help="Forward-pass dtype: float32, bfloat16 or float16 (statistics and factorisations "
        "stay float64; results in another dtype are cached apart from float32 ones).")),
)


def placement_options(command: Callable) -> Callable:
    """Give `command` `--device` and `--dtype`; it receives them checked, as its `placement: Placement` argument.

    A choice this machine cannot honour (`--device cuda` without a GPU, an unknown dtype) ends the command with
    the readable error before it opens the store or loads anything."""
    signature = inspect.signature(command)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
           if p.name != "placement"]

    @functools.wraps(command)
    def with_placement(**kwargs):
        from engine.cli import fail
        from engine.errors import RankScopeError
        from engine.models.device import resolve_placement

        device, dtype = kwargs.pop("device"), kwargs.pop("dtype")
        try:
            placement = resolve_placement(device, dtype)
        except RankScopeError as exc:
            fail(exc)
        return command(placement=placement, **kwargs)

    with_placement.__signature__ = signature.replace(parameters=[*own, *_PLACEMENT_PARAMETERS])
    return with_placement
