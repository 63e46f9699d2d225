"""The `rankscope` command line on tiny models: help, JSON output, caching and readable errors."""

from __future__ import annotations

import json
import os
import re

import pytest
import typer.main
from typer.testing import CliRunner

from engine.cli import app
from engine.cli.options import TextOptions
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.test_models import CORRUPT_MODELS, make_corrupt_model

COMMANDS = ("prepare", "models", "calibrate", "spectra")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _json(result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_top_level_help_lists_every_command(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_every_registered_command_has_working_help(runner):
    registered = sorted(typer.main.get_command(app).commands)
    assert set(COMMANDS) <= set(registered)
    for command in registered:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.stdout, command
        if command in COMMANDS:
            assert "--model" in result.stdout, command


def test_spectra_json_then_from_cache(runner, tiny_model_dirs, sample_text_file):
    args = [
        "spectra", "--model", str(tiny_model_dirs["llama"]), "--windows", "4", "--window-len", "16",
        "--groups", "2", "--text", str(sample_text_file), "--json",
    ]
    first = _json(runner.invoke(app, args))
    assert first["from_cache"] is False
    assert first["windows"] == 4 and first["window_len"] == 16 and first["covariance"] == "pooled"
    matrices = first["matrices"]
    assert len(matrices) == 2 * 7
    assert [(m["layer"], m["type"]) for m in matrices] == [
        (layer, t) for layer in range(2) for t in ("q", "k", "v", "o", "gate", "up", "down")
    ]
    for matrix in matrices:
        assert set(matrix["weight_rank"]) == {"0.8", "0.9", "0.95", "0.99"}
        assert 1 <= matrix["weight_rank"]["0.8"] <= matrix["weight_rank"]["0.99"] <= matrix["full_rank"]
        assert 1 <= matrix["feature_rank"]["0.8"] <= matrix["feature_rank"]["0.99"] <= matrix["full_rank"]
    assert {row["type"] for row in first["summary_by_type"]["0.9"]} == {"q", "k", "v", "o", "gate", "up", "down"}

    second = _json(runner.invoke(app, args))
    assert second["from_cache"] is True
    assert second["calibration_id"] == first["calibration_id"]
    assert second["matrices"] == matrices

    calibrate = _json(runner.invoke(app, ["calibrate", *args[1:-1], "--json"]))
    assert calibrate["from_cache"] is True and calibrate["calibration_id"] == first["calibration_id"]
    assert calibrate["tokens"] == 64 and calibrate["sites"] == 2 * 4


def test_spectra_text_output(runner, tiny_model_dirs, sample_text_file):
    args = [
        "spectra", "--model", str(tiny_model_dirs["qwen2"]), "--windows", "2", "--window-len", "16",
        "--groups", "1", "--text", str(sample_text_file), "--covariance", "sample", "--energy", "0.9",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "computed" in result.stdout and "sample covariance" in result.stdout
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[0] for line in lines if line and line[0] in {"q", "k", "v", "o", "gate", "up", "down"}] == [
        "q", "k", "v", "o", "gate", "up", "down"
    ]


def test_models_eval_gives_a_perplexity(runner, tiny_model_dirs, sample_text_file):
    args = [
        "models", "--model", str(tiny_model_dirs["gemma3"]), "--eval", "--text", str(sample_text_file),
        "--windows", "2", "--window-len", "16", "--json",
    ]
    [entry] = _json(runner.invoke(app, args))
    assert entry["status"] == "ready" and entry["architecture"] == "gemma3_text"
    assert entry["layers"] == 2 and entry["hidden_size"] == 32
    assert entry["parameters"] == sum(entry["parameters_by_group"].values())
    evaluation = entry["evaluation"]
    assert evaluation["windows"] == 2 and evaluation["window_len"] == 16
    assert evaluation["predicted_tokens"] == 2 * 15
    assert 50 < evaluation["perplexity"] < 2000


@pytest.mark.parametrize("command", ["models", "spectra", "calibrate", "prepare"])
def test_bad_model_path_is_a_readable_error(runner, command):
    result = runner.invoke(app, [command, "--model", "/nonexistent/model-dir"])
    assert result.exit_code == 2
    assert "Error: No model found for '/nonexistent/model-dir'" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["models", "prepare", "compress"])
@pytest.mark.parametrize("kind", CORRUPT_MODELS)
def test_unreadable_model_files_are_one_error_line(runner, tiny_model_dirs, sample_text_file, tmp_path, kind, command):
    reference, damaged = make_corrupt_model(kind, tiny_model_dirs["llama"], tmp_path / "models")
    text = str(sample_text_file)
    extra = {"compress": ["--uniform", "0.2", "--calibration-text", text, "--eval-text", text, "--window-len", "16",
                          "--calibration-windows", "2", "--eval-windows", "2", "--groups", "1"]}.get(command, [])
    result = runner.invoke(app, [command, "--model", str(reference), *extra])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "Error:" in line]
    assert len(errors) == 1 and str(damaged) in errors[0] and CORRUPT_MODELS[kind][1] in errors[0], result.stderr


