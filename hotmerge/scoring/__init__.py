"""Scoring with lm-evaluation-harness: tasks and requests built once, per-candidate
scores aggregated as lm-eval aggregates them (suite.py)."""
