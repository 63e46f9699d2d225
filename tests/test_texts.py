"""Texts: built-in book extraction, local corpus formats, token windows and text fingerprints."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from engine.errors import CorpusError, RankScopeError
from engine.texts.corpus import BUILTIN_BOOKS, Corpus, builtin_book_path, load_corpus, text_fingerprint
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing, make_windows, tokenizer_adds_bos
from tests.tiny_models import TRAINING_TEXT

RECORDS = ["The first record.", "A second one, longer than the first.", "", "Third and last."]


def test_sherlock_holmes_is_cut_at_its_gutenberg_markers(isolated_cache):
    path = builtin_book_path("sherlock-holmes")
    assert path == isolated_cache / "texts" / "sherlock-holmes.txt"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("(Additional editing by Jose Menendez)")
    assert text.rstrip().endswith("where I believe that she has met with considerable success.")
    assert "THE ADVENTURES OF\nSHERLOCK HOLMES" in text[:200]
    assert "*** START" not in text and "*** END" not in text
    assert "Project Gutenberg-tm" not in text and "Welcome To The World of Free Plain Vanilla" not in text
    assert 500_000 < len(text) < 600_000


@pytest.mark.parametrize("name", sorted(BUILTIN_BOOKS))
def test_every_builtin_book_is_extracted_without_markers(name):
    corpus_text = builtin_book_path(name).read_text(encoding="utf-8")
    assert len(corpus_text) > 100_000
    assert "*** START" not in corpus_text and "*** END" not in corpus_text
    assert "GUTENBERG EBOOK" not in corpus_text


def test_builtin_books_are_distinct_and_unknown_names_fail():
    texts = {name: builtin_book_path(name).read_text(encoding="utf-8")[:1000] for name in BUILTIN_BOOKS}
    assert len(set(texts.values())) == len(BUILTIN_BOOKS)
    with pytest.raises(CorpusError, match="sherlock-holmes"):
        builtin_book_path("moby-dick")


def test_load_builtin_corpus_by_name():
    corpus = load_corpus("sherlock-holmes")
    assert corpus.name == "sherlock-holmes"
    assert corpus.text.startswith("(Additional editing")
    assert corpus.fingerprint == text_fingerprint("sherlock-holmes")


def test_load_local_txt(sample_text_file):
    corpus = load_corpus(str(sample_text_file))
    assert corpus.text == sample_text_file.read_text()
    assert corpus.name == "sample"
    assert corpus.n_chars == len(TRAINING_TEXT) * 4


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps({"text": r, "body": r.upper(), "n": i}) for i, r in enumerate(records)) + "\n")
    return path


def test_load_jsonl_default_and_custom_field(tmp_path):
    path = _write_jsonl(tmp_path / "records.jsonl", RECORDS)
    expected = "\n\n".join(r for r in RECORDS if r)
    assert load_corpus(str(path)).text == expected
    assert load_corpus(str(path), field="body").text == expected.upper()
    assert text_fingerprint(str(path)) != text_fingerprint(str(path), field="body")
    with pytest.raises(CorpusError, match="no column 'content'.*text, body, n"):
        load_corpus(str(path), field="content")


def test_load_parquet(tmp_path):
    path = tmp_path / "records.parquet"
    pd.DataFrame({"text": RECORDS, "story": [r[::-1] for r in RECORDS]}).to_parquet(path)
    assert load_corpus(str(path)).text == "\n\n".join(r for r in RECORDS if r)
    assert load_corpus(str(path), field="story").text == "\n\n".join(r[::-1] for r in RECORDS if r)


def test_missing_and_unsupported_files_raise_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="neither a built-in text"):
        load_corpus(str(tmp_path / "absent.txt"))
    csv = tmp_path / "table.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(CorpusError, match=r"Unsupported text file type '\.csv'"):
        load_corpus(str(csv))
    with pytest.raises(CorpusError, match=r"Unsupported"):
        text_fingerprint(str(csv))


BINARY = bytes(range(128, 256)) * 8 + bytes(range(0, 128)) * 8  # not UTF-8 from its first byte


UNREADABLE_TEXTS = [  # (file name, content, what the error says)
    ("random.txt", BINARY, r"the file is not UTF-8 text: the byte at offset 0 \(line 1\) is 0x80"),
    ("latin1.txt", "First line.\nUn café crème.\n".encode("latin-1"), r"offset 18 \(line 2\) is 0xe9"),
    ("utf16.txt", "Plain words.".encode("utf-16-le"), r"NUL bytes \(the first at offset 1, line 1\)"),
    ("not.parquet", b"text\nhello\n" * 20, "the file is not a Parquet file: a Parquet file starts and ends with"),
    ("empty.parquet", b"", "not a Parquet file.*this one is empty"),
    ("random.parquet", BINARY, "not a Parquet file"),
    ("bad.jsonl", b'{"text": "fine"}\n\n{"text": "also fine"}\n{"text": unquoted}\n',
     r"line 4 is not JSON \(Expecting value"),
    ("scalar.jsonl", b'{"text": "fine"}\n"just a string"\n', "line 2 is a JSON str, not an object"),
    ("random.jsonl", BINARY, "the file is not UTF-8 text: line 1 has byte 0x80 at column 1"),
]


@pytest.mark.parametrize("name,content,words", UNREADABLE_TEXTS, ids=[case[0] for case in UNREADABLE_TEXTS])
def test_unreadable_text_files_say_what_is_wrong(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=f"Could not read text '{re.escape(str(path))}': .*{words}") as info:
        load_corpus(str(path))
    assert "An error occurred while generating the dataset" not in str(info.value)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_the_utf8_check_finds_the_first_bad_byte_across_read_chunks(tmp_path, monkeypatch, chunk):
    from engine.texts import corpus

    monkeypatch.setattr(corpus, "_CHUNK", chunk)
    good = "Ünïcödé wörds ✓ 🙂\n".encode() * 3
    path = tmp_path / "text.txt"
    path.write_bytes(good)
    assert corpus._utf8_problem(path) is None  # characters split between reads are not errors
    path.write_bytes(good + "é".encode()[:1] + b"x")  # a lead byte without its continuation
    assert f"offset {len(good):,} (line 4) is 0xc3" in corpus._utf8_problem(path)
    path.write_bytes(good + "é".encode()[:1])  # cut at the end of the file
    assert f"offset {len(good):,} (line 4)" in corpus._utf8_problem(path)
    path.write_bytes(good + b"\0")
    assert f"NUL bytes (the first at offset {len(good):,}, line 4)" in corpus._utf8_problem(path)


def test_empty_text_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(str(path))


def test_text_fingerprint_follows_content_not_name(tmp_path, sample_text_file):
    before = text_fingerprint(str(sample_text_file))
    same_content = tmp_path / "other-name.txt"
    same_content.write_text(sample_text_file.read_text())
    assert text_fingerprint(str(same_content)) == before

    sample_text_file.write_text(sample_text_file.read_text() + "One more sentence.")
    after = text_fingerprint(str(sample_text_file))
    assert after != before
    reloaded = load_corpus(str(sample_text_file))  # no stale text from the datasets cache
    assert reloaded.fingerprint == after
    assert reloaded.text.endswith("One more sentence.")


def _corpus(text: str = TRAINING_TEXT * 4) -> Corpus:
    return Corpus("sample", "sample", text, "fp")


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dirs):
    return {family: AutoTokenizer.from_pretrained(tiny_model_dirs[family]) for family in ("llama", "gemma3")}


def test_windows_without_bos_follow_the_text(tokenizers):
    tokenizer = tokenizers["llama"]
    assert not tokenizer_adds_bos(tokenizer)
    windows = make_windows(_corpus(), tokenizer, Windowing(16, 5))
    assert windows.shape == (5, 16) and windows.dtype == torch.int64
    assert not (windows == tokenizer.bos_token_id).any()
    ids = tokenizer(TRAINING_TEXT * 4, add_special_tokens=False)["input_ids"]
    assert windows.flatten().tolist() == ids[:80]


def test_windows_with_bos_start_with_it(tokenizers):
    tokenizer = tokenizers["gemma3"]
    assert tokenizer_adds_bos(tokenizer)
    windows = make_windows(_corpus(), tokenizer, Windowing(16, 5))
    assert windows.shape == (5, 16) and windows.dtype == torch.int64
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert not (windows[:, 1:] == tokenizer.bos_token_id).any()
    ids = tokenizer(TRAINING_TEXT * 4, add_special_tokens=False)["input_ids"]
    assert windows[:, 1:].flatten().tolist() == ids[: 5 * 15]


def test_all_windows_when_count_is_open(tokenizers):
    tokenizer = tokenizers["llama"]
    n_ids = len(tokenizer(TRAINING_TEXT, add_special_tokens=False)["input_ids"])
    windows = make_windows(_corpus(TRAINING_TEXT), tokenizer, Windowing(32, None))
    assert windows.shape == (n_ids // 32, 32)


def test_too_short_text_names_the_available_windows(tokenizers):
    tokenizer = tokenizers["llama"]
    text = TRAINING_TEXT[:400]
    n_ids = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    available = n_ids // 16
    assert available >= 1
    make_windows(_corpus(text), tokenizer, Windowing(16, available))  # exactly enough is fine
    with pytest.raises(CorpusError) as info:
        make_windows(_corpus(text), tokenizer, Windowing(16, available + 1))
    message = str(info.value)
    assert f"{n_ids} tokens" in message
    assert f"enough for {available} windows of 16" in message
    assert f"{available + 1} were requested" in message


def test_text_shorter_than_one_window_is_rejected(tokenizers):
    with pytest.raises(CorpusError, match="enough for 0 windows"):
        make_windows(_corpus("Too short."), tokenizers["gemma3"], Windowing(64, None))


@pytest.mark.parametrize("window_len, n_windows", [(1, 4), (16, 0), (0, None)])
def test_invalid_windowing_is_rejected(window_len, n_windows):
    with pytest.raises(CorpusError):
        Windowing(window_len, n_windows)


# -- TextSettings -------------------------------------------------------------------------------

CUSTOM_SETTINGS = TextSettings("calib.txt", Windowing(64, None), 4, "eval.jsonl", Windowing(128, 8))


def test_text_settings_defaults_are_the_engines():
    """The defaults: 128 x 512 tokens of War and Peace in 32 groups, 16 x 512 tokens of Sherlock Holmes."""
    settings = TextSettings()
    assert settings.calibration_text == "war-and-peace" and settings.evaluation_text == "sherlock-holmes"
    assert settings.calibration_windowing == Windowing(512, 128) and settings.n_groups == 32
    assert settings.evaluation_windowing == Windowing(512, 16)
    assert settings.to_dict() == {
        "version": 1,
        "calibration": {"text": "war-and-peace", "window_len": 512, "n_windows": 128, "n_groups": 32},
        "evaluation": {"text": "sherlock-holmes", "window_len": 512, "n_windows": 16},
    }


@pytest.mark.parametrize("settings", [TextSettings(), CUSTOM_SETTINGS], ids=["default", "custom"])
def test_text_settings_round_trip_through_json(settings):
    """to_dict -> JSON -> from_dict gives the same settings, open window counts included."""
    restored = TextSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert restored == settings
    assert restored.to_dict() == settings.to_dict()


def test_custom_text_settings_keep_two_window_lengths():
    """Calibration and evaluation keep their own window length and count through a round trip."""
    restored = TextSettings.from_dict(json.loads(json.dumps(CUSTOM_SETTINGS.to_dict())))
    assert restored.calibration_windowing.window_len == 64 and restored.calibration_windowing.n_windows is None
    assert restored.evaluation_windowing.window_len == 128 and restored.evaluation_windowing.n_windows == 8
    assert restored.n_groups == 4 and restored.calibration_text == "calib.txt"


@pytest.mark.parametrize("data", [None, {}])
def test_empty_text_settings_are_the_defaults(data):
    """No stored settings (None or {}) read as the engine defaults."""
    assert TextSettings.from_dict(data) == TextSettings()


def test_release_0_1_0_flat_text_settings_are_read():
    """RankScope 0.1.0's flat study settings load, with one window length for both texts."""
    flat = {"calibration_text": "calib.txt", "calibration_windows": 24, "evaluation_text": "eval.txt",
            "evaluation_windows": 6, "window_len": 96, "groups": 3}
    settings = TextSettings.from_dict(flat)
    assert settings == TextSettings("calib.txt", Windowing(96, 24), 3, "eval.txt", Windowing(96, 6))
    assert TextSettings.from_dict({"window_len": 64}) == TextSettings.of(window_len=64)


