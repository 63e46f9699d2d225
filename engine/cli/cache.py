"""`rankscope cache ...`: what the cache holds, with each artifact's size on disk, and deleting one."""

from __future__ import annotations

from typing import List, Optional

import typer

from engine.cli import app, echo_json, fail
from engine.cli.options import JsonOption
from engine.errors import RankScopeError

cache_app = typer.Typer(no_args_is_help=True,
                        help="What the cache holds (each artifact's size on disk), and deleting artifacts.")
app.add_typer(cache_app, name="cache")


def _row(artifact) -> dict:
    return {"id": artifact.artifact_id, "kind": artifact.kind, "description": artifact.description,
            "model": artifact.model, "model_fingerprint": artifact.model_fingerprint, "texts": artifact.texts,
            "bytes": artifact.n_bytes, "rows": artifact.rows, "created_at": artifact.created_at,
            "files": list(artifact.files), "deletable": artifact.deletable, "on_delete": artifact.on_delete}


@cache_app.command("list")
def list_artifacts(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Only the artifacts of this model: its id as listed, or a fingerprint prefix."),
    kind: Optional[List[str]] = typer.Option(None, "--kind", help="Only artifacts of this kind (repeatable)."),
    as_json: bool = JsonOption,
):
    """Every cached artifact with its kind, model, texts, size on disk and age, and the total."""
    from engine.store import open_store
    from engine.store.cache_inventory import ARTIFACT_KINDS, cached_artifacts, human_bytes

    unknown = sorted(set(kind or ()) - set(ARTIFACT_KINDS))
    if unknown:
        fail(RankScopeError(f"Unknown kind(s) {', '.join(unknown)}; kinds: {', '.join(ARTIFACT_KINDS)}."))
    try:
        artifacts = cached_artifacts(open_store())
    except RankScopeError as exc:
        fail(exc)
    if model:
        artifacts = [a for a in artifacts if a.model == model or (a.model_fingerprint or "").startswith(model)]
    if kind:
        artifacts = [a for a in artifacts if a.kind in kind]
    total = sum(a.n_bytes for a in artifacts)
    if as_json:
        echo_json({"artifacts": [_row(a) for a in artifacts], "total_bytes": total})
        return
    for a in artifacts:
        made = str(a.created_at)[:19] if a.created_at else "-"
        typer.echo(f"{a.artifact_id}  {human_bytes(a.n_bytes):>10}  {made:19}  {a.model or '-'}  "
                   f"{a.texts or '-'}  {a.description}{'' if a.deletable else '  [kept]'}")
    typer.echo(f"{len(artifacts)} artifact(s), {human_bytes(total)} on disk. Delete one with `rankscope cache forget ID` "
               "(a unique start of the id is enough).")


@cache_app.command("forget")
def forget(
    artifact_ids: List[str] = typer.Argument(..., metavar="ID...",
                                             help="Artifact ids (or unique starts) from `rankscope cache list`."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
    as_json: bool = JsonOption,
):
    """Delete cached artifacts (their rows and files), after saying what each one costs."""
    from engine.store import open_store
    from engine.store.cache_inventory import find_artifact, forget_artifact, human_bytes

    try:
        store = open_store()
        chosen = [find_artifact(store, artifact_id) for artifact_id in artifact_ids]
        kept = [a for a in chosen if not a.deletable]
        if kept:
            raise RankScopeError(f"{kept[0].artifact_id} ({kept[0].description}) is not deleted here. {kept[0].on_delete}")
        if not yes:
            for a in chosen:
                typer.echo(f"{a.artifact_id} ({a.description}, {human_bytes(a.n_bytes)}): {a.on_delete}", err=True)
            if not typer.confirm(f"Delete {len(chosen)} artifact(s)?", err=True):
                raise typer.Exit(code=1)
        reports = [forget_artifact(store, a.artifact_id) for a in chosen]
    except RankScopeError as exc:
        fail(exc)
    freed = sum(r.bytes_freed for r in reports)
    if as_json:
        echo_json({"deleted": [{"id": r.artifact.artifact_id, "rows": r.rows_deleted, "files": list(r.files_deleted),
                                "bytes": r.bytes_freed} for r in reports], "bytes_freed": freed})
        return
    for r in reports:
        typer.echo(f"Deleted {r.artifact.artifact_id}: {r.rows_deleted} row(s), {len(r.files_deleted)} file(s), "
                   f"{human_bytes(r.bytes_freed)}.")
    typer.echo(f"Freed {human_bytes(freed)}.")
