"""An export does each piece of work once (issue #11): no full evaluation when the plan records its metrics for the
session's evaluation windows and the reload holds the written tensors bit for bit; one (the reload's) with
evaluate_reload, a second one only when the plan has no record or its record is wrong; the check windows' logits of
an evaluated reload come from that evaluation's forwards; tokens/s is timed on the side-by-side generation itself;
the report gives the seconds of each part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine.export.report
import engine.export.writer
from engine.compression.plan import RankPlan
from engine.compression.session import CompressionSession
from engine.export import export_compressed, load_compressed
from engine.export.report import measure_generation_speeds
from engine.export.writer import TIMING_PARTS, _with_check_logits
from engine.metrics import evaluate_quality
from engine.models.loading import load_model
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.tiny_models import TRAINING_TEXT

FAST = dict(timing_runs=1, max_new_tokens=8)
METRICS = ("perplexity", "kl_forward", "kl_reverse", "tokens")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-work-text") / "text.txt"
    path.write_text(TRAINING_TEXT * 20)
    return path


def _session(store, model_dir: Path, text: Path, method: str = "svd", eval_windows: int = 3) -> CompressionSession:
    texts = TextSettings(str(text), Windowing(32, 8), 4, str(text), Windowing(32, eval_windows))
    return CompressionSession.open(store, load_model(str(model_dir), store), method, texts)


def _plan(session: CompressionSession) -> RankPlan:
    ranks = {s.path: 8 if s.layer == 1 else None for s in session.shapes.linears}
    return session.plan(ranks)


@pytest.fixture
def evaluations(monkeypatch) -> list:
    """The models the export evaluates on all windows, in order (a spy on the writer's evaluate_quality)."""
    seen = []

    def spy(model, windows, reference, progress=None, window_indices=None):
        seen.append(model)
        return evaluate_quality(model, windows, reference, progress, window_indices)

    monkeypatch.setattr(engine.export.writer, "evaluate_quality", spy)
    return seen


def _saved_metrics(directory: Path) -> dict:
    return {k: RankPlan.load(directory / "rank_plan.json").metrics[k] for k in METRICS}


def test_a_plan_with_metrics_for_these_windows_is_reported_once_its_reload_is_proven_identical(
        store, tiny_model_dirs, text_file, tmp_path, evaluations):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    plan = session.evaluate(_plan(session))  # what compress --save-plan writes: metrics on these windows
    report = export_compressed(session, plan, tmp_path / "export", **FAST)

    assert report.passed and report.compressed_quality_from == "plan" and not report.reload_evaluated
    assert evaluations == []  # nothing evaluated on all windows: the tensors and the check logits prove the reload
    assert report.quality["compressed"] == report.quality["reloaded"] == {k: plan.metrics[k] for k in METRICS}
    assert _saved_metrics(tmp_path / "export") == report.quality["compressed"]
    names = [c.name for c in report.checks]
    assert "weights via load_compressed" in names and "weights via transformers" in names
    assert "perplexity re-evaluated after reload" not in names and "quality of the reload" in names
    assert report.logits_max_abs_diff == {"load_compressed": 0.0, "transformers": 0.0}
    assert report.timings["evaluation_s"] >= 0 and report.timings["in_memory_s"] >= 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "compressed (the plan's record for these windows)" in card and "bit for bit" in card


def test_evaluate_reload_evaluates_the_reload_once_and_compares_it_with_the_record(
        store, tiny_model_dirs, text_file, tmp_path, evaluations):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    plan = session.evaluate(_plan(session))
    report = export_compressed(session, plan, tmp_path / "export", evaluate_reload=True, **FAST)

    assert report.passed and report.compressed_quality_from == "plan" and report.reload_evaluated
    assert len(evaluations) == 1 and evaluations[0] is not session.loaded.model  # only the reload was evaluated
    assert report.quality["compressed"] == {k: plan.metrics[k] for k in METRICS}
    # the reload's logits are the in-memory model's, so its metrics are the recorded ones exactly
    assert report.quality["reloaded"] == report.quality["compressed"]
    assert _saved_metrics(tmp_path / "export") == report.quality["compressed"]
    detail = next(c.detail for c in report.checks if c.name == "perplexity re-evaluated after reload")
    assert "recorded in the plan for these windows" in detail
    card = (tmp_path / "export" / "README.md").read_text()
    assert "compressed (the plan's record; the reload re-measured it)" in card and "(in memory)" not in card


def test_a_reloaded_tensor_that_differs_by_one_bit_fails_the_export(store, tiny_model_dirs, text_file, tmp_path,
                                                                   monkeypatch, evaluations):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    plan = session.evaluate(_plan(session))
    real_load = engine.export.writer.load_compressed

    def nudged(directory):  # one weight one ulp away: logits may not even move on the check window
        model, tokenizer, saved = real_load(directory)
        with torch.no_grad():
            weight = model.get_submodule("model.layers.0.self_attn.q_proj").weight
            weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
        return model, tokenizer, saved

    monkeypatch.setattr(engine.export.writer, "load_compressed", nudged)
    with pytest.raises(engine.export.writer.ExportError,
                       match=r"weights via load_compressed: 1 tensor\(s\) differ.*model.layers.0.self_attn.q_proj.weight"):
        export_compressed(session, plan, tmp_path / "export", **FAST)
    assert len(evaluations) >= 1  # a differing tensor falls back to evaluating the reload
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["no metrics", "other windows"])
def test_without_metrics_for_these_windows_the_in_memory_model_is_measured_once(
        case, store, tiny_model_dirs, text_file, tmp_path, evaluations):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    plan = _plan(session)
    if case == "other windows":  # measured on 2 windows; the session evaluates on 3
        plan = _session(store, tiny_model_dirs["llama"], text_file, eval_windows=2).evaluate(plan)
        evaluations.clear()
    report = export_compressed(session, plan, tmp_path / "export", **FAST)

    assert report.passed and report.compressed_quality_from == "in-memory"
    assert len(evaluations) == 2 and evaluations[0] is session.loaded.model and evaluations[1] is not evaluations[0]
    assert report.quality["compressed"]["tokens"] == 3 * 31
    assert _saved_metrics(tmp_path / "export") == report.quality["compressed"]
    assert "(in memory)" in (tmp_path / "export" / "README.md").read_text()


