"""Rank-allocation search: persisted, resumable Bayesian-optimisation studies (DESIGN.md §10)."""
