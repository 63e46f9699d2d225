"""Serving the app to a team (DESIGN.md §14): who may see it, and which paths it may read and write.

Locally (the default: `make app` binds 127.0.0.1) nothing here applies: every path is used as typed.
Serving others is asked for explicitly with `RANKSCOPE_SHARE=1` (`make app SHARE=1` binds 0.0.0.0);
then `require_access()` asks each browser session for the shared secret `RANKSCOPE_SECRET` before any
page renders, and `PathPolicy` keeps every user-typed path inside the configured roots:

| variable | meaning |
|---|---|
| `RANKSCOPE_SHARE` | `1` (or `true`, `yes`, `on`): serve a team |
| `RANKSCOPE_SECRET` | the shared secret; share mode refuses to start without one |
| `RANKSCOPE_WORKSPACE` | where exports are written (default `<project>/exports`); also readable |
| `RANKSCOPE_ALLOWED_ROOTS` | more folders models and texts may be read from, separated by `os.pathsep` |

In share mode a model is a registry name or a path inside the read roots (the workspace, the cache,
the allowed roots); a text is a built-in book or such a path; an export directory is a folder below
the workspace (a relative name is taken inside it). Paths are resolved (`~`, `..`, symlinks) before
the check, and the resolved path is what the engine is given, so it cannot be reinterpreted (as a hub
id, say). A refusal names the roots, never the typed path, and reads the same whether the path
exists or not.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import streamlit as st

from engine.errors import RankScopeError
from engine.models.registry import REGISTRY
from engine.paths import PROJECT_ROOT, cache_root
from engine.texts.corpus import BUILTIN_BOOKS

SHARE_ENV, SECRET_ENV = "RANKSCOPE_SHARE", "RANKSCOPE_SECRET"
WORKSPACE_ENV, ALLOWED_ROOTS_ENV = "RANKSCOPE_WORKSPACE", "RANKSCOPE_ALLOWED_ROOTS"
DEFAULT_WORKSPACE = PROJECT_ROOT / "exports"
AUTHENTICATED = "_access.authenticated"  # session-state flag: this browser session gave the secret
WRONG_SECRET_DELAY_S = 1.0  # slows guessing from one session


class AccessRefused(RankScopeError):
    """A path outside what the shared app may read or write."""


def sharing() -> bool:
    """Whether this process serves a team (`RANKSCOPE_SHARE`)."""
    return os.environ.get(SHARE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _resolved(path: Path) -> Optional[Path]:
    """`path` with `~`, `..` and symlinks resolved, or None when it cannot be (a loop, a NUL byte)."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _inside(path: Optional[Path], root: Path, strictly: bool = False) -> bool:
    return path is not None and path.is_relative_to(root) and not (strictly and path == root)


