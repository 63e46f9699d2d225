"""RankScope engine: model loading, calibration statistics, spectra and the DuckDB store.

Everything that computes lives here and is importable without Streamlit; the app in `app/` and
`pages/` only calls it. Submodules are imported on demand so `import engine` stays cheap.
"""

__version__ = "0.1.0"
