"""Devices and forward dtypes (`engine.models.device`): choices checked with readable errors, bfloat16 runs end to end
on the CPU close to float32, float32 keys and numbers unchanged, half-precision results cached apart."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from engine.cache.keys import calibration_key, evaluation_key, factorization_key, reference_key
from engine.cli import app
from engine.errors import DeviceError
from engine.models.device import Placement, resolve_placement
from engine.texts.settings import TextSettings
from engine.texts.windows import Windowing
from tests.app_testing import workbench  # noqa: F401  (the app fixture)

NO_GPU = not torch.cuda.is_available()
WINDOWING = Windowing(16, 4)


@pytest.fixture
def texts(sample_text_file) -> TextSettings:
    return TextSettings(str(sample_text_file), WINDOWING, 2, str(sample_text_file), Windowing(16, 2))


def _loaded(store, tiny_model_dirs, dtype: str):
    from engine.models.loading import load_model

    return load_model(str(tiny_model_dirs["llama"]), store, placement=resolve_placement("cpu", dtype))


def test_choices_resolve_and_refuse_with_what_is_allowed():
    assert resolve_placement() == Placement("cpu", "float32")
    assert resolve_placement("auto", "bfloat16").dtype == "bfloat16"
    if NO_GPU:
        assert resolve_placement("auto").device == "cpu"
    with pytest.raises(DeviceError, match="unknown dtype. Allowed: float32, bfloat16, float16"):
        resolve_placement("cpu", "float8")
    with pytest.raises(DeviceError, match="unknown device. Allowed: auto, cpu, cuda, cuda:N"):
        resolve_placement("gpu")


@pytest.mark.skipif(not NO_GPU, reason="a CUDA GPU is visible")
def test_cuda_without_a_gpu_is_refused_by_the_cli_and_stores_nothing(isolated_cache, tiny_model_dirs, sample_text_file):
    runner = CliRunner()
    for command in (["calibrate", "--text", str(sample_text_file)], ["evaluate"], ["compress", "--uniform", "0.2"]):
        result = runner.invoke(app, [*command, "--model", str(tiny_model_dirs["llama"]), "--device", "cuda:1"])
        assert result.exit_code == 2, result.output
        assert "no CUDA GPU is visible to PyTorch" in result.output and "Use --device cpu or auto" in result.output
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--dtype", "half"])
    assert result.exit_code == 2 and "Allowed: float32, bfloat16, float16" in result.output
    assert list(isolated_cache.iterdir()) == []  # refused before the store was opened


def test_float32_keys_are_unchanged_and_half_dtypes_get_their_own():
    args = ("model-fp", "text-fp", WINDOWING)
    # the formulas of RankScope before dtypes existed
    from engine.cache.keys import FACTORIZATION_VERSION, KEY_LENGTH, REFERENCE_VERSION, STATISTICS_VERSION
    from engine.hashing import sha256_json

    assert calibration_key(*args, 2) == sha256_json(
        ["calibration", STATISTICS_VERSION, "model-fp", "text-fp", *WINDOWING.key(), 2])[:KEY_LENGTH]
    assert evaluation_key(*args) == sha256_json(["evaluation", "model-fp", "text-fp", *WINDOWING.key()])[:KEY_LENGTH]
    assert reference_key(*args) == sha256_json(
        ["reference", REFERENCE_VERSION, "model-fp", "text-fp", *WINDOWING.key()])[:KEY_LENGTH]
    assert factorization_key("model-fp", "svd", "") == sha256_json(
        ["factorization", FACTORIZATION_VERSION, STATISTICS_VERSION, "model-fp", "svd", ""])[:KEY_LENGTH]
    for dtype in ("bfloat16", "float16"):
        assert calibration_key(*args, 2, dtype) != calibration_key(*args, 2)
        assert evaluation_key(*args, dtype) != evaluation_key(*args)
        assert reference_key(*args, dtype) != reference_key(*args)
        assert factorization_key("model-fp", "svd", "", dtype) != factorization_key("model-fp", "svd", "")
    assert calibration_key(*args, 2, "bfloat16") != calibration_key(*args, 2, "float16")


def test_bfloat16_session_runs_end_to_end_on_the_cpu_close_to_float32(store, tiny_model_dirs, texts):
    from engine.compression.session import CompressionSession

    f32 = _loaded(store, tiny_model_dirs, "float32")
    bf16 = _loaded(store, tiny_model_dirs, "bfloat16")
    assert (f32.dtype, bf16.dtype, bf16.device) == ("float32", "bfloat16", "cpu")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    sessions = {loaded.dtype: CompressionSession.open(store, loaded, "feature-pca", texts) for loaded in (f32, bf16)}
    ids = {dtype: (s.calibration.record.calibration_id, s.factorization_record.factorization_id,
                   s.reference_record.reference_id) for dtype, s in sessions.items()}
    assert all(a != b for a, b in zip(ids["float32"], ids["bfloat16"]))  # cached apart
    # statistics stay float64 in both
    site = sessions["bfloat16"].calibration.statistics.site(0, "attn_in")
    assert site.second_moment.dtype == torch.float64
    ratio_plan = sessions["float32"].uniform_plan(0.3)
    results = {dtype: s.evaluate(ratio_plan).metrics for dtype, s in sessions.items()}
    original = {dtype: s.original_quality()["perplexity"] for dtype, s in sessions.items()}
    assert original["bfloat16"] == pytest.approx(original["float32"], rel=0.05)
    assert results["bfloat16"]["perplexity"] == pytest.approx(results["float32"]["perplexity"], rel=0.05)
    assert results["bfloat16"]["kl_reverse"] >= 0.0
    # the compressed modules were made in the model's dtype, and the model is restored afterwards
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())


def test_float32_numbers_do_not_change_with_an_explicit_cpu_placement(store, tiny_model_dirs, texts):
    from engine.cache.evaluation import ensure_baseline_evaluation
    from engine.metrics import evaluate_perplexity
    from engine.models.loading import load_model

    default = load_model(str(tiny_model_dirs["llama"]), store)
    explicit = _loaded(store, tiny_model_dirs, "float32")
    windows = torch.randint(0, 300, (2, 16))
    assert evaluate_perplexity(default.model, windows).perplexity == evaluate_perplexity(explicit.model, windows).perplexity
    first = ensure_baseline_evaluation(store, default, texts.evaluation_text, texts.evaluation_windowing)
    again = ensure_baseline_evaluation(store, explicit, texts.evaluation_text, texts.evaluation_windowing)
    assert again.evaluation_id == first.evaluation_id and again.perplexity == first.perplexity
    half = ensure_baseline_evaluation(store, _loaded(store, tiny_model_dirs, "bfloat16"), texts.evaluation_text,
                                      texts.evaluation_windowing)
    assert half.evaluation_id != first.evaluation_id
    assert half.perplexity == pytest.approx(first.perplexity, rel=0.05) and half.perplexity != first.perplexity


def test_cli_evaluate_in_bfloat16(isolated_cache, tiny_model_dirs, sample_text_file):
    runner = CliRunner()
    args = ["evaluate", "--model", str(tiny_model_dirs["llama"]), "--eval-text", str(sample_text_file),
            "--eval-windows", "2", "--window-len", "16", "--device", "auto", "--json"]
    f32 = runner.invoke(app, args)
    bf16 = runner.invoke(app, [*args, "--dtype", "bfloat16"])
    assert f32.exit_code == 0 and bf16.exit_code == 0, (f32.output, bf16.output)
    ppl32, ppl16 = json.loads(f32.stdout)["perplexity"], json.loads(bf16.stdout)["perplexity"]
    assert ppl16 == pytest.approx(ppl32, rel=0.05) and ppl16 != ppl32
    # the JSON says where and in which dtype its numbers were measured ("auto" is the CPU here)
    assert (json.loads(f32.stdout)["device"], json.loads(f32.stdout)["dtype"]) == ("cpu", "float32")
    assert (json.loads(bf16.stdout)["device"], json.loads(bf16.stdout)["dtype"]) == ("cpu", "bfloat16")
    compressed = runner.invoke(app, ["compress", *args[1:], "--uniform", "0.5", "--method", "svd", "--dtype", "bfloat16"])
    assert compressed.exit_code == 0, compressed.output
    assert (json.loads(compressed.stdout)["device"], json.loads(compressed.stdout)["dtype"]) == ("cpu", "bfloat16")


def test_study_settings_record_a_half_dtype_only():
    from engine.search.settings import StudySettings

    assert "dtype" not in StudySettings().to_dict()  # float32 studies keep their settings dict
    half = StudySettings(dtype="bfloat16")
    assert StudySettings.from_dict(half.to_dict()) == half
    with pytest.raises(Exception, match="dtype must be one of"):
        StudySettings(dtype="float8")


def test_sidebar_offers_devices_and_dtypes(workbench):
    from tests.app_testing import open_app

    at = open_app()
    boxes = {box.label: box for box in at.sidebar.selectbox}
    assert boxes["Device"].options[:2] == ["auto", "cpu"] and boxes["Device"].value == "auto"
    assert boxes["Forward dtype"].options == ["float32", "bfloat16", "float16"]
    assert boxes["Forward dtype"].value == "float32"
    assert not at.exception
