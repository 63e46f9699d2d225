"""Texts: the corpus interface (built on `datasets`) and fixed-length token windows."""
