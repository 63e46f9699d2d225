"""Compression: low-rank modules, rank plans, groupings and budgets, evaluation and sweeps."""
