"""The `rankscope lm-eval-task` command: an lm-evaluation-harness task from a local text (engine.texts.lm_eval_task)."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.cli import app, echo_json, fail
from engine.cli.options import JsonOption
from engine.errors import RankScopeError

_HELP = "\n\n".join([
    "Write an lm-evaluation-harness task made from a local text, so an exported model runs under lm-eval with no "
    "hub access: a loglikelihood_rolling task (word perplexity, byte perplexity, bits per byte, as lm-eval's "
    "wikitext) over documents of about --words words cut from the text.",
    "Then: lm_eval --model hf --model_args pretrained=EXPORT_DIR,trust_remote_code=True --include_path OUT "
    "--tasks NAME --device cpu --batch_size 1",
])


@app.command("lm-eval-task", help=_HELP)
def lm_eval_task(
    text: str = typer.Option("sherlock-holmes", "--text", help="Built-in text name, or a .txt/.jsonl/.parquet file."),
    out: Path = typer.Option(..., "--out", help="Folder for the task (its YAML and documents)."),
    name: str = typer.Option("rankscope_text", "--name", help="Task name (letters, digits, underscores)."),
    words: int = typer.Option(400, "--words", help="About this many words per document."),
    documents: int = typer.Option(20, "--documents", help="How many documents (from the start of the text)."),
    as_json: bool = JsonOption,
):
    from engine.texts.corpus import load_corpus
    from engine.texts.lm_eval_task import write_task

    try:
        spec = write_task(load_corpus(text).text, out, name, words, documents)
    except RankScopeError as exc:
        fail(exc)
    command = (f"lm_eval --model hf --model_args pretrained=EXPORT_DIR,trust_remote_code=True --include_path {out} "
               f"--tasks {name} --device cpu --batch_size 1")
    if as_json:
        echo_json({"task": name, "yaml": str(spec), "command": command})
    else:
        typer.echo(f"Wrote {spec}. Run:\n  {command}")
