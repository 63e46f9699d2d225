"""AppTests of the Allocate page on a tiny llama model: budget meter, Apply, groupings, uploads."""

from __future__ import annotations

import json
import math

import pytest
from streamlit.testing.v1 import AppTest

from engine.compression.grouping import Grouping, budget_target, project_to_budget, ranks_from_ratios
from engine.compression.plan import RankPlan
from engine.compression.units import ModelShapes, count_parameters
from engine.models.loading import load_model
from engine.store import open_store
from tests.app_testing import (
    DEFAULT_RATIO, METHOD, WINDOW_LEN, assert_clean, engine_session, has_metric, metric_value, open_app, run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)


def _meter(at: AppTest) -> tuple[int, int]:
    return (int(metric_value(at, "Decoder-linear parameters").replace(",", "")),
            int(metric_value(at, "Model parameters").replace(",", "")))


def test_allocate_page_meter_matches_the_engine_and_apply_shows_finite_quality(workbench):
    at = open_app("allocate")
    assert at.radio(key="alloc_grouping").value == "5x1"
    assert {s.label for s in at.slider if s.key.startswith("ratio.")} == {"qk", "o", "gate", "up", "down"}
    assert len(at.data_editor) == 1

    store = open_store()
    session, shapes = engine_session(workbench, store)
    grouping = Grouping("5x1")
    groups = grouping.groups(shapes, METHOD)
    ranks = ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups})
    counts = count_parameters(shapes, METHOD, ranks)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)
    assert metric_value(at, "Removed from decoder linears") == f"{counts.decoder_reduction:.2%}"
    assert metric_value(at, "Removed from the whole model") == f"{counts.total_reduction:.2%}"
    assert counts.decoder_compressed < counts.decoder_dense  # the default plan really compresses

    at.button(key="apply_plan").click().run()
    run_until(at, has_metric("Original perplexity"))
    assert_clean(at)
    shown = float(metric_value(at, "Perplexity"))
    assert math.isfinite(shown)
    expected = session.evaluate(session.plan(ranks)).metrics
    assert shown == pytest.approx(expected["perplexity"], abs=2e-3)
    assert float(metric_value(at, "Original perplexity")) == pytest.approx(session.reference.perplexity, abs=2e-3)
    assert float(metric_value(at, "KL(P_orig‖P_comp)")) == pytest.approx(expected["kl_forward"], rel=1e-2, abs=1e-7)
    assert float(metric_value(at, "KL(P_comp‖P_orig)")) == pytest.approx(expected["kl_reverse"], rel=1e-2, abs=1e-7)

    at.text_input(key="alloc_plan_name").set_value("by-hand")
    at.button(key="save_plan").click().run()
    table = next(df.value for df in at.dataframe if "plan" in df.value.columns)
    row = table.to_dict("records")[0]
    assert row["plan"] == "by-hand" and row["Perplexity"] == pytest.approx(shown, abs=2e-3)
    assert row["decoder_params"] == counts.decoder_compressed
    saved = RankPlan.from_dict(at.session_state["alloc_saved_plans"]["by-hand"])
    assert saved.schema == "rankscope.plan/v1" and saved.metrics["perplexity"] == pytest.approx(shown, abs=2e-3)
    assert saved.evaluation["window_len"] == WINDOW_LEN and saved.ranks == ranks | saved.ranks
    assert len(at.get("download_button")) == 2  # the current plan, and the chosen saved plan

    # the plan is also kept next to the cache: a new browser session (or a restarted app) starts with it
    assert RankPlan.load(store.cache_dir / "plans" / "by-hand.json") == saved
    fresh = open_app("allocate")
    assert RankPlan.from_dict(fresh.session_state["alloc_saved_plans"]["by-hand"]) == saved


def test_allocate_page_projects_sliders_onto_a_budget(workbench):
    at = open_app("allocate")
    at.toggle(key="alloc_budget_on").set_value(True).run()
    at.slider(key="alloc_budget").set_value(0.3).run()
    assert_clean(at)
    store = open_store()
    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    grouping = Grouping("5x1")
    ranks, _ = project_to_budget(shapes, METHOD, grouping, {g: DEFAULT_RATIO for g in grouping.groups(shapes, METHOD)},
                                 budget_target(shapes, 0.3))
    counts = count_parameters(shapes, METHOD, ranks)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)
    assert counts.decoder_compressed <= budget_target(shapes, 0.3)

    at.slider(key="alloc_budget").set_value(0.9).run()  # more than rank 8 everywhere can remove
    assert at.error and "infeasible" in at.error[0].value and not at.exception


