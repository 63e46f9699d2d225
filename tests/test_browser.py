"""The workbench in a real browser: Debian's chromium, driven by Playwright, against a live app server.

Starts `streamlit run app/main.py` on a free local port with the tiny llama model, small windows and
a temporary cache; walks Model -> Spectra -> Sensitivity -> Allocate -> Search -> Export (calibrate,
compute spectra, run a per-type sweep, apply a plan, run a short study and keep its best plan,
export that plan and generate from it); checks that the numbers the pages show equal the engine's
for the same settings (computed here, in a separate cache); saves a screenshot of every page under
`test-output/screenshots/` (used by the README tour); and stops the server whatever happens.
Chromium comes from `make setup` (`apt-get install chromium`); `playwright install` is never run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.compression.grouping import Grouping, ranks_from_ratios
from engine.compression.session import CompressionSession, TextSettings
from engine.compression.units import count_parameters
from engine.energy import rank_table
from engine.models.loading import load_model
from engine.paths import PROJECT_ROOT
from engine.search.runner import StudyRunner, create_study
from engine.search.settings import StudySettings
from engine.store import open_store
from engine.store.study_storage import DuckDBStudyStorage
from engine.texts.windows import Windowing
from engine.workspace import ensure_baseline_evaluation, ensure_calibration, ensure_spectra
from tests.tiny_models import TRAINING_TEXT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = PROJECT_ROOT / "test-output" / "screenshots"
WINDOW_LEN, CALIBRATION_WINDOWS, EVALUATION_WINDOWS, GROUPS = 32, 4, 2, 2
METHOD, DEFAULT_RATIO = "feature-pca", 0.2  # the Allocate page's defaults
# a short study: 4 trials (3 random first) at budget 0.3, on 4 sensitive windows of 8 candidates found by 2 probes
STUDY = {"Budget: share of decoder-linear parameters removed": "0.30", "Trials": "4", "Initial random points": "3",
         "Candidate windows": "8", "Subset size": "4", "Probe plans": "2"}
STUDY_SETTINGS = dict(budget=0.3, n_trials=4, n_initial_points=3, subset_candidates=8, subset_size=4,
                      subset_probe_plans=2)
WAIT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"The app server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"The app server did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def texts(tmp_path) -> TextSettings:
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    calibration.write_text(TRAINING_TEXT * 20)
    evaluation.write_text("An evaluation text, held out from calibration. " + TRAINING_TEXT * 20)
    return TextSettings(str(calibration), Windowing(WINDOW_LEN, CALIBRATION_WINDOWS), GROUPS,
                        str(evaluation), Windowing(WINDOW_LEN, EVALUATION_WINDOWS))


@pytest.fixture
def app_server(tiny_model_dirs, texts, tmp_path):
    """A live app on the tiny llama model with its own cache; yields its URL and stops it afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "RANKSCOPE_MODEL": str(tiny_model_dirs["llama"]),
        "RANKSCOPE_CACHE": str(tmp_path / "server-cache"),
        "RANKSCOPE_CALIBRATION_TEXT": texts.calibration_text,
        "RANKSCOPE_EVALUATION_TEXT": texts.evaluation_text,
        "RANKSCOPE_WINDOW_LEN": str(WINDOW_LEN),
        "RANKSCOPE_CALIBRATION_WINDOWS": str(CALIBRATION_WINDOWS),
        "RANKSCOPE_EVALUATION_WINDOWS": str(EVALUATION_WINDOWS),
        "RANKSCOPE_GROUPS": str(GROUPS),
        "RANKSCOPE_METHOD": METHOD,
        "OMP_NUM_THREADS": "1",  # as the engine side of this test (single_torch_thread): the same numbers, no oversubscription
    }
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=PROJECT_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_healthy(url, server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)