@pytest.mark.parametrize("data, message", [
    ({"version": 2}, r"version 2.*versions 1 to 1"),
    ({"version": 0}, r"version 0"),
    ({"version": True}, r"version True"),
    ({"calibration_text": "x", "window": 3}, r"Unknown text setting\(s\): window; RankScope 0.1.0's form allows"),
    ({"version": 1, "calibration": {"n_window": 8}}, r"Unknown calibration setting\(s\): n_window; allowed"),
    ({"version": 1, "calibration": {"n_groups": True}}, r"at least 1 group.*got True"),
    ({"version": "1"}, r"version '1'"),
    ({"version": 1, "calibration": {}, "windows": 8}, r"Unknown text setting\(s\): windows; allowed: version"),
    ({"version": 1, "calibration": {"n_groups": 0}}, r"at least 1 group.*got 0"),
    ({"version": 1, "evaluation": {"window_len": 1}}, r"Window length must be at least 2"),
    ({"version": 1, "calibration": "war-and-peace"}, r"Malformed text settings"),
    (["war-and-peace"], r"must be a JSON object, got list"),
    ("war-and-peace", r"must be a JSON object, got str"),
])
def test_bad_text_settings_are_refused_with_a_reason(data, message):
    """A newer version, unknown keys, bad values and non-objects are refused with a message saying why."""
    with pytest.raises(RankScopeError, match=message):
        TextSettings.from_dict(data)


