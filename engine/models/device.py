"""Where a model's forward passes run and in which floating-point type: `--device` and `--dtype`.

`resolve_placement("auto", "bfloat16")` checks both choices against the machine and returns a
`Placement`: the torch device (`cpu`, `cuda:N`) and the forward dtype. `auto` takes the first CUDA
GPU when PyTorch sees one, else the CPU. Only forward passes use the dtype: calibration statistics
are accumulated in float64 on the CPU, factorisations are float64 on the CPU, and log-softmax and KL
are float32, as in a float32 run. float16 is allowed on the CPU: PyTorch has CPU kernels for it, so
a float16 run can be tried (for overflow) before a GPU run, though it is rarely faster there.

Cached results measured in bfloat16 or float16 differ from float32 ones, so the forward dtype is part
of their cache keys (`engine.cache.keys`), but only when it is not float32: every float32 key is the
one it always was. The device is not part of any key: float32 on a GPU differs from the CPU by
rounding only (TF32 stays off, as PyTorch's default), so results are shared between devices.

`model_device(module)` is the device where a module computes (accelerate's hook device when the model
was spread over devices with `device_map`), the place to move its inputs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from engine.errors import DeviceError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPE = "float32"
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


@dataclass(frozen=True)
class Placement:
    """A resolved device (`cpu` or `cuda:N`) and forward dtype name, checked against this machine."""

    device: str = "cpu"
    dtype: str = DEFAULT_DTYPE

    @property
    def torch_device(self) -> "torch.device":
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self) -> "torch.dtype":
        return torch_dtype(self.dtype)

    def describe(self) -> str:
        return f"{self.device}, {self.dtype}"


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a dtype name; `DeviceError` naming the allowed ones for anything else."""
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise DeviceError(f"--dtype {name}: unknown dtype. Allowed: {', '.join(DTYPE_CHOICES)} "
                          f"(forward passes only; statistics and factorisations stay float64).")
    return dtypes[name]


def resolve_device(choice: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device this machine has (`cpu` or `cuda:N`), or a `DeviceError`."""
    import torch

    choice = (choice or "").strip().lower()
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    match = _CUDA_INDEX.fullmatch(choice)
    if choice != "cuda" and match is None:
        raise DeviceError(f"--device {choice or repr(choice)}: unknown device. Allowed: {', '.join(DEVICE_CHOICES)} "
                          "(auto: the first CUDA GPU when PyTorch sees one, else the CPU).")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {choice}: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is "
                          f"False; PyTorch {torch.__version__}). Use --device cpu or auto.")
    count = torch.cuda.device_count()
    index = int(match.group(1)) if match else torch.cuda.current_device()
    if index >= count:
        raise DeviceError(f"--device {choice}: PyTorch sees {count} CUDA GPU(s), numbered "
                          f"{'0' if count == 1 else f'0 to {count - 1}'}. Use one of those, cuda, auto or cpu.")
    return f"cuda:{index}"


def resolve_placement(device: str = "cpu", dtype: str = DEFAULT_DTYPE) -> Placement:
    """Check a device choice and a dtype name against this machine (module docstring).

    Example: `resolve_placement("auto", "bfloat16")` is `Placement("cpu", "bfloat16")` on a machine
    without a GPU. The dtype is checked first, so an unknown one is reported even where the device is bad.
    """
    import torch

    torch_dtype(dtype)
    resolved = resolve_device(device)
    if dtype == "bfloat16" and resolved.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype bfloat16: {torch.cuda.get_device_name(resolved)} has no bfloat16 support. "
                          "Use --dtype float16 or float32 on it, or --device cpu.")
    return Placement(resolved, dtype)


def model_device(module: "torch.nn.Module") -> "torch.device":
    """Where `module` computes: accelerate's execution device when a device map placed it, else its first
    parameter's device (the CPU for a module without parameters)."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def input_device(model: "torch.nn.Module") -> "torch.device":
    """Where a model's token ids go: the device of its input embedding (of the model itself when it has none)."""
    embeddings = getattr(model, "get_input_embeddings", None)
    return model_device(embeddings() if embeddings is not None else model)


def needs_device_map(config, placement: Placement, headroom: float = 0.9) -> Optional[int]:
    """The model's size in bytes in the placement's dtype when it does not fit in `headroom` of the GPU's free
    memory (then it loads with accelerate's `device_map="auto"`), else None. Always None on the CPU."""
    if not placement.device.startswith("cuda"):
        return None
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # shapes only, no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    size = compute_module_sizes(skeleton, dtype=placement.torch_dtype)[""]
    free, _total = torch.cuda.mem_get_info(placement.torch_device)
    return size if size > headroom * free else None
