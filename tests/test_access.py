"""Unit tests of the app's path policy (app/access.py) and of how `make app` binds (DESIGN.md §14).

Locally every path passes as typed; in share mode a path is resolved (symlinks and `..` included)
and must lie inside the configured roots, and a refusal reads the same whether the path exists or not.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from app.access import AccessRefused, PathPolicy
from engine.paths import PROJECT_ROOT


@pytest.fixture
def roots(tmp_path):
    """A workspace, an allowed root with a text and a model directory, and things outside both."""
    workspace, allowed, outside = tmp_path / "workspace", tmp_path / "allowed", tmp_path / "outside"
    for folder in (workspace, allowed / "model", outside / "model"):
        folder.mkdir(parents=True)
    for folder in (allowed / "model", outside / "model"):
        (folder / "config.json").write_text("{}")
    (allowed / "book.txt").write_text("inside")
    (outside / "secret.txt").write_text("outside")
    return {"workspace": workspace, "allowed": allowed, "outside": outside, "cache": tmp_path / "cache"}


def shared(roots) -> PathPolicy:
    return PathPolicy(shared=True, workspace=roots["workspace"], allowed_roots=(roots["allowed"],),
                      cache=roots["cache"])


def refusal(call) -> str:
    with pytest.raises(AccessRefused) as caught:
        call()
    return str(caught.value)


def test_local_mode_passes_every_path_as_typed(roots):
    local = PathPolicy(shared=False, workspace=roots["workspace"], allowed_roots=(), cache=roots["cache"])
    outside = roots["outside"]
    assert local.model_reference(str(outside / "model")) == str(outside / "model")
    assert local.model_reference("org/some-hub-model") == "org/some-hub-model"
    assert local.text_source(str(outside / "secret.txt")) == str(outside / "secret.txt")
    assert local.text_source("hf:some/dataset:train") == "hf:some/dataset:train"
    assert local.export_directory(str(outside / "new")) == outside / "new"


def test_environment_gives_local_mode_and_the_project_exports_folder_by_default(monkeypatch):
    for name in ("RANKSCOPE_SHARE", "RANKSCOPE_WORKSPACE", "RANKSCOPE_ALLOWED_ROOTS"):
        monkeypatch.delenv(name, raising=False)
    policy = PathPolicy.from_environment()
    assert not policy.shared and policy.workspace == PROJECT_ROOT / "exports"


def test_environment_configures_share_mode(monkeypatch, roots):
    monkeypatch.setenv("RANKSCOPE_SHARE", "1")
    monkeypatch.setenv("RANKSCOPE_WORKSPACE", str(roots["workspace"]))
    monkeypatch.setenv("RANKSCOPE_ALLOWED_ROOTS", os.pathsep.join([str(roots["allowed"]), "", str(roots["outside"])]))
    policy = PathPolicy.from_environment()
    assert policy.shared and policy.workspace == roots["workspace"].resolve()
    assert policy.allowed_roots == (roots["allowed"].resolve(), roots["outside"].resolve())


def test_share_mode_reads_the_registry_the_books_and_paths_inside_the_roots(roots):
    policy = shared(roots)
    assert policy.model_reference("smollm2-135m") == "smollm2-135m"
    assert policy.text_source("war-and-peace") == "war-and-peace"
    assert policy.model_reference(str(roots["allowed"] / "model")) == str((roots["allowed"] / "model").resolve())
    assert policy.text_source(str(roots["allowed"] / "book.txt")) == str((roots["allowed"] / "book.txt").resolve())
    assert policy.text_source(str(roots["workspace"] / "later.txt")) == str((roots["workspace"] / "later.txt").resolve())
    assert policy.model_reference(str(roots["cache"] / "models" / "x")) == str((roots["cache"] / "models" / "x").resolve())


def test_share_mode_refuses_paths_outside_the_roots_alike_whether_they_exist_or_not(roots):
    policy = shared(roots)
    outside = roots["outside"]
    existing = refusal(lambda: policy.model_reference(str(outside / "model")))
    missing = refusal(lambda: policy.model_reference(str(outside / "no-such-model")))
    assert existing == missing
    assert str(roots["allowed"].resolve()) in existing and str(roots["workspace"].resolve()) in existing
    assert "outside" not in existing.replace(str(roots["allowed"].resolve()), "")
    assert refusal(lambda: policy.text_source(str(outside / "secret.txt"))) == \
        refusal(lambda: policy.text_source(str(outside / "missing.txt"))) == \
        refusal(lambda: policy.text_source("/etc/passwd.txt"))
    # a hub id or hub dataset would fetch from the network: not a registry name, not inside a root
    assert refusal(lambda: policy.model_reference("org/some-hub-model")) == existing
    refusal(lambda: policy.text_source("hf:some/dataset:train"))


def test_share_mode_refuses_dot_dot_and_symlink_escapes(roots):
    policy = shared(roots)
    allowed, workspace, outside = roots["allowed"], roots["workspace"], roots["outside"]
    (allowed / "link-to-model").symlink_to(outside / "model", target_is_directory=True)
    (allowed / "link.txt").symlink_to(outside / "secret.txt")
    (workspace / "link-out").symlink_to(outside, target_is_directory=True)
    message = refusal(lambda: policy.model_reference(str(outside / "model")))
    assert refusal(lambda: policy.model_reference(str(allowed / ".." / "outside" / "model"))) == message
    assert refusal(lambda: policy.model_reference(str(allowed / "link-to-model"))) == message
    text_message = refusal(lambda: policy.text_source(str(outside / "secret.txt")))
    assert refusal(lambda: policy.text_source(str(allowed / "link.txt"))) == text_message
    assert refusal(lambda: policy.text_source(str(allowed / ".." / "outside" / "secret.txt"))) == text_message
    export_message = refusal(lambda: policy.export_directory(str(outside / "export")))
    assert refusal(lambda: policy.export_directory(str(workspace / ".." / "etc"))) == export_message
    assert refusal(lambda: policy.export_directory(str(workspace / "link-out" / "export"))) == export_message
    assert refusal(lambda: policy.export_directory("../escape")) == export_message
    assert str(workspace.resolve()) in export_message


def test_share_mode_writes_only_below_the_workspace(roots):
    policy = shared(roots)
    workspace = roots["workspace"].resolve()
    assert policy.export_directory(str(workspace / "run-1")) == workspace / "run-1"
    assert policy.export_directory("run-2") == workspace / "run-2"  # a relative name is taken inside it
    assert policy.export_directory(str(workspace / "a" / ".." / "run-3")) == workspace / "run-3"
    message = refusal(lambda: policy.export_directory(str(roots["outside"] / "new")))
    assert refusal(lambda: policy.export_directory(str(workspace))) == message  # never the workspace itself
    assert refusal(lambda: policy.export_directory(str(roots["allowed"] / "new"))) == message  # readable, not writable


# -- make app -----------------------------------------------------------------------------------------------------

def make_app(*arguments: str, **environment: str) -> subprocess.CompletedProcess:
    """`make -n app ...` (prints the recipe, runs nothing) with the sharing variables only from `environment`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKSCOPE_") and k not in ("SHARE", "MAKEFLAGS")}
    return subprocess.run(["make", "-n", "app", *arguments], cwd=PROJECT_ROOT, env={**env, **environment},
                          capture_output=True, text=True, timeout=60)


def streamlit_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if "streamlit run" in line)


def test_make_app_binds_to_localhost_unless_sharing_is_asked_for():
    line = streamlit_line(make_app())
    assert "--server.address 127.0.0.1" in line and "0.0.0.0" not in line
    assert "RANKSCOPE_SHARE=0" in line
    assert "--server.address 127.0.0.1" in streamlit_line(make_app(RANKSCOPE_SECRET="team-secret-123"))
    for shared_run in (make_app("SHARE=1", RANKSCOPE_SECRET="team-secret-123"), make_app(RANKSCOPE_SHARE="1", RANKSCOPE_SECRET="team-secret-123")):
        line = streamlit_line(shared_run)
        assert "--server.address 0.0.0.0" in line and "RANKSCOPE_SHARE=1" in line
        assert "team-secret-123" not in line  # the secret stays in the environment, off the command line


def test_make_app_refuses_to_share_without_a_secret():
    result = make_app("SHARE=1")
    assert result.returncode != 0 and "streamlit run" not in result.stdout
    assert "RANKSCOPE_SECRET" in result.stderr