@pytest.fixture
def engine_numbers(tiny_model_dirs, texts) -> dict:
    """What the pages should show, computed by the engine directly (in this test's own cache)."""
    store = open_store()
    loaded = load_model(str(tiny_model_dirs["llama"]), store)
    baseline = ensure_baseline_evaluation(store, loaded, texts.evaluation_text, texts.evaluation_windowing)
    calibration = ensure_calibration(store, loaded, texts.calibration_text, texts.calibration_windowing, GROUPS)
    spectra = ensure_spectra(store, loaded, calibration)
    spectrum = next(row for row in rank_table(spectra.weight, spectra.feature) if row["layer"] == 0 and row["type"] == "q")
    session = CompressionSession.open(store, loaded, METHOD, texts)
    groups = Grouping("5x1").groups(session.shapes, METHOD)
    ranks = ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups})
    evaluated = session.evaluate(session.plan(ranks))
    storage = DuckDBStudyStorage(store)  # the same study as the Search page runs (same seed, same windows)
    texts_section = {"calibration_text": texts.calibration_text, "calibration_windows": CALIBRATION_WINDOWS,
                     "evaluation_text": texts.evaluation_text, "evaluation_windows": EVALUATION_WINDOWS,
                     "window_len": WINDOW_LEN, "groups": GROUPS}
    settings = StudySettings(model=str(tiny_model_dirs["llama"]), method=METHOD, texts=texts_section, **STUDY_SETTINGS)
    create_study(storage, session, settings, name="walk")
    StudyRunner(storage, session, "walk").run()
    return {
        "baseline_perplexity": baseline.perplexity,
        "spectrum": spectrum,
        "counts": count_parameters(session.shapes, METHOD, ranks),
        "metrics": evaluated.metrics,
        "original_perplexity": session.reference.perplexity,
        "study_best_perplexity": storage.results("walk")["best"]["perplexity"],
    }


def _metric(page, label: str) -> str:
    """The shown value of the `st.metric` whose label is exactly `label`."""
    label_pattern = re.compile(rf"^\s*{re.escape(label)}\s*$")
    metric = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=label_pattern))
    metric.first.wait_for(timeout=WAIT_MS)
    return metric.first.locator('[data-testid="stMetricValue"]').inner_text().strip()


def _open_page(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=WAIT_MS)
    _settle(page)  # the previous page's elements linger until the new page's first run ends


def _settle(page) -> None:
    """Wait until the app has finished its current run (the header's running indicator is gone)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=WAIT_MS)


def _screenshot(page, name: str) -> None:
    """The whole page: the viewport is stretched to the content's height, since the app scrolls inside it."""
    _settle(page)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    viewport = page.viewport_size
    height = page.evaluate("() => Math.max(...Array.from(document.querySelectorAll('section, div'))"
                           ".map(element => element.scrollHeight))")
    page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], min(height, 8000))})
    page.wait_for_timeout(1000)  # let plotly redraw at the new size
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    page.set_viewport_size(viewport)


def _fill(page, label: str, value: str) -> None:
    """Type into the text or number input labelled `label` and commit it (Enter), then wait for the rerun."""
    field = page.get_by_label(label, exact=True)
    field.fill(value)
    field.press("Enter")
    _settle(page)