@pytest.mark.parametrize("name,content,words", [
    ("binary.txt", bytes(range(256)) * 4, "not UTF-8 text"),
    ("table.parquet", b"not parquet\n" * 8, "not a Parquet file"),
    ("records.jsonl", b'{"text": "ok"}\n{text}\n', "line 2 is not JSON"),
], ids=["txt", "parquet", "jsonl"])
def test_unreadable_text_files_are_one_error_line(runner, tiny_model_dirs, tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    result = runner.invoke(app, ["calibrate", "--model", str(tiny_model_dirs["llama"]), "--text", str(path),
                                 "--windows", "2", "--window-len", "16", "--groups", "1"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"Error: Could not read text '{path}': " in result.stderr and words in result.stderr
    assert "Traceback" not in result.output and "An error occurred" not in result.output


def test_unsupported_architecture_is_a_readable_error(runner, tiny_model_dirs):
    result = runner.invoke(app, ["models", "--model", str(tiny_model_dirs["gpt2"])])
    assert result.exit_code == 2
    assert "Error: Model type 'gpt2' is not supported" in result.output
    assert "Traceback" not in result.output


def test_bad_covariance_and_energy_are_refused(runner, tiny_model_dirs):
    model = str(tiny_model_dirs["llama"])
    result = runner.invoke(app, ["spectra", "--model", model, "--covariance", "banana"])
    assert result.exit_code == 2
    assert "Error: --covariance must be one of pooled, sample, got 'banana'" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["spectra", "--model", model, "--energy", "1.5"])
    assert result.exit_code == 2
    assert "Error: --energy levels must be in (0, 1]" in result.output


def test_too_many_groups_is_a_readable_error(runner, tiny_model_dirs, sample_text_file):
    args = [
        "calibrate", "--model", str(tiny_model_dirs["llama"]), "--windows", "2", "--window-len", "16",
        "--groups", "3", "--text", str(sample_text_file),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "Error:" in result.output and "3 groups" in result.output
    assert "Traceback" not in result.output


# -- shared options (engine.cli.options) -------------------------------------------------------

TEXT_FLAGS = {  # flag -> the engine default its help must show
    "--calibration-text": "war-and-peace",
    "--calibration-windows": "128",
    "--eval-text": "sherlock-holmes",
    "--eval-windows": "16",
    "--window-len": "512",
    "--groups": "32",
}


def test_text_options_without_options_are_the_engine_defaults():
    """No option given: the engine's TextSettings, and nothing listed as given."""
    assert TextOptions().settings() == TextSettings()
    assert TextOptions().given() == {}


def test_text_options_change_only_what_was_given():
    """--window-len sets both windowings' length; --eval-text the evaluation text; nothing else moves."""
    options = TextOptions(window_len=64, eval_text="x.txt")
    assert options.given() == {"window_len": 64, "eval_text": "x.txt"}
    default = TextSettings()
    assert options.settings() == TextSettings(
        default.calibration_text, Windowing(64, default.calibration_windowing.n_windows), default.n_groups,
        "x.txt", Windowing(64, default.evaluation_windowing.n_windows),
    )


def test_text_options_are_laid_over_a_base():
    """Given options replace the base's values; the base's other values, not the engine's defaults, stay."""
    base = TextSettings("cal.txt", Windowing(48, 10), 5, "ev.txt", Windowing(96, 4))
    options = TextOptions(groups=2, eval_windows=3)
    assert options.given() == {"groups": 2, "eval_windows": 3}
    assert options.settings(base) == TextSettings("cal.txt", Windowing(48, 10), 2, "ev.txt", Windowing(96, 3))
    assert TextOptions().settings(base) == base
    every = TextOptions("a.txt", 7, "b.txt", 2, 32, 1)
    assert len(every.given()) == 6
    assert every.settings(base) == TextSettings("a.txt", Windowing(32, 7), 1, "b.txt", Windowing(32, 2))


def _help_lines(runner, command: str) -> list[str]:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


@pytest.mark.parametrize("command", ["compress", "evaluate", "sweep"])
def test_text_commands_list_the_six_text_options(runner, command):
    """compress, evaluate and sweep each offer the six text and window options."""
    lines = _help_lines(runner, command)
    for flag in TEXT_FLAGS:
        assert any(f" {flag} " in line for line in lines), (command, flag)


def test_compress_help_shows_the_engine_defaults(runner):
    """Each text option's help shows the engine default it stands for, as typer does for other options."""
    lines = _help_lines(runner, "compress")
    for flag, default in TEXT_FLAGS.items():
        [line] = [line for line in lines if f" {flag} " in line]
        assert re.search(rf"\[default: \(?{re.escape(default)}\)?\]", line), (flag, line)


def test_cache_option_steers_the_command_without_touching_the_environment(runner, tiny_model_dirs, tmp_path,
                                                                          isolated_cache):
    """`--cache DIR` puts the command's database in DIR; $RANKSCOPE_CACHE and its folder stay untouched."""
    from engine.paths import choose_cache_root
    from engine.store import open_store

    before = os.environ["RANKSCOPE_CACHE"]
    elsewhere = tmp_path / "elsewhere"
    try:
        args = ["--cache", str(elsewhere), "models", "--model", str(tiny_model_dirs["llama"]), "--json"]
        [entry] = _json(runner.invoke(app, args))
        assert entry["status"] == "ready"
        assert (elsewhere / "rankscope.duckdb").is_file()
        assert os.environ["RANKSCOPE_CACHE"] == before == str(isolated_cache)
        assert list(isolated_cache.iterdir()) == []
        fingerprints = [m["fingerprint"] for m in open_store(elsewhere / "rankscope.duckdb").models()]
        assert entry["fingerprint"] in fingerprints
    finally:
        choose_cache_root(None)