def test_allocate_page_uses_edited_ranks_and_groupings(workbench):
    at = open_app("allocate")
    editor = at.data_editor[0]
    table = editor.value
    down_row = int(table.index[(table["type"] == "down") & (table["layer"] == 1)][0])
    at.session_state[editor.key] = {"edited_rows": {down_row: {"rank": 8}}, "added_rows": [], "deleted_rows": []}
    at.run()
    assert_clean(at)
    store = open_store()
    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    groups = Grouping("5x1").groups(shapes, METHOD)
    ranks = ranks_from_ratios(groups, {g: DEFAULT_RATIO for g in groups})
    ranks["model.layers.1.mlp.down_proj"] = 8
    assert _meter(at)[0] == count_parameters(shapes, METHOD, ranks).decoder_compressed

    at.radio(key="alloc_grouping").set_value("per-layer").run()
    assert_clean(at)
    assert {s.label for s in at.slider if s.key.startswith("ratio.")} == {
        f"{t}@{layer}" for t in ("q", "k", "o", "gate", "up", "down") for layer in (0, 1)}  # v stays dense
    at.radio(key="alloc_grouping").set_value("5xG").run()
    assert_clean(at)
    assert {s.label for s in at.slider if s.key.startswith("ratio.")} == {
        f"{g}@{layer}-{layer}" for g in ("qk", "o", "gate", "up", "down") for layer in (0, 1)}  # G = 2 blocks
    at.selectbox(key="method").set_value("joint-svd").run()
    assert_clean(at)
    assert at.data_editor[0].value["type"].tolist() == ["q+k", "v", "o", "gate+up", "down"] * 2


def test_allocate_page_refuses_bad_uploads_with_a_reason(workbench, tiny_model_dirs):
    at = open_app("allocate")
    uploader = at.file_uploader(key="alloc_upload")
    uploader.set_value(("broken.json", b"{not json", "application/json")).run()
    assert not at.exception and "Refused 'broken.json'" in at.error[0].value and "not valid JSON" in at.error[0].value

    at.file_uploader(key="alloc_upload").set_value(("other.json", b'{"schema": "other/v9"}', "application/json")).run()
    assert not at.exception and "Unsupported plan schema" in at.error[0].value

    store = open_store()
    other = ModelShapes.of(load_model(str(tiny_model_dirs["qwen2"]), store))
    foreign = RankPlan.build(other, METHOD, {s.path: 8 for s in other.linears if s.linear_type == "down"})
    at.file_uploader(key="alloc_upload").set_value(("qwen.json", foreign.to_json().encode(), "application/json")).run()
    assert not at.exception and "was made for model" in at.error[0].value

    shapes = ModelShapes.of(load_model(str(workbench["model"]), store))
    ranks = {s.path: 8 for s in shapes.linears if s.linear_type in ("gate", "up", "down")}
    good = RankPlan.build(shapes, METHOD, ranks, grouping={"kind": "custom-mlp"})
    forged = json.loads(good.to_json())
    forged["parameters"]["decoder_linear"]["reduction"] = 0.9
    upload = ("forged.json", json.dumps(forged).encode(), "application/json")
    at.file_uploader(key="alloc_upload").set_value(upload).run()
    refusal = at.error[0].value
    assert not at.exception and "Refused 'forged.json'" in refusal and "'parameters' do not match its ranks" in refusal
    assert f"({good.parameters['decoder_linear']['reduction']:.2%} removed)" in refusal
    assert "alloc_saved_plans" not in at.session_state or not at.session_state["alloc_saved_plans"]
    empty = {**json.loads(good.to_json()), "ranks": {}}
    at.file_uploader(key="alloc_upload").set_value(("empty.json", json.dumps(empty).encode(), "application/json")).run()
    assert not at.exception and "must compress at least one linear" in at.error[0].value

    at.file_uploader(key="alloc_upload").set_value(("mlp8.json", good.to_json().encode(), "application/json")).run()
    assert_clean(at)
    assert "Loaded 'mlp8'" in at.success[0].value
    assert at.selectbox(key="alloc_chosen_plan").options == ["mlp8"]
    at.button(key="edit_saved_plan").click().run()
    assert_clean(at)
    assert _meter(at)[0] == count_parameters(shapes, METHOD, ranks).decoder_compressed
    edited = at.data_editor[0].value
    assert edited.loc[edited["type"] == "down", "rank"].tolist() == [8, 8]
    assert edited.loc[edited["type"] == "q", "rank"].isna().all()


def test_allocate_page_says_an_all_dense_allocation_is_the_original_model(workbench):
    at = open_app("allocate")
    for slider in at.slider:
        if slider.key.startswith("ratio."):
            slider.set_value(0.0)
    at.run()
    assert_clean(at)
    assert any("Every matrix is dense: this is the original model" in i.value for i in at.info)
    assert not [b for b in at.button if b.key == "apply_plan"]  # nothing to apply
