"""RankScope engine: model loading, calibration statistics, spectra and the DuckDB store.

Everything that computes lives here and is importable without Streamlit; the app in `app/` and
`pages/` only calls it. Submodules are imported on demand so `import engine` stays cheap.
"""

__version__ = "0.4.0"


def __getattr__(name: str):
    # `engine.load_compressed(dir)` without importing torch for every `import engine`
    if name == "load_compressed":
        from engine.export.format import load_compressed

        return load_compressed
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
