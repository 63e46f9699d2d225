"""The Allocate page with MLPs pruned by channels (LoRAP, issue #13): the kept-channels table next to the ranks,
the budget meter over both kinds, LoRAP's allocation as a preset, Apply, Save and Load of a v2 plan, bad input.
The table maths (engine/analysis/allocation.py) is tested first, without a model."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from engine.analysis.allocation import (
    channels_from_kept, channels_from_ratio, kept_channel_rows, lorap_tables, plan_summary, pruned_linear_paths,
    pruning_section, retention_percent, unit_rank_rows,
)
from engine.compression.grouping import Grouping, ranks_from_ratios
from engine.compression.lorap import lorap_allocation
from engine.compression.plan import SCHEMA, SCHEMA_V2, RankPlan
from engine.compression.pruning import PruningError
from engine.compression.units import LinearShape, ModelShapes, count_parameters
from engine.errors import RankScopeError
from engine.models.loading import load_model
from engine.store import open_store
from tests.app_testing import (
    DEFAULT_RATIO, METHOD, assert_clean, engine_session, has_metric, metric_value, open_app, run_until,
)
from tests.app_testing import workbench  # noqa: F401 (a fixture)

PRUNED = "pruned by channels (LoRAP)"
D_FF = 48  # the tiny llama's intermediate width (tests/tiny_models.py)


# -- the table maths ------------------------------------------------------------------------------------------------


def _toy() -> ModelShapes:
    """Two layers: q/o 8x8, k/v 4x8, gate/up 12x8, down 8x12 (d_model 8, d_ff 12)."""
    dims = {"q": (8, 8), "k": (4, 8), "v": (4, 8), "o": (8, 8), "gate": (12, 8), "up": (12, 8), "down": (8, 12)}
    linears = tuple(LinearShape(f"layers.{layer}.mlp.{t}" if t in ("gate", "up", "down") else f"layers.{layer}.{t}",
                                layer, t, *dims[t]) for layer in range(2) for t in dims)
    return ModelShapes("toy", "f" * 64, "llama", 2, linears, sum(s.d_in * s.d_out for s in linears) + 1000)


def test_kept_channel_rows_read_back_and_name_what_is_allowed():
    shapes = _toy()
    assert channels_from_ratio(shapes, 0.2) == {"layers.0.mlp": 10, "layers.1.mlp": 10}  # round(0.8 · 12)
    assert channels_from_ratio(shapes, 0.0) == {"layers.0.mlp": 12, "layers.1.mlp": 12}
    assert channels_from_ratio(shapes, 0.95) == {"layers.0.mlp": 1, "layers.1.mlp": 1}
    rows = kept_channel_rows(shapes, {"layers.1.mlp": 5})
    assert rows == [
        {"module": "layers.0.mlp", "layer": 0, "d_ff": 12, "kept": None, "parameters": 288, "dense_parameters": 288},
        {"module": "layers.1.mlp", "layer": 1, "d_ff": 12, "kept": 5, "parameters": 120, "dense_parameters": 288}]
    assert channels_from_kept(shapes, [None, 5.0]) == {"layers.0.mlp": None, "layers.1.mlp": 5}
    assert channels_from_kept(shapes, [float("nan"), 12]) == {"layers.0.mlp": None, "layers.1.mlp": 12}
    with pytest.raises(PruningError, match=r"from 1 to its width d_ff = 12.*got 0 for layers.0.mlp, 13 for layers.1"):
        channels_from_kept(shapes, [0, 13])
    with pytest.raises(PruningError, match="got 2.5 for layers.0.mlp"):
        channels_from_kept(shapes, [2.5, None])
    with pytest.raises(PruningError, match="each of the 2 MLPs"):
        channels_from_kept(shapes, [3])


def test_rank_rows_show_a_pruned_mlp_dense_with_its_sliced_parameters():
    shapes = _toy()
    ranks = {s.path: 2 for s in shapes.linears}
    rows = unit_rank_rows(shapes, "svd", ranks, {"layers.0.mlp": 5, "layers.1.mlp": None})
    by_module = {row["module"]: row for row in rows}
    gate = by_module["layers.0.mlp.gate"]
    assert gate["rank"] is None and gate["pruned"] == "pruned: 5 of 12 channels" and gate["parameters"] == 5 * 8
    assert by_module["layers.0.mlp.down"]["parameters"] == 5 * 8
    assert by_module["layers.1.mlp.gate"] | {"parameters": 0} == {
        "module": "layers.1.mlp.gate", "layer": 1, "type": "gate", "shape": "12×8", "max_rank": 4, "rank": 2,
        "parameters": 0, "dense_parameters": 96, "pruned": ""}
    assert by_module["layers.0.q"]["rank"] == 2 and by_module["layers.0.q"]["pruned"] == ""
    assert "pruned" not in unit_rank_rows(shapes, "svd", ranks)[0]  # low-rank mode: the table as before
    joint = {row["module"]: row for row in unit_rank_rows(shapes, "joint-svd", ranks, {"layers.0.mlp": 0})}
    assert joint["layers.0.mlp.gate + layers.0.mlp.up"]["parameters"] is None  # 0 channels: not allowed, no count
    assert pruned_linear_paths(shapes, {"layers.0.mlp": 0, "layers.1.mlp": float("nan")}) == {
        "layers.0.mlp.gate", "layers.0.mlp.up", "layers.0.mlp.down"}


def test_pruning_settings_and_lorap_tables_refuse_bad_input_by_what_is_allowed():
    assert pruning_section("l1", 5) == {"aggregation": "l1", "retention": 0.05}
    assert pruning_section("l2", 7.0)["retention"] == 0.07 and retention_percent({"retention": 0.07}) == 7.0
    assert retention_percent(None) == 1.0
    for bad in (50.5, -1, float("nan"), None):
        with pytest.raises(PruningError, match="from 0 to 50%; LoRAP keeps 1%"):
            pruning_section("l2", bad)
    with pytest.raises(PruningError, match="Aggregations: l2, l1, max"):
        pruning_section("mean", 1)
    shapes = _toy()
    ranks, channels, grouping = lorap_tables(shapes, 0.3, "1:3")
    assert (ranks, channels) == lorap_allocation(shapes, 0.3, (1.0, 3.0))
    assert grouping == {"kind": "lorap", "budget": 0.3, "split": [1.0, 3.0]}
    for split in ("1:0", "a:b", "1-3", "-1:3"):
        with pytest.raises(RankScopeError, match="two positive numbers"):
            lorap_tables(shapes, 0.3, split)
    plan = RankPlan.build(shapes, "svd", ranks, grouping={**grouping, "edited_mlps": 1}, channels=channels,
                          pruning={"aggregation": "l2", "retention": 0.01})
    assert plan_summary("lorap", plan)["grouping"] == "LoRAP 1:3 (edited), 2 MLPs pruned"


# -- the page -------------------------------------------------------------------------------------------------------


def _meter(at: AppTest) -> tuple[int, int]:
    return (int(metric_value(at, "Decoder-linear parameters").replace(",", "")),
            int(metric_value(at, "Model parameters").replace(",", "")))


def _editor(at: AppTest, prefix: str):
    return next(editor for editor in at.data_editor if editor.key.startswith(prefix))


def _edit(at: AppTest, prefix: str, rows: dict) -> None:
    at.session_state[_editor(at, prefix).key] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
    at.run()


def _typed(at: AppTest, prefix: str) -> dict:
    """The edits the browser shows over an editor's data (AppTest's `value` is the data the page sent)."""
    return at.session_state[_editor(at, prefix).key]["edited_rows"]


def _shown_ranks(at: AppTest, shapes: ModelShapes) -> dict:
    table = _editor(at, "alloc_editor_").value
    return {path: (None if rank is None or rank != rank else int(rank))
            for module, rank in zip(table["module"], table["rank"].astype(object).where(table["rank"].notna(), None))
            for path in module.split(" + ")}


def _slider_ranks(shapes: ModelShapes, pruned: set[str]) -> dict:
    groups = Grouping("5x1").groups(shapes, METHOD)
    ranks = ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups})
    return {s.path: None if s.path in pruned else ranks.get(s.path) for s in shapes.linears}  # v dense


def _apply_disabled(at: AppTest) -> bool:
    return at.button(key="apply_plan").disabled


def test_pruned_mode_tables_and_meter_count_both_kinds(workbench):
    at = open_app("allocate")
    assert at.radio(key="alloc_mlp_mode").value == "low-rank" and len(at.data_editor) == 1
    at.radio(key="alloc_mlp_mode").set_value(PRUNED).run()
    assert_clean(at)
    shapes = ModelShapes.of(load_model(str(workbench["model"]), open_store()))
    kept = round((1 - DEFAULT_RATIO) * D_FF)
    channels = {m.path: kept for m in shapes.mlps}
    assert channels == channels_from_ratio(shapes, DEFAULT_RATIO)
    assert _editor(at, "alloc_channels_").value["kept"].tolist() == [kept, kept]
    ranks = _slider_ranks(shapes, {p for m in shapes.mlps for p in m.paths})
    assert _shown_ranks(at, shapes) == ranks
    counts = count_parameters(shapes, METHOD, ranks, channels)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)
    assert metric_value(at, "Removed from decoder linears") == f"{counts.decoder_reduction:.2%}"
    table = _editor(at, "alloc_editor_").value
    mlp_rows = table[table["type"].isin(["gate", "up", "down"])]
    assert (mlp_rows["pruned"] == f"pruned: {kept} of {D_FF} channels").all() and mlp_rows["rank"].isna().all()
    assert not _apply_disabled(at)

    # layer 0 no longer pruned (its gate, up and down take the sliders' ranks again), layer 1 keeps 20 channels
    _edit(at, "alloc_channels_", {0: {"kept": None}, 1: {"kept": 20}})
    assert_clean(at)
    mlp0, mlp1 = shapes.mlps
    channels = {mlp0.path: None, mlp1.path: 20}
    ranks = _slider_ranks(shapes, set(mlp1.paths))
    assert _shown_ranks(at, shapes) == ranks
    counts = count_parameters(shapes, METHOD, ranks, channels)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)

    # a rank typed for a pruned MLP's down is refused with the reason, and kept in the table
    table = _editor(at, "alloc_editor_").value
    down1 = int(table.index[table["module"] == mlp1.down][0])
    _edit(at, "alloc_editor_", {down1: {"rank": 8}})
    assert not at.exception and "both prunes" in at.error[0].value and "ranks must be null" in at.error[0].value
    assert _typed(at, "alloc_editor_") == {down1: {"rank": 8}} and _apply_disabled(at)

    at.radio(key="alloc_mlp_mode").set_value("low-rank").run()  # back: the tables of the sliders, nothing pruned
    assert_clean(at)
    assert len(at.data_editor) == 1 and _shown_ranks(at, shapes) == _slider_ranks(shapes, set())


def test_lorap_preset_fills_both_tables_with_loraps_allocation(workbench):
    at = open_app("allocate")
    at.slider(key="alloc_lorap_budget").set_value(0.3)
    at.text_input(key="alloc_lorap_split").set_value("1:2")
    at.run()
    at.button(key="alloc_lorap_fill").click().run()
    assert_clean(at)
    assert at.radio(key="alloc_mlp_mode").value == PRUNED
    shapes = ModelShapes.of(load_model(str(workbench["model"]), open_store()))
    ranks, channels = lorap_allocation(shapes, 0.3, (1.0, 2.0))
    assert _shown_ranks(at, shapes) == {s.path: ranks.get(s.path) for s in shapes.linears}
    assert _editor(at, "alloc_channels_").value["kept"].tolist() == [channels[m.path] for m in shapes.mlps]
    counts = count_parameters(shapes, METHOD, ranks, channels)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)
    assert counts.decoder_reduction == pytest.approx(0.3, abs=0.05)
    assert any("LoRAP's allocation at 30%" in info.value for info in at.info)

    at.slider(key=next(s.key for s in at.slider if s.key.startswith("ratio."))).set_value(0.3).run()
    assert_clean(at)  # a slider moved: back to the sliders
    assert not any("LoRAP's allocation" in info.value for info in at.info)
    assert _editor(at, "alloc_channels_").value["kept"].tolist() == [round(0.8 * D_FF)] * 2


def test_apply_save_and_load_a_mixed_plan(workbench):
    at = open_app("allocate")
    at.radio(key="alloc_mlp_mode").set_value(PRUNED).run()
    at.selectbox(key="alloc_aggregation").set_value("l1")
    at.number_input(key="alloc_retention").set_value(5.0)
    at.run()
    _edit(at, "alloc_channels_", {1: {"kept": 24}})
    assert_clean(at)
    store = open_store()
    session, shapes = engine_session(workbench, store)
    mlp0, mlp1 = shapes.mlps
    channels = {mlp0.path: round(0.8 * D_FF), mlp1.path: 24}
    ranks = _slider_ranks(shapes, {p for m in shapes.mlps for p in m.paths})
    pruning = {"aggregation": "l1", "retention": 0.05}

    at.button(key="apply_plan").click().run()
    run_until(at, has_metric("Original perplexity"))
    assert_clean(at)
    expected = session.evaluate(session.plan(ranks, channels=channels, pruning=pruning)).metrics
    assert float(metric_value(at, "Perplexity")) == pytest.approx(expected["perplexity"], abs=2e-3)
    assert float(metric_value(at, "KL(P_orig‖P_comp)")) == pytest.approx(expected["kl_forward"], rel=1e-2, abs=1e-7)
    assert float(metric_value(at, "KL(P_comp‖P_orig)")) == pytest.approx(expected["kl_reverse"], rel=1e-2, abs=1e-7)
    assert float(metric_value(at, "Original perplexity")) == pytest.approx(session.reference.perplexity, abs=2e-3)
    assert not any("the table has changed since" in c.value for c in at.caption)

    at.text_input(key="alloc_plan_name").set_value("mixed")
    at.button(key="save_plan").click().run()
    assert_clean(at)
    saved = RankPlan.from_dict(at.session_state["alloc_saved_plans"]["mixed"])
    assert saved.schema == SCHEMA_V2 and saved.channels == channels and saved.pruning == pruning
    assert saved.ranks == ranks | saved.ranks and saved.metrics["perplexity"] == pytest.approx(expected["perplexity"])
    assert saved.parameters == count_parameters(shapes, METHOD, ranks, channels).to_dict()
    assert RankPlan.load(store.cache_dir / "plans" / "mixed.json") == saved  # on the shelf too
    row = next(df.value for df in at.dataframe if "plan" in df.value.columns).to_dict("records")[0]
    assert row["grouping"] == "5x1 (edited), 2 MLPs pruned"

    # elsewhere: low-rank MLPs, other settings; "Edit in the table" brings back ranks, channels and settings
    at.selectbox(key="alloc_aggregation").set_value("max")
    at.number_input(key="alloc_retention").set_value(2.0)
    _edit(at, "alloc_channels_", {0: {"kept": 10}})
    at.radio(key="alloc_mlp_mode").set_value("low-rank").run()
    at.button(key="edit_saved_plan").click().run()
    assert_clean(at)
    assert at.radio(key="alloc_mlp_mode").value == PRUNED
    assert at.selectbox(key="alloc_aggregation").value == "l1" and at.number_input(key="alloc_retention").value == 5.0
    assert _editor(at, "alloc_channels_").value["kept"].tolist() == [channels[mlp0.path], 24]
    assert _shown_ranks(at, shapes) == ranks
    counts = count_parameters(shapes, METHOD, ranks, channels)
    assert _meter(at) == (counts.decoder_compressed, counts.total_compressed)
    assert not any("the table has changed since" in c.value for c in at.caption)  # the same plan as applied

    # the same plan as an upload is the same plan; a v1 plan loads as before, its MLPs low-rank
    fresh = open_app("allocate")
    fresh.file_uploader(key="alloc_upload").set_value(("up.json", saved.to_json().encode(), "application/json")).run()
    assert_clean(fresh)
    assert RankPlan.from_dict(fresh.session_state["alloc_saved_plans"]["up"]) == saved
    v1_ranks = {s.path: 8 for s in shapes.linears if s.linear_type in ("gate", "up", "down")}
    v1 = RankPlan.build(shapes, METHOD, v1_ranks, grouping={"kind": "custom-mlp"})
    assert v1.schema == SCHEMA
    fresh.radio(key="alloc_mlp_mode").set_value(PRUNED).run()
    fresh.file_uploader(key="alloc_upload").set_value(("v1.json", v1.to_json().encode(), "application/json")).run()
    fresh.selectbox(key="alloc_chosen_plan").set_value("v1").run()
    fresh.button(key="edit_saved_plan").click().run()
    assert_clean(fresh)
    assert fresh.radio(key="alloc_mlp_mode").value == "low-rank" and len(fresh.data_editor) == 1
    assert _shown_ranks(fresh, shapes) == {s.path: v1_ranks.get(s.path) for s in shapes.linears}
    assert _meter(fresh)[0] == count_parameters(shapes, METHOD, v1_ranks).decoder_compressed


def test_bad_pruning_input_is_named_kept_and_disables_apply(workbench):
    at = open_app("allocate")
    at.radio(key="alloc_mlp_mode").set_value(PRUNED).run()
    for bad in (0, D_FF + 1):
        _edit(at, "alloc_channels_", {0: {"kept": bad}})
        assert not at.exception and len(at.error) == 1
        assert f"from 1 to its width d_ff = {D_FF}" in at.error[0].value
        assert f"got {bad} for model.layers.0.mlp" in at.error[0].value
        assert _typed(at, "alloc_channels_") == {0: {"kept": bad}}  # what was typed stays
        assert _apply_disabled(at) and at.button(key="save_plan").disabled
        assert not any(m.label == "Decoder-linear parameters" for m in at.metric)
    _edit(at, "alloc_channels_", {0: {"kept": 30}})
    assert_clean(at)
    assert not _apply_disabled(at)

    for bad in (60.0, -1.0):
        at.number_input(key="alloc_retention").set_value(bad).run()
        assert not at.exception and len(at.error) == 1 and "from 0 to 50%; LoRAP keeps 1%" in at.error[0].value
        assert at.number_input(key="alloc_retention").value == bad and _apply_disabled(at)
        assert _typed(at, "alloc_channels_") == {0: {"kept": 30}}  # the table's edit survives
    at.number_input(key="alloc_retention").set_value(0.0).run()
    assert_clean(at)

    for bad in ("1:0", "one:three", "2"):
        at.text_input(key="alloc_lorap_split").set_value(bad).run()
        assert not at.exception and len(at.error) == 1
        assert "two positive numbers such as 1:3" in at.error[0].value and f"got '{bad}'" in at.error[0].value
        assert at.button(key="alloc_lorap_fill").disabled and at.text_input(key="alloc_lorap_split").value == bad
    at.text_input(key="alloc_lorap_split").set_value("1:3").run()
    assert_clean(at)
    assert not at.button(key="alloc_lorap_fill").disabled
    assert _typed(at, "alloc_channels_") == {0: {"kept": 30}}


def test_bad_pruning_section_in_an_upload_is_refused_with_a_reason(workbench):
    at = open_app("allocate")
    shapes = ModelShapes.of(load_model(str(workbench["model"]), open_store()))
    ranks, channels = lorap_allocation(shapes, 0.2)
    plan = json.loads(RankPlan.build(shapes, METHOD, ranks, channels=channels,
                                     pruning={"aggregation": "l2", "retention": 0.01}).to_json())
    plan["pruning"]["retention"] = 0.9
    at.file_uploader(key="alloc_upload").set_value(("bad.json", json.dumps(plan).encode(), "application/json")).run()
    assert not at.exception and "Refused 'bad.json'" in at.error[0].value and "between 0 and 50%" in at.error[0].value
