"""The workspace every page shares: model, device and dtype, texts and windowing, chosen once in the sidebar.

Each page calls `workspace_sidebar()` and then `load_workspace_model(...)`. Widget values persist
across pages (Streamlit drops a widget's state when another page runs, so each value is also kept
under a shadow key). Defaults are the engine's, overridable by environment variables so tests and
demos can start small:

| variable | default |
|---|---|
| `RANKSCOPE_MODEL` | `smollm2-135m` |
| `RANKSCOPE_CALIBRATION_TEXT` | `war-and-peace` (a built-in name or a file path) |
| `RANKSCOPE_EVALUATION_TEXT` | `sherlock-holmes` |
| `RANKSCOPE_WINDOW_LEN` | 512 tokens |
| `RANKSCOPE_CALIBRATION_WINDOWS` | 128 |
| `RANKSCOPE_EVALUATION_WINDOWS` | 16 |
| `RANKSCOPE_GROUPS` | 32 (groups of the pooled covariance) |
| `RANKSCOPE_METHOD` | `feature-pca` |
| `RANKSCOPE_DEVICE` | `auto` (a CUDA GPU when PyTorch sees one, else the CPU; or `cpu`, `cuda:N`) |
| `RANKSCOPE_DTYPE` | `float32` (forward passes; or `bfloat16`, `float16`) |

The device list offers `auto`, `cpu` and each CUDA GPU PyTorch sees. A model is loaded once per
(model, device, dtype); results measured in bfloat16 or float16 are cached apart from float32 ones.

When the app serves a team (`app/access.py`), the model and text paths must lie inside the allowed
roots: a path outside is refused with an `st.error` and the page stops.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import streamlit as st

from app.access import AccessRefused, path_policy
from app.resources import current_database, default_model_reference, get_model
from engine.texts.settings import (
    DEFAULT_CALIBRATION_WINDOWS, DEFAULT_EVALUATION_WINDOWS, DEFAULT_GROUPS, DEFAULT_WINDOW_LEN, TextSettings,
)
from engine.errors import RankScopeError, describe_error
from engine.methods import METHODS
from engine.models.device import DTYPE_CHOICES, resolve_placement
from engine.models.loading import LoadedModel
from engine.models.registry import REGISTRY
from engine.texts.corpus import BUILTIN_BOOKS, DEFAULT_CALIBRATION_TEXT, DEFAULT_EVALUATION_TEXT
from engine.texts.windows import Windowing

DEFAULT_METHOD = "feature-pca"
_SHADOW = "_kept."


@dataclass(frozen=True)
class Workspace:
    """The model and text settings chosen in the sidebar (plain values only)."""

    model_reference: str
    calibration_text: str
    evaluation_text: str
    window_len: int
    calibration_windows: int
    evaluation_windows: int
    n_groups: int
    device: str = "auto"  # as chosen; `load_workspace_model` resolves it on this machine
    dtype: str = "float32"

    def text_settings(self) -> TextSettings:
        return TextSettings.of(self.calibration_text, self.calibration_windows, self.evaluation_text,
                               self.evaluation_windows, self.window_len, self.n_groups)

    @property
    def calibration_windowing(self) -> Windowing:
        return self.text_settings().calibration_windowing

    @property
    def evaluation_windowing(self) -> Windowing:
        return self.text_settings().evaluation_windowing

    def describe_calibration(self) -> str:
        return self.text_settings().describe_calibration()

    def describe_evaluation(self) -> str:
        return self.text_settings().describe_evaluation()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


def set_persistent(key: str, value: Any) -> None:
    """Set a persistent widget's value from code (call before the widget is drawn, e.g. in a callback)."""
    st.session_state[_SHADOW + key] = value
    st.session_state[key] = value


def _allowed(value: Any, options: Sequence[Any] | None) -> bool:
    """Whether a remembered value still fits the widget's options (each item, for a multiselect)."""
    if options is None:
        return True
    return all(item in options for item in value) if isinstance(value, list) else value in options


def persistent(widget: Callable[..., Any], label: str, key: str, default: Any, **kwargs) -> Any:
    """Draw `widget(label, key=key, **kwargs)` with a value that survives page switches.

    The value lives under a shadow key, updated by the widget's `on_change`; each run seeds the widget
    from it, because a page switch gives the widget a new identity and would reset it to its default.
    """
    shadow = _SHADOW + key
    if shadow not in st.session_state or not _allowed(st.session_state[shadow], kwargs.get("options")):
        st.session_state[shadow] = default
    st.session_state[key] = st.session_state[shadow]
    on_change = kwargs.pop("on_change", None)

    def keep() -> None:
        st.session_state[shadow] = st.session_state[key]
        if on_change is not None:
            on_change()

    widget(label, key=key, on_change=keep, **kwargs)
    return st.session_state[key]


def _text_choice(title: str, prefix: str, env_name: str, default_book: str) -> str:
    configured = os.environ.get(env_name, "").strip() or default_book
    book_default = configured if configured in BUILTIN_BOOKS else default_book
    file_default = "" if configured in BUILTIN_BOOKS else configured
    book = persistent(st.selectbox, title, f"{prefix}_book", book_default, options=list(BUILTIN_BOOKS))
    path = persistent(st.text_input, "...or a .txt/.jsonl/.parquet path", f"{prefix}_file", file_default).strip()
    if path:
        st.caption(f"Using the file, not the built-in text: {path}")
    return path or book