def test_a_plan_whose_record_is_wrong_is_measured_and_its_record_not_copied(
        store, tiny_model_dirs, text_file, tmp_path, evaluations):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    true = session.evaluate(_plan(session))
    forged = true.with_metrics({**{k: true.metrics[k] for k in METRICS}, "perplexity": true.metrics["perplexity"] * 1.1})
    report = export_compressed(session, forged, tmp_path / "export", evaluate_reload=True, **FAST)

    assert report.passed and report.compressed_quality_from == "in-memory"
    assert len(evaluations) == 2 and evaluations[1] is session.loaded.model  # the reload first, then the in-memory model
    assert report.quality["compressed"]["perplexity"] == pytest.approx(true.metrics["perplexity"], rel=1e-6)
    assert _saved_metrics(tmp_path / "export")["perplexity"] == report.quality["compressed"]["perplexity"]
    detail = next(c.detail for c in report.checks if c.name == "perplexity re-evaluated after reload")
    assert "did not match" in detail and "in memory" in detail


def test_a_broken_export_fails_against_the_plans_record_too(store, tiny_model_dirs, text_file, tmp_path, monkeypatch):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    plan = session.evaluate(_plan(session))
    real_load = engine.export.writer.load_compressed

    def broken(directory):  # a reload that is not the written model at all
        model, tokenizer, saved = real_load(directory)
        with torch.no_grad():
            model.get_submodule("model.layers.1.mlp.down_proj").B.mul_(3.0)
        return model, tokenizer, saved

    monkeypatch.setattr(engine.export.writer, "load_compressed", broken)
    with pytest.raises(engine.export.writer.ExportError,
                       match=r"logits via load_compressed.*perplexity re-evaluated after reload.*in memory"):
        export_compressed(session, plan, tmp_path / "export", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_the_check_windows_logits_come_from_the_evaluation_forwards(store, tiny_model_dirs, text_file):
    session = _session(store, tiny_model_dirs["qwen2"], text_file)
    model = session.loaded.model
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        got: dict[int, torch.Tensor] = {}
        result = _with_check_logits(model, session.windows[:2], got.__setitem__,
                                    lambda: evaluate_quality(model, session.windows, session.reference))
        assert len(calls) == 3 and sorted(got) == [0, 1]  # 3 windows evaluated, no extra forward for the checks
        assert result.n_tokens == 3 * 31
        alone: dict[int, torch.Tensor] = {}
        _with_check_logits(model, session.windows[:2], alone.__setitem__)  # no evaluation: a forward per window
        assert len(calls) == 5
        for i in (0, 1):
            assert torch.equal(got[i], alone[i]) and got[i].shape == (32, model.config.vocab_size)
        # an evaluation that skips a check window: that window still gets its own forward
        late: dict[int, torch.Tensor] = {}
        _with_check_logits(model, session.windows[:2], late.__setitem__,
                           lambda: evaluate_quality(model, session.windows, session.reference, window_indices=[1, 2]))
        assert len(calls) == 5 + 2 + 1 and torch.equal(late[0], alone[0]) and torch.equal(late[1], alone[1])
    finally:
        handle.remove()


def test_check_windows_option_and_timings(store, tiny_model_dirs, text_file, tmp_path):
    session = _session(store, tiny_model_dirs["gemma3"], text_file)
    report = export_compressed(session, _plan(session), tmp_path / "export", check_windows=3, **FAST)
    logits_checks = [c for c in report.checks if c.name.startswith("logits via")]
    assert len(logits_checks) == 2 and all("on 3 window(s)" in c.detail and "identical" in c.detail
                                           for c in logits_checks)
    assert report.logits_max_abs_diff == {"load_compressed": 0.0, "transformers": 0.0}
    timings = report.timings
    assert set(timings) == {*TIMING_PARTS, "total_s"} and all(v >= 0 for v in timings.values())
    assert sum(v for k, v in timings.items() if k != "total_s") <= timings["total_s"]
    recorded = store.exports(session.loaded.fingerprint)[0]["report"]
    assert recorded["timings"] == timings and recorded["compressed_quality_from"] == "in-memory"
    with pytest.raises(engine.export.writer.ExportError, match="at least 1"):
        export_compressed(session, _plan(session), tmp_path / "never", check_windows=0, **FAST)


def test_tokens_per_second_is_timed_on_the_side_by_side_generation(store, tiny_model_dirs, text_file, tmp_path,
                                                                   monkeypatch):
    session = _session(store, tiny_model_dirs["llama"], text_file)
    real_generate = engine.export.report._generate
    order = []

    def counted(model, tokenizer, prompt, max_new_tokens, clock=None):
        order.append(("original" if model is session.loaded.model else "compressed", clock is not None))
        return real_generate(model, tokenizer, prompt, max_new_tokens, clock)

    monkeypatch.setattr(engine.export.report, "_generate", counted)
    report = export_compressed(session, _plan(session), tmp_path / "export", timing_runs=1, max_new_tokens=5)
    assert order == [("original", True), ("compressed", True)]  # no generation beyond the side-by-side one, timed
    for label in ("original", "compressed"):
        speed = report.speed[label]
        assert speed.runs == 1 and len(speed.seconds) == 1 and speed.decode_steps == 4
        assert speed.tokens_per_second == pytest.approx(1 / speed.median_step_s, rel=1e-3)
        assert speed.tokens_per_second > 5 / speed.seconds[0]  # the prefill and first token are not counted

    order.clear()
    report = export_compressed(session, _plan(session), tmp_path / "again", timing_runs=3, max_new_tokens=4)
    # the side-by-side pair, then two more timed runs each, interleaved B A, A B
    assert [label for label, _ in order] == ["original", "compressed", "compressed", "original", "original",
                                             "compressed"]
    assert all(timed for _, timed in order)
    assert report.speed["original"].runs == 3 and report.speed["compressed"].decode_steps == 9


class _Stub:
    """A model whose generate streams its tokens with a fixed time per token; records the order of calls."""

    def __init__(self, name: str, log: list, seconds: float, first: float = 0.0):
        self.name, self.log, self.seconds, self.first = name, log, seconds, first

    def parameters(self):  # no weights: its inputs stay on the CPU
        return iter(())

    def generate(self, input_ids, attention_mask, max_new_tokens, streamer=None, **_):
        import time

        self.log.append(self.name)
        streamer.put(input_ids)
        time.sleep(self.first)  # the prefill: not counted
        for _ in range(max_new_tokens):
            time.sleep(self.seconds)
            streamer.put(torch.zeros(1, dtype=torch.long))
        streamer.end()
        return torch.cat([input_ids, torch.zeros(1, max_new_tokens, dtype=input_ids.dtype)], dim=1)


class _Tokenizer:
    pad_token_id = eos_token_id = 0

    def __call__(self, prompt, return_tensors="pt"):
        return {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}


def test_timed_runs_are_interleaved_and_give_one_over_the_median_decode_step():
    log = []
    models = {"a": _Stub("a", log, 0.005, first=0.2), "b": _Stub("b", log, 0.02)}
    speeds = measure_generation_speeds(models, _Tokenizer(), "p", max_new_tokens=6, runs=3)
    assert log == ["a", "b", "b", "a", "a", "b"]  # A B, B A, A B: no warm-up run
    assert speeds["a"].runs == 3 and len(speeds["a"].seconds) == 3 and speeds["a"].decode_steps == 15
    # a's slow prefill (0.2 s) is in its whole-call seconds but not in its tokens/s
    assert min(speeds["a"].seconds) > 0.2 and 1 / 0.005 >= speeds["a"].tokens_per_second > 1 / 0.02
    assert speeds["b"].tokens_per_second <= 1 / 0.02
    log.clear()
    one = measure_generation_speeds(models, _Tokenizer(), "p", max_new_tokens=1, runs=1)
    assert log == ["a", "b"] and one["a"].decode_steps == 0 and one["a"].tokens_per_second == pytest.approx(1 / one["a"].seconds[0], rel=1e-3)
    with pytest.raises(ValueError, match="at least 1"):
        measure_generation_speeds(models, _Tokenizer(), "p", runs=0)


def test_the_export_json_carries_the_timings(tiny_model_dirs, text_file, tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    runner = CliRunner()
    options = ["--calibration-text", str(text_file), "--calibration-windows", "8", "--groups", "4",
               "--eval-text", str(text_file), "--eval-windows", "2", "--window-len", "32"]
    plan_file = tmp_path / "plan.json"
    made = runner.invoke(app, ["compress", "--model", str(tiny_model_dirs["llama"]), "--method", "svd",
                               "--uniform", "0.3", "--save-plan", str(plan_file), *options])
    assert made.exit_code == 0, made.output
    result = runner.invoke(app, ["export", "--plan", str(plan_file), "--out", str(tmp_path / "export"),
                                 "--new-tokens", "4", "--timing-runs", "1", "--check-windows", "2", "--json", *options])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["compressed_quality_from"] == "plan" and set(report["timings"]) == {*TIMING_PARTS, "total_s"}
    assert all("on 2 window(s)" in c["detail"] for c in report["checks"] if c["name"].startswith("logits via"))
    assert load_compressed(tmp_path / "export")[2].metrics["perplexity"] == report["quality"]["compressed"]["perplexity"]
    assert report["speed"]["compressed"]["runs"] == 1 and report["speed"]["compressed"]["decode_steps"] == 3
