"""AppTests of serving a team (DESIGN.md §14, app/access.py): the shared secret, and paths kept inside the roots.

In share mode (`RANKSCOPE_SHARE=1`) the app asks for `RANKSCOPE_SECRET` before any page renders, reads
models and texts only from the registry, the built-in books, the workspace, the cache and
`RANKSCOPE_ALLOWED_ROOTS`, and writes exports only inside `RANKSCOPE_WORKSPACE`. A refused path gets
the same message whether it exists or not. Locally nothing of this applies.
"""

from __future__ import annotations

import os

import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from engine.compression.grouping import Grouping, ranks_from_ratios
from engine.compression.plan import RankPlan
from engine.compression.units import ModelShapes
from engine.models.loading import load_model
from engine.paths import PROJECT_ROOT
from engine.store import open_store
from tests.app_testing import APP, DEFAULT_RATIO, METHOD, assert_clean, has_metric, run_until
from tests.app_testing import workbench  # noqa: F401 (a fixture)

SECRET = "correct horse battery staple"


@pytest.fixture
def team(workbench, tiny_model_dirs, tmp_path, tmp_path_factory, monkeypatch):
    """Share mode on the workbench: the texts (tmp_path) and the tiny models are allowed roots; the workspace is
    tmp_path/workspace; `outside` is a folder in neither, holding a model directory and a text."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    outside = tmp_path_factory.mktemp("outside")
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text((tiny_model_dirs["llama"] / "config.json").read_text())
    (outside / "private.txt").write_text("Not for the team. " * 200)
    monkeypatch.setenv("RANKSCOPE_SHARE", "1")
    monkeypatch.setenv("RANKSCOPE_SECRET", SECRET)
    monkeypatch.setenv("RANKSCOPE_WORKSPACE", str(workspace))
    monkeypatch.setenv("RANKSCOPE_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path), str(tiny_model_dirs["llama"].parent)]))
    return {**workbench, "workspace": workspace, "outside": outside, "tmp": tmp_path}


def signed_in(page: str | None = None, saved_plans: dict | None = None, clean: bool = True) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    if saved_plans:
        at.session_state["alloc_saved_plans"] = saved_plans
    at.run()
    if "access_secret" in {t.key for t in at.text_input}:  # the gate itself is tested below; the path tests
        at.text_input(key="access_secret").input(SECRET)  # then also show what the app did before it had one
        at.button(key="access_enter").click().run()
    if page is not None:
        at.switch_page(f"../pages/{page}.py").run()
    if clean:
        assert_clean(at)
    return at


def shows_nothing_but_the_secret_box(at: AppTest) -> bool:
    return (not at.title and not at.metric and not at.selectbox and not at.number_input and not at.dataframe
            and [t.key for t in at.text_input] == ["access_secret"])


def test_share_mode_refuses_to_start_without_a_secret(workbench, monkeypatch):
    monkeypatch.setenv("RANKSCOPE_SHARE", "1")
    monkeypatch.delenv("RANKSCOPE_SECRET", raising=False)
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    [error] = at.error
    assert "RANKSCOPE_SECRET" in error.value and "share" in error.value.lower()
    assert not at.title and not at.metric and not at.text_input and not at.selectbox


def test_share_mode_shows_the_pages_only_after_the_right_secret(team):
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and not at.error
    assert shows_nothing_but_the_secret_box(at)
    at.switch_page("../pages/export.py").run()  # no page is reachable before the secret either
    assert shows_nothing_but_the_secret_box(at) and not at.error

    at.text_input(key="access_secret").input("wrong secret")
    at.button(key="access_enter").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["Wrong secret."]
    assert shows_nothing_but_the_secret_box(at)

    at.text_input(key="access_secret").input(SECRET)
    at.button(key="access_enter").click().run()
    assert_clean(at)
    assert at.title[0].value == "Export" and "access_secret" not in {t.key for t in at.text_input}
    at.switch_page("../pages/model.py").run()  # asked once per browser session
    assert_clean(at)
    assert at.title[0].value == "RankScope" and has_metric("Architecture")(at)


def _tiny_plan(workbench, calibration: dict | None = None) -> RankPlan:
    shapes = ModelShapes.of(load_model(str(workbench["model"]), open_store()))
    groups = Grouping("5x1").groups(shapes, METHOD)
    plan = RankPlan.build(shapes, METHOD, ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups}))
    return plan if calibration is None else RankPlan.from_dict({**plan.to_dict(), "calibration": calibration})


def test_share_mode_exports_only_inside_the_workspace(team):
    plan = _tiny_plan(team)
    at = signed_in("export", {"by-hand": plan.to_dict()})
    box = at.text_input(key="export_dir.by-hand")
    assert box.value.startswith(str(team["workspace"].resolve()) + os.sep)  # the default is in the workspace

    refusals = []
    for escape in (team["outside"] / "export", team["tmp"] / "elsewhere", team["workspace"] / ".." / "escaped",
                   team["workspace"]):
        at.text_input(key="export_dir.by-hand").set_value(str(escape)).run()
        assert not at.exception
        refusals.append([e.value for e in at.error])
        assert at.button(key="export_model").disabled
    assert all(r == refusals[0] for r in refusals) and len(refusals[0]) == 1
    assert str(team["workspace"].resolve()) in refusals[0][0]
    assert not (team["outside"] / "export").exists() and not (team["tmp"] / "elsewhere").exists()
    assert not (team["tmp"] / "escaped").exists()

    at.text_input(key="export_dir.by-hand").set_value("team-run").run()  # a relative name lands in the workspace
    assert_clean(at)
    at.number_input(key="export_new_tokens").set_value(4)
    at.number_input(key="export_runs").set_value(1)
    at.button(key="export_model").click().run()
    run_until(at, has_metric("Reload check"))
    assert_clean(at)
    [entry] = open_store().exports(plan.model["fingerprint"])
    assert entry["path"] == str(team["workspace"].resolve() / "team-run") and entry["report"]["passed"]


def test_share_mode_refuses_a_plan_whose_calibration_text_is_outside_the_roots(team):
    outside = team["outside"]
    section = {"text_fingerprint": "0" * 64, "window_len": 32, "n_windows": 4, "n_groups": 2}
    at = signed_in("export", {"existing": _tiny_plan(team, {**section, "text": str(outside / "private.txt")}).to_dict(),
                              "missing": _tiny_plan(team, {**section, "text": str(outside / "absent.txt")}).to_dict()},
                  clean=False)
    errors = {}
    for name in ("existing", "missing"):
        at.selectbox(key="export_saved_plan").set_value(name).run()
        assert not at.exception
        errors[name] = [e.value for e in at.error]
        assert not [b for b in at.button if b.key == "export_model"]
    assert errors["existing"] == errors["missing"] and len(errors["existing"]) == 1
    assert str(team["tmp"].resolve()) in errors["existing"][0]


def _sidebar_errors(at: AppTest, key: str, value: str) -> list[str]:
    at.sidebar.text_input(key=key).set_value(value).run()
    assert not at.exception
    assert not at.metric and not at.dataframe  # the page stops at the refusal
    return [e.value for e in at.error]


def test_share_mode_refuses_model_and_text_paths_outside_the_roots_alike_whether_they_exist_or_not(team):
    outside = team["outside"]
    at = signed_in()
    assert has_metric("Architecture")(at)  # the tiny model and the texts are inside the roots
    existing_model = _sidebar_errors(at, "model_custom", str(outside / "model"))
    missing_model = _sidebar_errors(at, "model_custom", str(outside / "no-such-model"))
    escaping_model = _sidebar_errors(at, "model_custom", str(team["tmp"] / ".." / outside.name / "model"))
    assert existing_model == missing_model == escaping_model and len(existing_model) == 1
    assert str(team["tmp"].resolve()) in existing_model[0] and "registry" in existing_model[0]
    at.sidebar.text_input(key="model_custom").set_value("").run()
    assert_clean(at)

    for key in ("calibration_file", "evaluation_file"):
        configured = at.sidebar.text_input(key=key).value  # the workbench's text, inside the roots
        existing_text = _sidebar_errors(at, key, str(outside / "private.txt"))
        missing_text = _sidebar_errors(at, key, str(outside / "absent.txt"))
        assert existing_text == missing_text and len(existing_text) == 1
        assert str(team["workspace"].resolve()) in existing_text[0]
        at.sidebar.text_input(key=key).set_value(configured).run()
    assert_clean(at)
    assert has_metric("Architecture")(at)


def test_local_mode_is_unchanged(workbench, tmp_path, monkeypatch):
    """No secret asked (even when one is set), any path read, the export default under the project's exports/."""
    monkeypatch.delenv("RANKSCOPE_SHARE", raising=False)
    monkeypatch.setenv("RANKSCOPE_SECRET", SECRET)
    monkeypatch.setenv("RANKSCOPE_ALLOWED_ROOTS", str(tmp_path / "nothing-here"))
    monkeypatch.delenv("RANKSCOPE_WORKSPACE", raising=False)
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert_clean(at)
    assert "access_secret" not in {t.key for t in at.text_input} and has_metric("Architecture")(at)
    at.sidebar.text_input(key="model_custom").set_value("/no/such/model").run()
    assert "No model found for '/no/such/model'" in at.error[0].value
    at.sidebar.text_input(key="model_custom").set_value("").run()
    assert_clean(at)

    at.session_state["alloc_saved_plans"] = {"by-hand": _tiny_plan(workbench).to_dict()}
    at.switch_page("../pages/export.py").run()
    assert_clean(at)
    assert at.text_input(key="export_dir.by-hand").value.startswith(str(PROJECT_ROOT / "exports") + os.sep)
    at.text_input(key="export_dir.by-hand").set_value(str(tmp_path / "anywhere")).run()
    assert_clean(at)
    assert not at.button(key="export_model").disabled


def test_local_mode_refuses_to_listen_beyond_this_machine(workbench, monkeypatch):
    """`streamlit run --server.address 0.0.0.0` without share mode would serve the team unauthenticated."""
    monkeypatch.delenv("RANKSCOPE_SHARE", raising=False)
    previous = st_config.get_option("server.address")
    st_config.set_option("server.address", "0.0.0.0")
    try:
        at = AppTest.from_file(APP, default_timeout=120).run()
        assert not at.exception
        [error] = at.error
        assert "0.0.0.0" in error.value and "RANKSCOPE_SHARE" in error.value
        assert not at.title and not at.metric
        st_config.set_option("server.address", "127.0.0.1")
        at.run()
        assert_clean(at)
        assert has_metric("Architecture")(at)
    finally:
        st_config.set_option("server.address", previous)