@dataclass(frozen=True)
class PathPolicy:
    """Which user-typed paths the app may use: all of them locally, only those inside the roots when shared."""

    shared: bool
    workspace: Path
    allowed_roots: tuple[Path, ...] = ()
    cache: Optional[Path] = None

    def __post_init__(self) -> None:
        if self.shared:  # compare resolved paths with resolved roots
            object.__setattr__(self, "workspace", _resolved(Path(self.workspace)) or Path(self.workspace))
            object.__setattr__(self, "allowed_roots", tuple(dict.fromkeys(
                r for r in (_resolved(Path(root)) for root in self.allowed_roots) if r is not None)))
            if self.cache is not None:
                object.__setattr__(self, "cache", _resolved(Path(self.cache)))

    @classmethod
    def from_environment(cls) -> "PathPolicy":
        """The policy of this process, from `RANKSCOPE_SHARE`, `RANKSCOPE_WORKSPACE` and `RANKSCOPE_ALLOWED_ROOTS`."""
        workspace = Path(os.environ.get(WORKSPACE_ENV, "").strip() or DEFAULT_WORKSPACE).expanduser()
        roots = tuple(Path(part.strip()) for part in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep)
                      if part.strip())
        shared = sharing()
        return cls(shared, workspace, roots, cache_root() if shared else None)

    @property
    def read_roots(self) -> tuple[Path, ...]:
        """The folders models and texts may be read from in share mode."""
        return tuple(dict.fromkeys([self.workspace, *([self.cache] if self.cache else []), *self.allowed_roots]))

    def _readable(self, typed: str) -> Optional[str]:
        path = _resolved(Path(typed))
        return str(path) if any(_inside(path, root) for root in self.read_roots) else None

    def _roots_text(self) -> str:
        return ", ".join(str(root) for root in self.read_roots)

    def _readable_or_named(self, typed: str, names, what: str, files: str) -> str:
        """`typed` locally or when it is one of `names`; else its resolved path inside the read roots, or a refusal
        that names the roots and reads the same whether the path exists or not."""
        if not self.shared or typed in names:
            return typed
        path = self._readable(typed)
        if path is None:
            raise AccessRefused(f"This shared app {what} ({', '.join(names)}) or {files} inside these folders: "
                                f"{self._roots_text()}. Choose one of those.")
        return path

    def model_reference(self, reference: str) -> str:
        """The model reference to load: as typed locally; when shared, a registry name or a resolved path inside
        the read roots (anything else, hub ids included, raises `AccessRefused`)."""
        return self._readable_or_named(reference, REGISTRY, "loads a registry model",
                                       "a model directory or .gguf file")

    def text_source(self, source: str) -> str:
        """The text to read: as typed locally; when shared, a built-in book or a resolved path inside the read
        roots (anything else, hub datasets included, raises `AccessRefused`)."""
        return self._readable_or_named(source, BUILTIN_BOOKS, "reads a built-in text", "a .txt/.jsonl/.parquet file")

    def export_directory(self, typed: str) -> Path:
        """Where to export: as typed locally (`~` expanded); when shared, a resolved folder below the workspace (a
        relative name is taken inside it; the workspace itself and anything outside raise `AccessRefused`)."""
        path = Path(typed).expanduser()
        if not self.shared:
            return path
        resolved = _resolved(path if path.is_absolute() else self.workspace / path)
        if not _inside(resolved, self.workspace, strictly=True):
            raise AccessRefused(
                f"This shared app writes exports only inside its workspace, {self.workspace}: give a new folder "
                "in it (a relative name is taken inside it).")
        return resolved


def path_policy() -> PathPolicy:
    """The path policy of this process (read from the environment on each call; cheap)."""
    return PathPolicy.from_environment()


def _is_loopback(address: str) -> bool:
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def require_access() -> None:
    """Stop this run unless the browser session may see the app; call before anything else is drawn.

    Locally: refuses only when the server was told to listen beyond this machine (`--server.address`
    other than a loopback address) without share mode. Shared: refuses without `RANKSCOPE_SECRET`,
    and asks for it once per browser session (compared in constant time).
    """
    if not sharing():
        address = st.get_option("server.address")
        if address and not _is_loopback(str(address)):
            st.error(f"This app listens on {address}, beyond this machine, but serving others was not asked for. "
                     f"Start it with `make app` (this machine only), or serve the team with `make app SHARE=1` "
                     f"({SHARE_ENV}=1) and a shared secret in {SECRET_ENV} (README.md, \"Running for a team\").")
            st.stop()
        return
    secret = os.environ.get(SECRET_ENV, "")
    if not secret.strip():
        st.error(f"This app is set to serve a team ({SHARE_ENV}=1) but has no shared secret: set {SECRET_ENV} in "
                 "the server's environment and start it again (README.md, \"Running for a team\").")
        st.stop()
    if st.session_state.get(AUTHENTICATED) is True:
        return
    with st.form("access_form", enter_to_submit=True):
        typed = st.text_input("Team secret", type="password", key="access_secret",
                              help="RankScope is shared here: ask whoever runs it for the secret.")
        entered = st.form_submit_button("Enter", key="access_enter")
    if entered:
        if hmac.compare_digest(typed.encode("utf-8"), secret.encode("utf-8")):
            st.session_state[AUTHENTICATED] = True
            st.rerun()
        time.sleep(WRONG_SECRET_DELAY_S)
        st.error("Wrong secret.")
    st.stop()
