"""Run directories and results tables."""
