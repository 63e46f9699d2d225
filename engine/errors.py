"""User-facing errors: each says what was wrong and what is allowed.

The CLI and the app print `str(error)` of a `RankScopeError` as is, without a traceback, so the
message must stand on its own.
"""


class RankScopeError(Exception):
    """Base class for errors caused by input or environment rather than by a bug."""


class ModelNotFoundError(RankScopeError):
    """A model name, path or hub id could not be resolved."""


class ModelFileError(RankScopeError):
    """A model file that exists but cannot be read: not a GGUF file, a damaged or truncated weight file, bad JSON."""


class UnsupportedArchitectureError(RankScopeError):
    """The model's `model_type` has no architecture adapter."""


class CorpusError(RankScopeError):
    """A text source could not be read or is too short for the requested windows."""


class StoreError(RankScopeError):
    """The cache database cannot be used (corrupt, or written by a newer RankScope)."""


class DeviceError(RankScopeError):
    """A device or dtype choice this machine cannot honour: an unknown name, or a GPU PyTorch does not see."""


def describe_error(exc: BaseException) -> str:
    """Text for a user: the message of a RankScopeError, or the type and message of anything else."""
    return str(exc) if isinstance(exc, RankScopeError) else f"{type(exc).__name__}: {exc}"