def test_walk_model_spectra_sensitivity_allocate_search_export_in_chromium(app_server, engine_numbers, tmp_path):
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: run `make setup` (it installs Debian's chromium).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.goto(app_server, timeout=WAIT_MS)

            # Model & texts: the original perplexity, then a calibration run with its progress
            assert float(_metric(page, "Perplexity")) == pytest.approx(engine_numbers["baseline_perplexity"], abs=1e-3)
            assert _metric(page, "Predicted tokens") == f"{EVALUATION_WINDOWS * (WINDOW_LEN - 1)}"
            page.get_by_role("button", name="Run calibration").click()
            page.get_by_text(re.compile(r"Cached: [\d,]+ tokens in \d+ windows")).wait_for(timeout=WAIT_MS)
            _screenshot(page, "01-model")

            # Spectra: compute, then read the ranks for layer 0, q at 90% energy
            _open_page(page, "Spectra")
            page.get_by_role("button", name="Compute spectra").click()
            spectrum = engine_numbers["spectrum"]
            assert _metric(page, "Full rank") == str(spectrum["full_rank"])
            assert _metric(page, "Weight rank for 90%") == str(spectrum["weight_rank"]["0.9"])
            assert _metric(page, "Feature rank for 90%") == str(spectrum["feature_rank"]["0.9"])
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length === 3", timeout=WAIT_MS)
            _screenshot(page, "02-spectra")

            # Sensitivity: a per-type sweep at the default grid, drawn from the store when it ends
            _open_page(page, "Sensitivity")
            page.get_by_role("button", name="Run per-type sweep").click()
            page.locator(".js-plotly-plot").first.wait_for(timeout=WAIT_MS)  # points arrive (live while it runs)
            page.wait_for_function("() => document.querySelectorAll('[data-testid=stProgress]').length === 0",
                                   timeout=WAIT_MS)  # and the sweep has ended
            page.get_by_text("No sensitivity points stored").wait_for(state="detached", timeout=WAIT_MS)
            _screenshot(page, "03-sensitivity")

            # Allocate: the budget meter, then Apply and the measured quality
            _open_page(page, "Allocate")
            counts = engine_numbers["counts"]
            assert _metric(page, "Decoder-linear parameters") == f"{counts.decoder_compressed:,}"
            assert _metric(page, "Model parameters") == f"{counts.total_compressed:,}"
            assert _metric(page, "Removed from decoder linears") == f"{counts.decoder_reduction:.2%}"
            page.get_by_role("button", name="Apply", exact=True).click()
            _metric(page, "Original perplexity")  # shown once the evaluation has finished
            shown = float(_metric(page, "Perplexity"))
            assert shown == pytest.approx(engine_numbers["metrics"]["perplexity"], abs=2e-3)
            assert float(_metric(page, "Original perplexity")) == pytest.approx(
                engine_numbers["original_perplexity"], abs=2e-3)
            assert float(_metric(page, "KL(P_orig‖P_comp)")) == pytest.approx(
                engine_numbers["metrics"]["kl_forward"], rel=1e-2, abs=1e-7)
            assert float(_metric(page, "KL(P_comp‖P_orig)")) == pytest.approx(
                engine_numbers["metrics"]["kl_reverse"], rel=1e-2, abs=1e-7)
            _screenshot(page, "04-allocate")

            # Search: a short study, watched until it has re-measured its best plan on the full text
            _open_page(page, "Search")
            for label, value in STUDY.items():
                _fill(page, label, value)
            _fill(page, "Study name (optional; also its id)", "walk")
            page.get_by_role("button", name="Start study").click()
            _metric(page, "Trials")  # trials arrive while it runs
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('[data-testid=stMetric]')).some(m => "
                "m.innerText.includes('Best perplexity (full text)') && /\\d/.test("
                "m.querySelector('[data-testid=stMetricValue]').innerText))", timeout=WAIT_MS)
            best = float(_metric(page, "Best perplexity (full text)"))
            assert best == pytest.approx(engine_numbers["study_best_perplexity"], abs=2e-3)
            assert _metric(page, "Trials") == "4/4"
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length === 3", timeout=WAIT_MS)
            page.get_by_role("button", name="Use best plan").click()
            page.get_by_text("'walk-best' is in the saved plans").wait_for(timeout=WAIT_MS)
            _screenshot(page, "05-search")

            # Export: the study's best plan, written to a temporary directory, reloaded and re-measured
            _open_page(page, "Export")
            _fill(page, "Directory", str(tmp_path / "walk-export"))
            page.get_by_role("button", name="Export", exact=True).click()
            assert _metric(page, "Reload check") == "passed"
            assert float(_metric(page, "Perplexity")) == pytest.approx(best, abs=2e-3)
            assert (tmp_path / "walk-export" / "model.safetensors").is_file()
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("Greedy decoding,").wait_for(timeout=WAIT_MS)
            _screenshot(page, "06-export")
        finally:
            browser.close()
