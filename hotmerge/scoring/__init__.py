"""Scoring with lm-evaluation-harness: tasks and requests built once, per-candidate
scores aggregated as lm-eval aggregates them (suite.py); every lm-eval internal
hotmerge reaches, checked against the supported version (lm_eval_compat.py)."""
