"""RankScope app entry point: checks access (`app/access.py`), then only routes to the pages in `pages/`."""

from pathlib import Path

import streamlit as st

from app.access import require_access

PAGES = Path(__file__).resolve().parent.parent / "pages"

st.set_page_config(page_title="RankScope", page_icon=":material/compress:", layout="wide")
require_access()  # serving a team: no page before the shared secret (DESIGN.md §14)
navigation = st.navigation(
    [
        st.Page(PAGES / "model.py", title="Model & texts", icon=":material/memory:", default=True),
        st.Page(PAGES / "spectra.py", title="Spectra", icon=":material/ssid_chart:"),
        st.Page(PAGES / "sensitivity.py", title="Sensitivity", icon=":material/tune:"),
        st.Page(PAGES / "allocate.py", title="Allocate", icon=":material/view_column:"),
        st.Page(PAGES / "search.py", title="Search", icon=":material/query_stats:"),
        st.Page(PAGES / "recover.py", title="Recover", icon=":material/healing:"),
        st.Page(PAGES / "export.py", title="Export", icon=":material/output:"),
    ]
)
navigation.run()
