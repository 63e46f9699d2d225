"""An lm-evaluation-harness task made from a local text, so exported models run under `lm-eval` with no hub access.

`write_task(corpus_text, out_dir, name)` cuts the text into documents of about `words` words (whole
paragraphs where they fit) and writes `out_dir/<name>.jsonl` and `out_dir/<name>.yaml`: a
`loglikelihood_rolling` task over the `json` loader, which lm-eval scores with its built-in
word perplexity, byte perplexity and bits per byte, the way its `wikitext` task does. Run it with

    lm_eval --model hf --model_args pretrained=EXPORT_DIR,trust_remote_code=True \\
        --include_path OUT_DIR --tasks NAME --device cpu --batch_size 1

(`trust_remote_code` loads the export's bundled `modeling_rankscope.py`; a `--dense` export needs none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine.errors import RankScopeError

TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def documents(text: str, words: int, count: int) -> list[str]:
    """Up to `count` documents of about `words` words each: paragraphs joined until the next would pass `words`
    (a paragraph longer than that is cut at word boundaries)."""
    if words < 1 or count < 1:
        raise RankScopeError(f"A task needs at least one document of at least one word; got {count} of {words}.")
    pieces: list[str] = []
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        tokens = paragraph.split()
        pieces += [" ".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]
    out, current = [], []
    for piece in pieces:
        if current and sum(len(p.split()) for p in current) + len(piece.split()) > words:
            out.append("\n\n".join(current))
            current = []
            if len(out) == count:
                return out
        current.append(piece)
    if current and len(out) < count:
        out.append("\n\n".join(current))
    return out


def write_task(text: str, out_dir: Path, name: str, words: int = 400, count: int = 20) -> Path:
    """Write the task's documents and YAML under `out_dir`; returns the YAML path."""
    if not TASK_NAME.match(name):
        raise RankScopeError(f"Task names are letters, digits and underscores, starting with a letter; got '{name}'.")
    docs = documents(text, words, count)
    if not docs:
        raise RankScopeError("The text has no words to make documents from.")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = out_dir / f"{name}.yaml"
    spec.write_text("\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "output_type: loglikelihood_rolling",
        "test_split: test",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ]))
    return spec
