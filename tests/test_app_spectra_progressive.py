"""AppTest of the Spectra page on a cold cache: weight spectra at once, a calibration snapshot's spectra with
"refining: n/N windows" while the calibration runs, then the final stored spectra."""

from __future__ import annotations

import threading

from tests.app_testing import assert_clean, chart_keys, has_metric, no_running_jobs, open_app, run_until
from tests.app_testing import workbench  # noqa: F401 (a fixture)


def _refining(at) -> bool:
    return any("refining: 8/16 windows" in caption.value for caption in at.caption)


def test_spectra_page_shows_the_refining_snapshot_then_the_final_spectra(workbench, monkeypatch):
    import app.tasks as tasks

    monkeypatch.setenv("RANKSCOPE_CALIBRATION_WINDOWS", "16")  # groups of 2 windows: a snapshot after 8
    monkeypatch.setenv("RANKSCOPE_GROUPS", "8")
    release = threading.Event()
    compute_all = tasks.ensure_all_spectra

    def held_at_the_first_snapshot(*args):
        """The job's own work, paused after publishing the first snapshot's spectra until the test has looked."""
        publish = args[7]

        def preview(spectra_preview):
            publish(spectra_preview)
            if spectra_preview.has_features:
                release.wait(60)

        return compute_all(*args[:7], preview)

    monkeypatch.setattr(tasks, "ensure_all_spectra", held_at_the_first_snapshot)
    at = open_app("spectra")
    at.button(key="compute_spectra").click().run()
    try:
        run_until(at, _refining)
        assert_clean(at)
        assert {"rank_share_heatmaps", "rank_share_by_type", "energy_curves"} <= chart_keys(at)
        assert any(button.label == "Stop" for button in at.button)  # the calibration's live progress, stoppable
        assert at.get("dataframe")  # LoRAP's table from the snapshot's activation-weighted spectra
    finally:
        release.set()
    run_until(at, lambda a: no_running_jobs(a) and has_metric("Full rank")(a) and not _refining(a))
    assert_clean(at)
    assert not any("refining" in caption.value for caption in at.caption)
