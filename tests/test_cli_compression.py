"""The `rankscope compress`, `evaluate` and `sweep` commands on a tiny model with small windows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.compression.plan import RankPlan
from engine.compression.units import RANK_STEP

TOKENS = 4 * 31  # 4 evaluation windows of 32 tokens, 31 predictions each
TINY_LLAMA_STEP = RANK_STEP * (48 + 32)  # the largest one-step cost among the tiny model's matrices


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def options(tiny_model_dirs, sample_text_file) -> list[str]:
    text = str(sample_text_file)
    return ["--model", str(tiny_model_dirs["llama"]), "--calibration-text", text, "--calibration-windows", "16",
            "--groups", "4", "--eval-text", text, "--eval-windows", "4", "--window-len", "32"]


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _user_error(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_compress_uniform_then_re_evaluate_the_saved_plan(runner, options, tmp_path):
    plan_file = tmp_path / "plans" / "uniform.json"
    out = _json(runner.invoke(app, ["compress", *options, "--uniform", "0.3", "--save-plan", str(plan_file), "--json"]))
    assert out["method"] == "feature-pca" and out["plan_file"] == str(plan_file)
    decoder, total = out["parameters"]["decoder_linear"], out["parameters"]["total"]
    target = round(0.7 * decoder["dense"])
    assert target - TINY_LLAMA_STEP <= decoder["compressed"] <= target
    assert decoder["reduction"] >= 0.3 - TINY_LLAMA_STEP / decoder["dense"]
    assert total["dense"] - total["compressed"] == decoder["dense"] - decoder["compressed"]
    assert 0 < total["reduction"] < decoder["reduction"]  # embeddings are not compressed
    original, compressed = out["original"], out["compressed"]
    assert original["kl_forward"] == original["kl_reverse"] == 0.0
    assert compressed["kl_forward"] > 0 and compressed["kl_reverse"] > 0
    assert original["tokens"] == compressed["tokens"] == TOKENS
    assert original["perplexity"] > 1 and compressed["perplexity"] > 1

    plan = RankPlan.load(plan_file)
    assert plan.metrics["perplexity"] == compressed["perplexity"]
    assert plan.parameters == out["parameters"] and plan.method == "feature-pca"
    assert plan.calibration["n_windows"] == 16 and plan.evaluation["window_len"] == 32

    again = _json(runner.invoke(app, ["evaluate", *options, "--plan", str(plan_file), "--json"]))
    assert again["perplexity"] == pytest.approx(compressed["perplexity"], rel=1e-6)
    assert again["kl_forward"] == pytest.approx(compressed["kl_forward"], rel=1e-6)
    assert again["kl_reverse"] == pytest.approx(compressed["kl_reverse"], rel=1e-6)
    assert again["tokens"] == TOKENS

    baseline = _json(runner.invoke(app, ["evaluate", *options, "--json"]))
    assert baseline["plan"] is None and baseline["kl_forward"] == baseline["kl_reverse"] == 0.0
    assert baseline["perplexity"] == pytest.approx(original["perplexity"], rel=1e-6)

    replay = _json(runner.invoke(app, ["compress", *options, "--plan", str(plan_file), "--json"]))
    assert replay["compressed"]["perplexity"] == pytest.approx(compressed["perplexity"], rel=1e-6)
    assert replay["parameters"] == out["parameters"]


def test_compress_prints_a_readable_summary(runner, options):
    result = runner.invoke(app, ["compress", *options, "--method", "svd", "--uniform", "0.2"])
    assert result.exit_code == 0, result.output
    assert "compressed with svd" in result.stdout
    assert "decoder linears:" in result.stdout and "whole model:" in result.stdout
    assert "KL(P_orig||P_comp)" in result.stdout and "KL(P_comp||P_orig)" in result.stdout


@pytest.mark.parametrize("choice", [[], ["--uniform", "0.3", "--plan", "plan.json"]], ids=["neither", "both"])
def test_compress_needs_exactly_one_of_uniform_and_plan(runner, options, choice):
    _user_error(runner.invoke(app, ["compress", *options, *choice]), "exactly one of --uniform")


def test_malformed_or_foreign_plans_are_readable_errors(runner, options, tmp_path, tiny_model_dirs):
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": "rankscope.plan/v1", "ranks": ')
    _user_error(runner.invoke(app, ["compress", *options, "--plan", str(broken)]), "not valid JSON")
    _user_error(runner.invoke(app, ["evaluate", *options, "--plan", str(broken)]), "not valid JSON")
    _user_error(runner.invoke(app, ["evaluate", *options, "--plan", str(tmp_path / "missing.json")]),
                "Could not read plan file")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "rankscope.plan/v0", "model": {}, "method": "svd", "ranks": {}}))
    _user_error(runner.invoke(app, ["compress", *options, "--plan", str(old)]), "Unsupported plan schema")

    llama_plan = tmp_path / "llama.json"
    _json(runner.invoke(app, ["compress", *options, "--method", "svd", "--uniform", "0.2", "--save-plan",
                              str(llama_plan), "--json"]))
    qwen = [*options]
    qwen[qwen.index("--model") + 1] = str(tiny_model_dirs["qwen2"])
    _user_error(runner.invoke(app, ["evaluate", *qwen, "--plan", str(llama_plan)]), "This plan was made for model")


def test_plans_whose_numbers_are_not_their_ranks_are_refused(runner, options, tmp_path, tiny_model_dirs):
    saved = tmp_path / "twenty.json"
    out = _json(runner.invoke(app, ["compress", *options, "--method", "svd", "--uniform", "0.2", "--save-plan",
                                    str(saved), "--json"]))
    removed = out["parameters"]["decoder_linear"]["reduction"]
    document = json.loads(saved.read_text())
    document["parameters"]["decoder_linear"]["reduction"] = document["parameters"]["total"]["reduction"] = 0.9
    forged = tmp_path / "ninety.json"
    forged.write_text(json.dumps(document))
    for command in ("compress", "evaluate"):
        result = runner.invoke(app, [command, *options, "--plan", str(forged)])
        _user_error(result, "'parameters' do not match its ranks")
        assert f"({removed:.2%} removed)" in result.stderr and "90.00% removed" not in result.stdout

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**json.loads(saved.read_text()), "ranks": {}}))
    _user_error(runner.invoke(app, ["compress", *options, "--plan", str(empty)]), "must compress at least one linear")

    qwen = str(tiny_model_dirs["qwen2"])
    other = json.loads(saved.read_text())
    other["model"]["fingerprint"] = _json(runner.invoke(app, ["models", "--model", qwen, "--json"]))[0]["fingerprint"]
    borrowed = tmp_path / "borrowed.json"
    borrowed.write_text(json.dumps(other))
    qwen_options = [*options]
    qwen_options[qwen_options.index("--model") + 1] = qwen
    _user_error(runner.invoke(app, ["compress", *qwen_options, "--plan", str(borrowed)]), "is a 'qwen2'")


def test_sweep_by_type_lists_points(runner, options):
    out = _json(runner.invoke(app, ["sweep", *options, "--method", "svd", "--by", "type", "--ratios", "0.3",
                                    "--json"]))
    assert out["by"] == "type" and out["method"] == "svd"
    points = out["points"]
    assert sorted(p["type"] for p in points) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    for point in points:
        assert point["layer"] is None and point["ratio"] == 0.3
        assert point["kl_forward"] > 0 and point["kl_reverse"] > 0 and point["perplexity"] > 1
    assert out["original"]["tokens"] == TOKENS

    stored = _json(runner.invoke(app, ["sweep", *options, "--method", "svd", "--by", "type", "--ratios", "0.3",
                                       "--types", "o,down", "--json"]))
    assert {p["type"]: p["perplexity"] for p in stored["points"]} == {
        p["type"]: p["perplexity"] for p in points if p["type"] in ("o", "down")}

    layers = _json(runner.invoke(app, ["sweep", *options, "--method", "svd", "--by", "layer", "--type", "up",
                                       "--ratio", "0.5", "--json"]))
    assert [(p["type"], p["layer"], p["ratio"]) for p in layers["points"]] == [("up", 0, 0.5), ("up", 1, 0.5)]


@pytest.mark.parametrize("extra,words", [
    (["--by", "module"], "--by must be 'type' or 'layer'"),
    (["--ratios", "0.2,half"], "comma-separated numbers"),
    (["--ratios", "0.2,1.2"], "between 0 and 1"),
    (["--types", "q,attn"], "Unknown type(s) attn"),
    (["--method", "pca"], "Unknown method 'pca'"),
], ids=["by", "ratios-text", "ratios-range", "types", "method"])
def test_bad_sweep_options_are_readable_errors(runner, options, extra, words):
    _user_error(runner.invoke(app, ["sweep", *options, "--method", "svd", *extra]), words)


@pytest.mark.parametrize("command,option", [("compress", "--uniform"), ("evaluate", "--plan"), ("sweep", "--ratios")])
def test_help(runner, command, option):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert option in result.stdout and "--model" in result.stdout and "--json" in result.stdout
