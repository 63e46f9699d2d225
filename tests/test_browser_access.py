"""Serving a team in a real browser: Debian's chromium, driven by Playwright, against the app in share mode.

The same gate and path policy as tests/test_app_access.py (app/access.py, DESIGN.md §14), but through a live
server bound to 127.0.0.1 on the tiny llama model: before the shared secret nothing of the workbench is drawn,
a wrong secret is refused, the right one opens the workbench, and in that session a model path outside the
allowed roots is refused with a message naming the roots, the same whether the path exists or not. The server
set-up and the page helpers come from tests/test_browser.py; a failure leaves a screenshot under
`test-output/screenshots-access/`, and the server is stopped whatever happens.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from engine.paths import PROJECT_ROOT
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, Browser, app_server
from tests.test_browser import tiny_setup  # noqa: F401 (a fixture)

SECRET = "correct horse battery staple"
SECRET_LABEL = "Team secret"
MODEL_LABEL = "...or a model directory, .gguf file or hub id"  # the sidebar's (app/workspace.py)
WAIT_MS = 60_000


def workbench_shown(b: Browser) -> dict[str, int]:
    """How many of the workbench's landmarks the page shows (all 0 behind the gate)."""
    page = b.page
    return {
        "sidebar": page.locator('[data-testid="stSidebar"]').count(),
        "page links": page.locator('[data-testid="stSidebarNav"]').count(),
        "model input": page.locator(f'input[aria-label="{MODEL_LABEL}"]').count(),
        "heading": page.get_by_role("heading", name="RankScope", exact=True).count(),
        "metrics": page.locator('[data-testid="stMetric"]').count(),
    }


ALERT = '[data-testid="stAlertContainer"]'  # st.error's box


def errors(b: Browser, expected: bool = False) -> list[str]:
    """The texts of the error boxes shown; with `expected`, once at least one has been drawn."""
    if expected:
        b.page.locator(ALERT).first.wait_for(timeout=WAIT_MS)
        b.settle()
    return [text.strip() for text in b.page.locator(ALERT).all_inner_texts()]


def submit_secret(b: Browser, secret: str) -> None:
    b.page.locator(f'input[aria-label="{SECRET_LABEL}"]').fill(secret)
    b.page.get_by_role("button", name="Enter", exact=True).click()
    b.settle()


def test_share_mode_in_chromium_asks_for_the_secret_and_keeps_paths_inside_the_roots(
        tiny_setup, tiny_model_dirs, tmp_path, tmp_path_factory):  # noqa: F811 (tiny_setup is the imported fixture)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    outside = tmp_path_factory.mktemp("outside")  # beside tmp_path, in no root
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text((tiny_model_dirs["llama"] / "config.json").read_text())
    setup = dataclasses.replace(
        tiny_setup, wait_ms=WAIT_MS, screenshots=PROJECT_ROOT / "test-output" / "screenshots-access",
        extra_env={**tiny_setup.extra_env, "RANKSCOPE_SHARE": "1", "RANKSCOPE_SECRET": SECRET,
                   "RANKSCOPE_WORKSPACE": str(workspace),  # the texts are in tmp_path, the model beside its siblings
                   "RANKSCOPE_ALLOWED_ROOTS": os.pathsep.join([str(tmp_path), str(tiny_model_dirs["llama"].parent)])})
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: run `make setup` (it installs Debian's chromium).")
    from playwright.sync_api import sync_playwright

    with app_server(setup, tmp_path / "server-cache", tmp_path / "server.log") as url:
        assert url.startswith("http://127.0.0.1:")
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                b = Browser(chromium.new_page(viewport={"width": 1440, "height": 1100}), WAIT_MS, setup.screenshots)
                try:
                    _check_the_gate_and_the_roots(b, url, tmp_path, tiny_model_dirs["llama"].parent, outside)
                except Exception:
                    b.screenshot("failed", settle=False)
                    raise
            finally:
                chromium.close()


def _check_the_gate_and_the_roots(b: Browser, url: str, tmp_path, model_root, outside) -> None:
    page = b.page
    nothing = {"sidebar": 0, "page links": 0, "model input": 0, "heading": 0, "metrics": 0}

    # 1. before the secret: the prompt, and nothing of the workbench
    page.goto(url, timeout=WAIT_MS)
    page.locator(f'input[aria-label="{SECRET_LABEL}"]').wait_for(timeout=WAIT_MS)
    b.settle()
    assert workbench_shown(b) == nothing
    assert errors(b) == []

    # 2. a wrong secret: refused, still nothing of the workbench, the prompt again
    submit_secret(b, "wrong secret")
    assert errors(b, expected=True) == ["Wrong secret."]
    assert workbench_shown(b) == nothing
    assert page.locator(f'input[aria-label="{SECRET_LABEL}"]').count() == 1

    # 3. the right secret: the workbench (sidebar, page links, the first page on the tiny model), no prompt
    submit_secret(b, SECRET)
    page.get_by_role("heading", name="RankScope", exact=True).wait_for(timeout=WAIT_MS)
    page.locator(f'input[aria-label="{SECRET_LABEL}"]').wait_for(state="detached", timeout=WAIT_MS)  # prompt gone
    assert b.metric("Architecture") == "llama"  # the model and texts inside the roots load
    b.settle()
    shown = workbench_shown(b)
    assert all(shown[name] >= 1 for name in nothing), shown
    assert errors(b) == []

    # 4. in that session: a model outside the roots is refused naming the roots, alike whether it exists or not
    refusals = {}
    for name, path in (("existing", outside / "model"), ("missing", outside / "no-such-model")):
        b.fill(MODEL_LABEL, str(path))
        refusals[name] = errors(b, expected=True)
        assert page.locator('[data-testid="stMetric"]').count() == 0  # the page stops at the refusal
        b.fill(MODEL_LABEL, "")  # back inside the roots, so the next refusal is drawn afresh
        page.locator(ALERT).first.wait_for(state="detached", timeout=WAIT_MS)
        assert b.metric("Architecture") == "llama"
    [refusal] = refusals["existing"]
    assert refusals["missing"] == [refusal]
    assert refusal.startswith("Model: This shared app loads a registry model")
    assert str(tmp_path.resolve()) in refusal and str(model_root.resolve()) in refusal  # the allowed roots
    assert str(outside.resolve()) not in refusal  # never the typed path
