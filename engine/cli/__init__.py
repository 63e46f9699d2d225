"""The `rankscope` command line.

Every command takes `--model` (default: the embedded SmolLM2-135M), shows progress bars on stderr,
and prints errors as one readable message (exit code 2) rather than a traceback. Commands that
produce data take `--json` for machine-readable output on stdout. Options shared by several
commands (texts, windows, method, `--json`) are declared once in `options`. The commands:

| module | commands |
|---|---|
| `analysis` | `prepare`, `models`, `calibrate`, `spectra` |
| `compression` | `compress`, `evaluate`, `sweep` |
| `export` | `export` |
| `lm_eval` | `lm-eval-task` |
| `recovery` | `recover` |
| `search` | `search start`, `search resume`, `search status`, `search best`, `search export-plan`, `search restore` |
| `cache` | `cache list`, `cache forget` |

`--cache DIR` (before the command) points every command at another cache folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from engine.errors import RankScopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RankScope: low-rank compression workbench for causal LMs.")

ModelOption = typer.Option("smollm2-135m", "--model", "-m", help="Registry name, model directory, .gguf file or hub id.")


@app.callback()
def _main(
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder (default: $RANKSCOPE_CACHE or ./cache)."),
):
    from engine.paths import choose_cache_root

    if cache is not None:
        choose_cache_root(cache)


def fail(exc: RankScopeError) -> None:
    """Print a user error without a traceback and exit with code 2."""
    typer.secho(f"Error: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def echo_json(value) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


from engine.cli import analysis, cache, compression, export, lm_eval, recovery, search  # noqa: E402,F401  (registers the commands)