def device_choices() -> list[str]:
    """The devices the sidebar offers: auto, cpu, and each CUDA GPU PyTorch sees (`cuda:0`, ...)."""
    import torch

    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["auto", "cpu", *gpus]


def _compute_choice() -> tuple[str, str]:
    """The device and dtype widgets (defaults from `RANKSCOPE_DEVICE` and `RANKSCOPE_DTYPE` when they are offered)."""
    devices = device_choices()
    configured = os.environ.get("RANKSCOPE_DEVICE", "auto").strip() or "auto"
    device = persistent(st.selectbox, "Device", "device", configured if configured in devices else "auto",
                        options=devices, help="Where forward passes run. auto: the first CUDA GPU when PyTorch sees "
                                               "one, else the CPU. Cached results are shared between devices.")
    configured = os.environ.get("RANKSCOPE_DTYPE", "float32").strip() or "float32"
    dtype = persistent(st.selectbox, "Forward dtype", "dtype", configured if configured in DTYPE_CHOICES else "float32",
                       options=list(DTYPE_CHOICES), help="Forward passes only: statistics and factorisations stay "
                                                         "float64. Results in bfloat16 or float16 are cached apart "
                                                         "from float32 ones.")
    return device, dtype


def workspace_sidebar() -> Workspace:
    """Draw the shared sidebar (model, device and dtype, texts, windows) and return its settings."""
    with st.sidebar:
        st.header("Model")
        default = default_model_reference()
        options = list(dict.fromkeys([default, *REGISTRY]))
        choice = persistent(st.selectbox, "Registry model", "model_choice", default, options=options)
        custom = persistent(st.text_input, "...or a model directory, .gguf file or hub id", "model_custom", "")
        device, dtype = _compute_choice()
        st.header("Texts")
        calibration = _text_choice("Calibration text", "calibration", "RANKSCOPE_CALIBRATION_TEXT",
                                   DEFAULT_CALIBRATION_TEXT)
        evaluation = _text_choice("Evaluation text", "evaluation", "RANKSCOPE_EVALUATION_TEXT", DEFAULT_EVALUATION_TEXT)
        if calibration == evaluation:
            st.warning("Calibrating and evaluating on the same text flatters compressed models; "
                       "choose a different evaluation text for honest numbers.")
        st.header("Windows")
        window_len = persistent(st.number_input, "Window length (tokens)", "window_len",
                                _env_int("RANKSCOPE_WINDOW_LEN", DEFAULT_WINDOW_LEN),
                                min_value=16, max_value=4096, step=16)
        calibration_windows = persistent(
            st.number_input, "Calibration windows", "calibration_windows",
            _env_int("RANKSCOPE_CALIBRATION_WINDOWS", DEFAULT_CALIBRATION_WINDOWS),
            min_value=1, max_value=4096, step=1)
        evaluation_windows = persistent(
            st.number_input, "Evaluation windows", "evaluation_windows",
            _env_int("RANKSCOPE_EVALUATION_WINDOWS", DEFAULT_EVALUATION_WINDOWS),
            min_value=1, max_value=1024, step=1)
        groups = persistent(st.number_input, "Covariance groups (pooled)", "calibration_groups",
                            _env_int("RANKSCOPE_GROUPS", DEFAULT_GROUPS), min_value=1, max_value=256, step=1,
                            help="The calibration windows are split into this many groups; the pooled "
                                 "covariance averages the groups' covariances (Bolaco uses 32).")
    return _within_roots(Workspace(custom.strip() or choice, calibration, evaluation, int(window_len),
                                   int(calibration_windows), int(evaluation_windows), int(groups), device, dtype))


def _within_roots(workspace: Workspace) -> Workspace:
    """The workspace as the path policy allows it (locally unchanged; shared: paths resolved inside the roots), or
    an `st.error` for each refused path and a stop of the page."""
    policy = path_policy()
    checks = {"model_reference": ("Model", policy.model_reference),
              "calibration_text": ("Calibration text", policy.text_source),
              "evaluation_text": ("Evaluation text", policy.text_source)}
    allowed, refusals = {}, []
    for field, (what, check) in checks.items():
        try:
            allowed[field] = check(getattr(workspace, field))
        except AccessRefused as exc:
            refusals.append(f"{what}: {exc}")
    for refusal in refusals:
        st.error(refusal)
    if refusals:
        st.stop()
    return dataclasses.replace(workspace, **allowed)


def load_workspace_model(workspace: Workspace) -> LoadedModel:
    """The workspace's model, or an `st.error` saying what is wrong and a stop of the page."""
    reference = workspace.model_reference
    try:
        placement = resolve_placement(workspace.device, workspace.dtype)  # DeviceError: what is wrong, what is allowed
        return get_model(reference, current_database(), placement.device, placement.dtype)
    except RankScopeError as exc:
        st.error(f"Could not load '{reference}'. {exc}")
    except Exception as exc:  # noqa: BLE001 - any loader failure is shown, not dumped
        st.error(f"Could not load '{reference}': {describe_error(exc)}")
    st.stop()


def choose_method(container=st) -> str:
    """The decomposition method (shared by the pages that compress), with its description as help."""
    default = os.environ.get("RANKSCOPE_METHOD", DEFAULT_METHOD)
    return persistent(container.selectbox, "Method", "method", default if default in METHODS else DEFAULT_METHOD,
                      options=list(METHODS), format_func=lambda name: name,
                      help="; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items()))
