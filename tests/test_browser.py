"""The workbench in a real browser: Debian's chromium, driven by Playwright, against a live app server.

One walk, Model -> Spectra -> Sensitivity -> Allocate -> Search -> Recover -> Export (calibrate, compute
spectra, run a per-type sweep, apply a plan, run a short study and keep its best plan, recover it for
two steps, export that plan and generate from it), on two set-ups:
- the tiny llama model with small windows (in `make test`): the numbers the pages show are checked
  against the engine's for the same settings, computed independently in a separate cache; its
  screenshots under `test-output/screenshots/` are the README tour;
- the real default model with short windows (`make test-slow`): the whole mission in the browser on
  SmolLM2-135M from an empty cache; the shown numbers are checked against the engine reading the
  server's cache afterwards; screenshots under `test-output/screenshots-real/`.
Every run saves a screenshot of every page and stops the server whatever happens. Chromium comes
from `make setup` (`apt-get install chromium`); `playwright install` is never run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.compression.grouping import Grouping, ranks_from_ratios
from engine.compression.session import CompressionSession
from engine.compression.sweep import sweep_by_type
from engine.texts.settings import TextSettings
from engine.compression.units import count_parameters
from engine.energy import rank_table
from engine.models.loading import load_model
from engine.paths import PROJECT_ROOT
from engine.search.runner import StudyRunner, create_study
from engine.search.settings import StudySettings
from engine.store import open_store
from engine.search.duckdb_storage import DuckDBStudyStorage
from engine.texts.windows import Windowing
from engine.cache.evaluation import ensure_baseline_evaluation
from engine.cache.calibration import ensure_calibration
from engine.cache.spectra import ensure_spectra
from tests.tiny_models import TRAINING_TEXT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
METHOD, DEFAULT_RATIO = "feature-pca", 0.2  # the Allocate page's defaults
# a short study: 4 trials (3 random first), on 4 sensitive windows of 8 candidates found by 2 probes
STUDY_PAGE_FIELDS = {"Trials": "4", "Initial random points": "3", "Candidate windows": "8", "Subset size": "4",
                     "Probe plans": "2"}
# short enough for the tiny model's texts (4 calibration windows, then 4 training and 1 validation window)
RECOVERY_PAGE_FIELDS = {"Steps": "2", "Windows per step": "1", "Training windows": "4", "Validation windows": "1"}
STUDY_SETTINGS = dict(n_trials=4, n_initial_points=3, subset_candidates=8, subset_size=4, subset_probe_plans=2)


@dataclass(frozen=True)
class WalkSetup:
    """What the app is started on (passed as the sidebar's environment defaults) and how long to wait."""

    model: str
    texts: TextSettings
    budget: float  # the study's
    screenshots: Path
    wait_ms: int
    extra_env: dict = field(default_factory=dict)

    def env(self, cache: Path) -> dict:
        t = self.texts
        return {
            **os.environ,
            "RANKSCOPE_MODEL": self.model,
            "RANKSCOPE_CACHE": str(cache),
            "RANKSCOPE_CALIBRATION_TEXT": t.calibration_text,
            "RANKSCOPE_EVALUATION_TEXT": t.evaluation_text,
            "RANKSCOPE_WINDOW_LEN": str(t.evaluation_windowing.window_len),
            "RANKSCOPE_CALIBRATION_WINDOWS": str(t.calibration_windowing.n_windows),
            "RANKSCOPE_EVALUATION_WINDOWS": str(t.evaluation_windowing.n_windows),
            "RANKSCOPE_GROUPS": str(t.n_groups),
            "RANKSCOPE_METHOD": METHOD,
            **self.extra_env,
        }

    def study_settings(self) -> StudySettings:
        return StudySettings(model=self.model, method=METHOD, texts=self.texts, budget=self.budget, **STUDY_SETTINGS)


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


@contextmanager
def app_server(setup: WalkSetup, cache: Path, log: Path):
    """A live app for `setup` with its own cache; yields its URL and stops it afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=PROJECT_ROOT, env=setup.env(cache), stdout=output, stderr=subprocess.STDOUT,
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


def engine_numbers(setup: WalkSetup, run_study: bool) -> dict:
    """What the pages should show, from the engine in the current cache (`$RANKSCOPE_CACHE`).

    With `run_study` the engine runs the walk's sweep and the page's study itself (same settings, seed and
    priors, so the same trials); otherwise it reads the study the page ran from the store.
    """
    texts = setup.texts
    store = open_store()
    loaded = load_model(setup.model, store)
    baseline = ensure_baseline_evaluation(store, loaded, texts.evaluation_text, texts.evaluation_windowing)
    calibration = ensure_calibration(store, loaded, texts.calibration_text, texts.calibration_windowing, texts.n_groups)
    spectra = ensure_spectra(store, loaded, calibration)
    spectrum = next(row for row in rank_table(spectra.weight, spectra.feature) if row["layer"] == 0 and row["type"] == "q")
    session = CompressionSession.open(store, loaded, METHOD, texts)
    groups = Grouping("5x1").groups(session.shapes, METHOD)
    ranks = ranks_from_ratios(groups, {name: DEFAULT_RATIO for name in groups})
    evaluated = session.evaluate(session.plan(ranks))
    storage = DuckDBStudyStorage(store)
    if run_study:  # as the walk: the per-type sweep at the default grid first (greedy and the global allocation
        sweep_by_type(session)  # are told to the search, so the study depends on it)
        create_study(storage, session, setup.study_settings(), name="walk")
        StudyRunner(storage, session, "walk").run()
    return {
        "baseline_perplexity": baseline.perplexity,
        "spectrum": spectrum,
        "counts": count_parameters(session.shapes, METHOD, ranks),
        "metrics": evaluated.metrics,
        "original_perplexity": session.reference.perplexity,
        "study_best_perplexity": storage.results("walk")["best"]["perplexity"],
    }


class Browser:
    """One chromium page on the app, with the waits a Streamlit page needs."""

    def __init__(self, page, wait_ms: int, screenshots: Path):
        self.page, self.wait_ms, self.screenshots = page, wait_ms, screenshots

    def metric(self, label: str) -> str:
        """The shown value of the `st.metric` whose label is exactly `label`."""
        page = self.page
        label_pattern = re.compile(rf"^\s*{re.escape(label)}\s*$")
        metric = page.locator('[data-testid="stMetric"]').filter(
            has=page.locator('[data-testid="stMetricLabel"]', has_text=label_pattern))
        metric.first.wait_for(timeout=self.wait_ms)
        return metric.first.locator('[data-testid="stMetricValue"]').inner_text().strip()

    def open_page(self, title: str) -> None:
        self.page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=title).click()
        self.page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=self.wait_ms)
        self.settle()  # the previous page's elements linger until the new page's first run ends

    def settle(self) -> None:
        """Wait until the app has finished its current run (the header's running indicator is gone)."""
        self.page.wait_for_timeout(300)
        self.page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=self.wait_ms)

    def screenshot(self, name: str, settle: bool = True) -> None:
        """The whole page: the viewport is stretched to the content's height, since the app scrolls inside it."""
        page = self.page
        if settle:
            self.settle()
        self.screenshots.mkdir(parents=True, exist_ok=True)
        viewport = page.viewport_size
        height = page.evaluate("() => Math.max(...Array.from(document.querySelectorAll('section, div'))"
                               ".map(element => element.scrollHeight))")
        page.set_viewport_size({"width": viewport["width"], "height": max(viewport["height"], min(height, 8000))})
        page.wait_for_timeout(1000)  # let plotly redraw at the new size
        page.screenshot(path=str(self.screenshots / f"{name}.png"))
        page.set_viewport_size(viewport)

    def fill(self, label: str, value: str) -> None:
        """Type into the text or number input labelled `label` and commit it (Enter), then wait for the rerun."""
        field = self.page.locator(f'input[aria-label="{label}"]')  # not a heading of the same name
        field.fill(value)
        field.press("Enter")
        self.settle()

    def wait_for(self, script: str) -> None:
        self.page.wait_for_function(script, timeout=self.wait_ms)


def walk_the_mission(url: str, setup: WalkSetup, export_dir: Path) -> dict:
    """Drive every page in headless chromium; returns what the pages showed."""
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: run `make setup` (it installs Debian's chromium).")
    from playwright.sync_api import sync_playwright

    shown = {}
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            b = Browser(chromium.new_page(viewport={"width": 1440, "height": 1100}), setup.wait_ms, setup.screenshots)
            try:
                _walk_pages(b, url, setup, export_dir, shown)
            except Exception:
                b.screenshot("failed", settle=False)  # where the walk stopped, as it stands
                raise
        finally:
            chromium.close()
    return shown


def _walk_pages(b: Browser, url: str, setup: WalkSetup, export_dir: Path, shown: dict) -> None:
    page = b.page
    page.goto(url, timeout=setup.wait_ms)

    # Model & texts: the original perplexity, then a calibration run with its progress
    shown["baseline_perplexity"] = float(b.metric("Perplexity"))
    shown["predicted_tokens"] = b.metric("Predicted tokens")
    page.get_by_role("button", name="Run calibration").click()
    page.get_by_text(re.compile(r"Cached: [\d,]+ tokens in \d+ windows")).wait_for(timeout=setup.wait_ms)
    b.screenshot("01-model")

    # Spectra: compute, then read the ranks for layer 0, q at 90% energy
    b.open_page("Spectra")
    page.get_by_role("button", name="Compute spectra").click()
    shown["full_rank"] = b.metric("Full rank")
    shown["weight_rank_90"] = b.metric("Weight rank for 90%")
    shown["feature_rank_90"] = b.metric("Feature rank for 90%")
    b.wait_for("() => document.querySelectorAll('.js-plotly-plot').length === 3")
    b.screenshot("02-spectra")

    # Sensitivity: a per-type sweep at the default grid, drawn from the store when it ends
    b.open_page("Sensitivity")
    page.get_by_role("button", name="Run per-type sweep").click()
    page.locator(".js-plotly-plot").first.wait_for(timeout=setup.wait_ms)  # points arrive (live while it runs)
    b.wait_for("() => document.querySelectorAll('[data-testid=stProgress]').length === 0")  # and it has ended
    page.get_by_text("No sensitivity points stored").wait_for(state="detached", timeout=setup.wait_ms)
    b.screenshot("03-sensitivity")

    # Allocate: the budget meter, then Apply and the measured quality
    b.open_page("Allocate")
    for label in ("Decoder-linear parameters", "Model parameters", "Removed from decoder linears"):
        shown[label] = b.metric(label)
    page.get_by_role("button", name="Apply", exact=True).click()
    b.metric("Original perplexity")  # shown once the evaluation has finished
    for label in ("Perplexity", "Original perplexity", "KL(P_orig‖P_comp)", "KL(P_comp‖P_orig)"):
        shown[f"applied {label}"] = float(b.metric(label))
    b.screenshot("04-allocate")

    # Search: a short study, watched until it has re-measured its best plan on the full text
    b.open_page("Search")
    b.fill("Budget: share of decoder-linear parameters removed", f"{setup.budget:.2f}")
    for label, value in STUDY_PAGE_FIELDS.items():
        b.fill(label, value)
    b.fill("Study name (optional; also its id)", "walk")
    page.get_by_role("button", name="Start study").click()
    b.metric("Trials")  # trials arrive while it runs
    b.wait_for("() => Array.from(document.querySelectorAll('[data-testid=stMetric]')).some(m => "
               "m.innerText.includes('Best perplexity (full text)') && /\\d/.test("
               "m.querySelector('[data-testid=stMetricValue]').innerText))")
    shown["study_best_perplexity"] = float(b.metric("Best perplexity (full text)"))
    shown["trials"] = b.metric("Trials")
    b.wait_for("() => document.querySelectorAll('.js-plotly-plot').length === 3")
    page.get_by_role("button", name="Use best plan").click()
    page.get_by_text("'walk-best' is in the saved plans").wait_for(timeout=setup.wait_ms)
    b.screenshot("05-search")

    # Recover: two subspace steps on the study's best plan, watched to the end
    b.open_page("Recover")
    for label, value in RECOVERY_PAGE_FIELDS.items():
        b.fill(label, value)
    page.get_by_role("button", name="Start recovery").click()
    page.get_by_text("Finished.", exact=True).wait_for(timeout=setup.wait_ms)
    shown["recovery_steps"] = b.metric("Steps")
    b.wait_for("() => document.querySelectorAll('.js-plotly-plot').length === 1")
    b.screenshot("06-recover")

    # Export: the study's best plan, written to a directory, reloaded and re-measured; then generate
    b.open_page("Export")
    b.fill("Directory", str(export_dir))
    page.get_by_role("button", name="Export", exact=True).click()
    shown["reload_check"] = b.metric("Reload check")
    shown["export_perplexity"] = float(b.metric("Perplexity"))
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("Greedy decoding,").wait_for(timeout=setup.wait_ms)
    b.screenshot("07-export")


def check_shown_numbers(shown: dict, expected: dict, setup: WalkSetup, export_dir: Path) -> None:
    windowing = setup.texts.evaluation_windowing
    assert shown["baseline_perplexity"] == pytest.approx(expected["baseline_perplexity"], abs=1e-3)
    assert shown["predicted_tokens"] == f"{windowing.n_windows * (windowing.window_len - 1):,}"
    spectrum = expected["spectrum"]
    assert shown["full_rank"] == str(spectrum["full_rank"])
    assert shown["weight_rank_90"] == str(spectrum["weight_rank"]["0.9"])
    assert shown["feature_rank_90"] == str(spectrum["feature_rank"]["0.9"])
    counts = expected["counts"]
    assert shown["Decoder-linear parameters"] == f"{counts.decoder_compressed:,}"
    assert shown["Model parameters"] == f"{counts.total_compressed:,}"
    assert shown["Removed from decoder linears"] == f"{counts.decoder_reduction:.2%}"
    metrics = expected["metrics"]
    assert shown["applied Perplexity"] == pytest.approx(metrics["perplexity"], abs=2e-3)
    assert shown["applied Original perplexity"] == pytest.approx(expected["original_perplexity"], abs=2e-3)
    assert shown["applied KL(P_orig‖P_comp)"] == pytest.approx(metrics["kl_forward"], rel=1e-2, abs=1e-7)
    assert shown["applied KL(P_comp‖P_orig)"] == pytest.approx(metrics["kl_reverse"], rel=1e-2, abs=1e-7)
    assert shown["study_best_perplexity"] == pytest.approx(expected["study_best_perplexity"], abs=2e-3)
    assert shown["trials"] == f"{STUDY_SETTINGS['n_trials']}/{STUDY_SETTINGS['n_trials']}"
    assert shown["recovery_steps"] == RECOVERY_PAGE_FIELDS["Steps"]
    assert shown["reload_check"] == "passed"
    assert shown["export_perplexity"] == pytest.approx(shown["study_best_perplexity"], abs=2e-3)
    assert (export_dir / "model.safetensors").is_file()


@pytest.fixture
def tiny_setup(tiny_model_dirs, tmp_path) -> WalkSetup:
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    calibration.write_text(TRAINING_TEXT * 20)
    evaluation.write_text("An evaluation text, held out from calibration. " + TRAINING_TEXT * 20)
    texts = TextSettings(str(calibration), Windowing(32, 4), 2, str(evaluation), Windowing(32, 2))
    # one thread, as the engine side of this test (single_torch_thread): the same numbers, no oversubscription
    return WalkSetup(str(tiny_model_dirs["llama"]), texts, budget=0.3, wait_ms=120_000,
                     screenshots=PROJECT_ROOT / "test-output" / "screenshots", extra_env={"OMP_NUM_THREADS": "1"})


def test_walk_the_mission_on_a_tiny_model_in_chromium(tiny_setup, tmp_path):
    expected = engine_numbers(tiny_setup, run_study=True)  # in this test's own cache, before the server starts
    export_dir = tmp_path / "walk-export"
    with app_server(tiny_setup, tmp_path / "server-cache", tmp_path / "server.log") as url:
        shown = walk_the_mission(url, tiny_setup, export_dir)
    check_shown_numbers(shown, expected, tiny_setup, export_dir)


@pytest.mark.slow
def test_walk_the_mission_on_the_default_model_in_chromium(real_model_dir, tmp_path, monkeypatch):
    """The issue's "done when": the whole mission in the browser on SmolLM2-135M, from an empty cache.

    Short windows keep it to minutes: calibration 16 x 128 tokens of War and Peace (4 covariance
    groups), evaluation 4 x 128 tokens of Sherlock Holmes, a 4-trial study at the 20% budget.
    """
    texts = TextSettings("war-and-peace", Windowing(128, 16), 4, "sherlock-holmes", Windowing(128, 4))
    setup = WalkSetup(str(real_model_dir), texts, budget=0.2, wait_ms=900_000,
                      screenshots=PROJECT_ROOT / "test-output" / "screenshots-real")
    cache, export_dir = tmp_path / "server-cache", tmp_path / "walk-export"
    with app_server(setup, cache, tmp_path / "server.log") as url:
        shown = walk_the_mission(url, setup, export_dir)
    monkeypatch.setenv("RANKSCOPE_CACHE", str(cache))  # the server has stopped: read what it wrote
    check_shown_numbers(shown, engine_numbers(setup, run_study=False), setup, export_dir)
