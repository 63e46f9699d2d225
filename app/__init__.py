"""The Streamlit front end: entry point, shared resources and UI helpers. Pages live in `pages/`."""
