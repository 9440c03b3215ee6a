"""The embedded toy model family and its lm-eval tasks (see world.py)."""
