"""Saved plans kept as JSON files next to the cache database (engine.compression.plan_shelf)."""

from __future__ import annotations

from engine.compression.plan import RankPlan
from engine.compression.plan_shelf import PlanShelf, plan_file_name


def _plan(rank: int = 8) -> RankPlan:
    return RankPlan(model={"id": "m", "fingerprint": "f", "model_type": "llama", "num_layers": 2}, method="svd",
                    ranks={"model.layers.0.self_attn.q_proj": rank})


def test_plans_are_saved_and_loaded_by_name(tmp_path):
    shelf = PlanShelf(tmp_path)
    shelf.save("first", _plan(8))
    shelf.save("second", _plan(16))
    shelf.save("first", _plan(24))  # saving again replaces
    loaded = shelf.load()
    assert set(loaded) == {"first", "second"} and loaded["first"].ranks == _plan(24).ranks
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == ["first.json", "second.json"]


def test_a_name_cannot_point_outside_the_folder(tmp_path):
    assert plan_file_name("../../etc/passwd") == "etc-passwd.json"
    assert plan_file_name("a/b c") == "a-b-c.json" and plan_file_name("...") == "plan.json"
    path = PlanShelf(tmp_path).save("../outside", _plan())
    assert path.parent == tmp_path / "plans"


def test_files_that_are_not_plans_are_skipped_and_kept(tmp_path):
    shelf = PlanShelf(tmp_path)
    shelf.save("good", _plan())
    (tmp_path / "plans" / "broken.json").write_text("{not json")
    assert set(shelf.load()) == {"good"}
    assert (tmp_path / "plans" / "broken.json").exists()