def test_text_settings_of_uses_one_window_length():
    """`of` gives both texts the one window length, as the CLI and the app ask for it."""
    settings = TextSettings.of("calib.txt", 10, "eval.txt", None, window_len=48, groups=5)
    assert settings == TextSettings("calib.txt", Windowing(48, 10), 5, "eval.txt", Windowing(48, None))
    assert TextSettings.of() == TextSettings()


def test_with_sections_takes_a_plans_sections():
    """A plan's sections replace the settings' own (an extra text_fingerprint is ignored)."""
    base = TextSettings.of("base-calib.txt", 10, "base-eval.txt", 4, window_len=48, groups=5)
    calibration = {**CUSTOM_SETTINGS.calibration_dict(), "text_fingerprint": "abc"}
    evaluation = {**CUSTOM_SETTINGS.evaluation_dict(), "text_fingerprint": "def"}
    assert base.with_sections(calibration=calibration, evaluation=evaluation) == CUSTOM_SETTINGS

    only_calibration = base.with_sections(calibration=calibration)
    assert only_calibration.calibration_windowing == Windowing(64, None) and only_calibration.n_groups == 4
    assert only_calibration.calibration_text == "calib.txt"
    assert only_calibration.evaluation_text == "base-eval.txt"
    assert only_calibration.evaluation_windowing == Windowing(48, 4)

    only_evaluation = base.with_sections(evaluation=evaluation)
    assert only_evaluation.evaluation_text == "eval.jsonl"
    assert only_evaluation.evaluation_windowing == Windowing(128, 8)
    assert only_evaluation.calibration_text == "base-calib.txt"
    assert only_evaluation.calibration_windowing == Windowing(48, 10) and only_evaluation.n_groups == 5
    assert base.with_sections() == base


def test_with_sections_keeps_what_a_section_lacks():
    """A plan section missing a key keeps the settings' own value, not the engine default."""
    base = TextSettings.of("base-calib.txt", 10, "base-eval.txt", 4, window_len=48, groups=5)
    partial = base.with_sections(calibration={"text": "c.txt"}, evaluation={"n_windows": 2})
    assert partial == TextSettings("c.txt", Windowing(48, 10), 5, "base-eval.txt", Windowing(48, 2))
